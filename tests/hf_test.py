"""Tests for jax_ep/hf.py: a Mixtral directory imported into a checkpoint computes what
Mixtral computes (a numpy transcription of transformers' MixtralForCausalLM, written from
the HF tensors, is the reference), exports back to the same tensors, and what jax_ep
cannot run is refused with the config field that asks for it."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose, assert_array_equal
from safetensors import safe_open
from safetensors.numpy import save_file

from jax_ep import checkpoint, hf, routing
from jax_ep.config import ConfigError
from jax_ep.model import rope
from tests import reference

CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
          "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 4, "num_local_experts": 4,
          "num_experts_per_tok": 2, "vocab_size": 24, "max_position_embeddings": 16,
          "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
          "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "float32",
          "bos_token_id": 1, "eos_token_id": 2}


def _hf_tensors(c, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  d, f, v, e = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
  w = lambda *shape: (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)
  t = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": 1 + w(d) * 0.1,
       "lm_head.weight": w(v, d)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": 1 + w(d) * 0.1,
          p + "post_attention_layernorm.weight": 1 + w(d) * 0.1,
          p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(d, d),
          p + "self_attn.v_proj.weight": w(d, d), p + "self_attn.o_proj.weight": w(d, d),
          p + "block_sparse_moe.gate.weight": w(e, d)}
    for j in range(e):
      x = f"{p}block_sparse_moe.experts.{j}."
      t |= {x + "w1.weight": w(f, d), x + "w3.weight": w(f, d), x + "w2.weight": w(d, f)}
  return {name: a.astype(dtype) for name, a in t.items()}


def _write(directory, config, tensors, shards=1):
  """A Hugging Face directory: config.json and `shards` safetensors files (indexed)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  names = sorted(tensors)
  parts = [names[i::shards] for i in range(shards)]
  files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
  for file, part in zip(files, parts, strict=True):
    save_file({n: tensors[n] for n in part}, os.path.join(directory, file))
  if shards > 1:
    index = {"weight_map": {n: f for f, p in zip(files, parts, strict=True) for n in p}}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f)
  return directory


def _read(directory):
  out = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      with safe_open(os.path.join(directory, name), framework="np") as f:
        out |= {k: f.get_tensor(k) for k in f.keys()}
  return out


# --- Mixtral in numpy, from the HF tensors (transformers' modeling_mixtral, eager path) ---


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x):
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([-x2, x1], axis=-1)


def mixtral_logits(c, t, tokens_T):
  d, h = c["hidden_size"], c["num_attention_heads"]
  k, top = d // h, c["num_experts_per_tok"]
  n = len(tokens_T)
  inv_freq = 1.0 / (c["rope_theta"] ** (np.arange(0, k, 2) / k))
  freqs = np.arange(n)[:, None] * inv_freq[None]
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = np.cos(emb)[:, None], np.sin(emb)[:, None]  # [T, 1, Dh]
  x = t["model.embed_tokens.weight"][tokens_T].astype(np.float64)
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    a = _rms(x, t[p + "input_layernorm.weight"], c["rms_norm_eps"])
    q, kk, v = (a @ t[p + f"self_attn.{m}_proj.weight"].T for m in "qkv")
    q, kk, v = (y.reshape(n, h, k) for y in (q, kk, v))
    q, kk = q * cos + _rotate_half(q) * sin, kk * cos + _rotate_half(kk) * sin
    s = np.einsum("thk,uhk->htu", q, kk) / np.sqrt(k)
    s = np.where(np.tril(np.ones((n, n), bool))[None], s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("htu,uhk->thk", pr, v).reshape(n, d)
    x = x + o @ t[p + "self_attn.o_proj.weight"].T
    a = _rms(x, t[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
    logits = a @ t[p + "block_sparse_moe.gate.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    picks = np.argsort(-probs, axis=-1)[:, :top]
    weights = np.take_along_axis(probs, picks, -1)
    weights /= weights.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for tok in range(n):
      for j, wgt in zip(picks[tok], weights[tok], strict=True):
        e = f"{p}block_sparse_moe.experts.{j}."
        g, u = t[e + "w1.weight"] @ a[tok], t[e + "w3.weight"] @ a[tok]
        out[tok] += wgt * (t[e + "w2.weight"] @ (g / (1 + np.exp(-g)) * u))
    x = x + out
  x = _rms(x, t["model.norm.weight"], c["rms_norm_eps"])
  return x @ t["lm_head.weight"].T


def _jax_logits(cfg, params, tokens_T):
  logits, _, _ = reference.Reference(cfg).forward(np.asarray(tokens_T)[None], len(tokens_T),
                                                  jax.device_put(params))
  return np.asarray(logits[0])


def test_import_computes_what_mixtral_computes_and_exports_the_same_tensors(tmp_path):
  tensors = _hf_tensors(CONFIG)
  src = _write(str(tmp_path / "hf"), CONFIG, tensors, shards=3)
  cfg = hf.import_hf(src, str(tmp_path / "ckpt"))
  assert (cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.num_heads, cfg.head_dim) == (
      2, 4, 2, 4, 8)
  assert (cfg.mlp_kind, cfg.rope_theta, cfg.norm_eps, cfg.dtype) == (
      "swiglu", 500000.0, 1e-5, "float32")
  _, params, _ = checkpoint.restore_canonical(str(tmp_path / "ckpt"))
  tokens = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], 9)
  got = _jax_logits(cfg, params, tokens)
  assert_allclose(got, mixtral_logits(CONFIG, tensors, tokens), rtol=2e-4, atol=2e-4)

  # Back to the HF layout (several shards): the same tensors, the config's other fields kept.
  files = hf.export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), max_shard_bytes=20_000)
  assert any(f.endswith("model.safetensors.index.json") for f in files)
  exported = _read(str(tmp_path / "out"))
  assert sorted(exported) == sorted(tensors)
  for name, t in tensors.items():
    assert_array_equal(exported[name], t, err_msg=name)
  with open(tmp_path / "out" / "config.json") as f:
    config = json.load(f)
  assert {k: config[k] for k in CONFIG} == {**CONFIG}
  # ... and imported again: identical weights, identical logits.
  hf.import_hf(str(tmp_path / "out"), str(tmp_path / "again"))
  _, again, _ = checkpoint.restore_canonical(str(tmp_path / "again"))
  assert all(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), again, params)))
  assert_array_equal(_jax_logits(cfg, again, tokens), got)


def test_bfloat16_weights_keep_their_bits_and_the_router_is_float32(tmp_path):
  config = {**CONFIG, "torch_dtype": "bfloat16"}
  tensors = _hf_tensors(config, ml_dtypes.bfloat16)
  cfg = hf.import_hf(_write(str(tmp_path / "hf"), config, tensors), str(tmp_path / "ckpt"))
  assert cfg.dtype == "bfloat16"
  _, params, _ = checkpoint.restore_canonical(str(tmp_path / "ckpt"))
  assert params["layers"]["moe"]["w_router_DxE"].dtype == jnp.float32
  assert params["layers"]["moe"]["w_up_gate_ExDx2F"].dtype == jnp.bfloat16
  os.makedirs(tmp_path / "out")  # an empty --dst the user made: replaced, modes as a user's
  umask = os.umask(0o022)
  try:
    files = hf.export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
  finally:
    os.umask(umask)
  assert oct(os.stat(tmp_path / "out").st_mode & 0o777) == oct(0o755)
  assert {oct(os.stat(f).st_mode & 0o777) for f in files} == {oct(0o644)}, files
  exported = _read(str(tmp_path / "out"))
  for name, t in tensors.items():
    assert_array_equal(exported[name].astype(np.float32), t.astype(np.float32), err_msg=name)


def test_top_k_softmax_is_mixtrals_softmax_topk_renormalise():
  logits = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  picks = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
  want = np.take_along_axis(probs, picks, -1)
  want /= want.sum(-1, keepdims=True)
  weights, experts = routing.top_k_gate(jnp.asarray(logits), 2)
  assert_array_equal(np.asarray(experts), picks)
  assert_allclose(np.asarray(weights), want, rtol=1e-6)


def test_rope_is_hf_rotate_half_with_theta_to_the_minus_2i_over_k():
  k, theta = 8, 500000.0
  x = np.random.default_rng(0).standard_normal((1, 5, 2, k)).astype(np.float32)
  pos = np.arange(5)
  inv_freq = 1.0 / (theta ** (np.arange(0, k, 2) / k))
  emb = np.concatenate([pos[:, None] * inv_freq] * 2, axis=-1)[None, :, None]
  want = x * np.cos(emb) + _rotate_half(x) * np.sin(emb)
  got = rope(jnp.asarray(x), jnp.asarray(pos)[None], theta)
  assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change,field", [
    ({"num_key_value_heads": 2}, "num_key_value_heads=2: grouped-query attention"),
    ({"sliding_window": 4096}, "sliding_window=4096"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"torch_dtype": "float8"}, "torch_dtype='float8'"),
    ({"num_local_experts": 1, "num_experts_per_tok": 2}, "top_k=2 is larger than num_experts=1"),
])
def test_unsupported_config_is_refused_naming_the_field(tmp_path, change, field):
  src = _write(str(tmp_path / "hf"), {**CONFIG, **change}, {})
  with pytest.raises(ConfigError, match="config.json") as e:
    hf.import_hf(src, str(tmp_path / "ckpt"))
  assert field in str(e.value)
  assert not (tmp_path / "ckpt").exists()


def test_missing_wrong_and_extra_tensors(tmp_path):
  tensors = _hf_tensors(CONFIG)
  cases = {
      "missing": ({k: v for k, v in tensors.items() if "experts.3.w2" not in k}, "missing"),
      "wrong": ({**tensors, "lm_head.weight": tensors["lm_head.weight"][:, :8]},
                r"lm_head.weight is \[24, 8\], the config implies \[24, 32\]"),
      "extra": ({**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)},
                "no place for"),
  }
  for name, (t, message) in cases.items():
    src = _write(str(tmp_path / name), CONFIG, t)
    with pytest.raises(ConfigError, match=message):
      hf.import_hf(src, str(tmp_path / f"{name}_ckpt"))


def test_config_counts_below_the_tensors_name_the_field(tmp_path):
  tensors = _hf_tensors(CONFIG)  # 2 layers x 4 experts
  for change, message in (({"num_hidden_layers": 1}, "num_hidden_layers=1 but the tensors hold 2"),
                          ({"num_local_experts": 3}, "num_local_experts=3 but the tensors hold 4")):
    src = _write(str(tmp_path / f"{change}"), {**CONFIG, **change}, tensors)
    with pytest.raises(ConfigError, match=message):
      hf.import_hf(src, str(tmp_path / "ckpt"))
  assert not (tmp_path / "ckpt").exists()


def test_damaged_or_integer_weights_are_refused_and_float_casts_noted(tmp_path):
  tensors = _hf_tensors(CONFIG)
  src = _write(str(tmp_path / "cut"), CONFIG, tensors)
  path = os.path.join(src, "model-00001-of-00001.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ConfigError, match="00001.safetensors cannot be read as safetensors"):
    hf.import_hf(src, str(tmp_path / "cut_ckpt"))
  ints = _write(str(tmp_path / "ints"), CONFIG,
                {k: (v * 100).astype(np.int32) for k, v in tensors.items()})
  with pytest.raises(ConfigError, match="is stored as int32; a model's weights are floating"):
    hf.import_hf(ints, str(tmp_path / "ints_ckpt"))
  assert not (tmp_path / "cut_ckpt").exists() and not (tmp_path / "ints_ckpt").exists()
  # float16 tensors of a float32 config: cast, and said; the router's dtype is not a cast.
  halves = {k: v.astype(np.float16) if "gate.weight" not in k else v for k, v in tensors.items()}
  notes = []
  hf.import_hf(_write(str(tmp_path / "f16"), CONFIG, halves), str(tmp_path / "f16_ckpt"),
               log=notes.append)
  assert notes == [f"note: {tmp_path / 'f16'}'s weights stored as float16 were cast to float32, "
                   "config.json's torch_dtype (the router stays float32)."]
  notes.clear()
  hf.import_hf(_write(str(tmp_path / "same"), CONFIG, tensors), str(tmp_path / "same_ckpt"),
               log=notes.append)
  assert notes == []


def test_export_refuses_gelu_experts_and_a_full_destination(tmp_path):
  from configs import load_model

  cfg = load_model("tiny_task")  # GELU experts
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                       nnx.to_pure_dict(checkpoint.abstract_state(cfg)))
  checkpoint.save_canonical(str(tmp_path / "gelu"), cfg, zeros)
  with pytest.raises(ConfigError, match="mlp_kind='gelu'.*--config=tiny_swiglu"):
    hf.export_hf(str(tmp_path / "gelu"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(ConfigError, match="not an empty directory"):
    hf.export_hf(str(tmp_path / "gelu"), str(tmp_path / "full"))
