"""Mixtral-architecture weights in the Hugging Face layout (config.json + *.safetensors),
read into and written from jax_ep checkpoints, without torch.

Mixtral's block is jax_ep's: RMSNorm pre-norm, rotary attention in the rotate-half form
with inv_freq = theta^(-2i/K) (model.rope), and a sparse MoE whose router takes the
softmax over all experts, keeps the top k and renormalises them, which is the softmax
over the top-k logits (routing.top_k_gate); its experts are SwiGLU, w2(silu(w1 x) * w3 x).
What jax_ep does not have (grouped-query attention, sliding windows, tied embeddings,
rope scaling, biases) is refused with the config field that asks for it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open  # bfloat16 reads as ml_dtypes' bfloat16
from safetensors.numpy import save_file

from jax_ep import checkpoint
from jax_ep.config import ConfigError, ModelConfig
from jax_ep.kernels import groups

# transformers' MixtralConfig defaults: what a config.json that leaves a field out means.
DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "hidden_act": "silu", "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "rope_theta": 1e6, "sliding_window": None,
            "num_experts_per_tok": 2, "num_local_experts": 8}
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "float": "float32", "half": "float16"}
# Tensors in some checkpoints that are recomputed, not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# HF tensor name -> (canonical path, how the HF matrix maps to the jax_ep array[, its
# columns of the leaf]).
#   "same": identical; "t": transposed; "in": [H*Dh, D] <-> [D, H, Dh]; "out": [D, H*Dh]
#   <-> [H, Dh, D]. {i}: layer (the canonical leaf's L axis), {j}: expert (its E axis).
#   The experts' w1 (gate) and w3 (up) are the odd and even columns of one interleaved
#   [D, 2F] weight (kernels/groups.interleave_pairs).
_LAYER = "model.layers.{i}."
_EXPERT = _LAYER + "block_sparse_moe.experts.{j}."
MAPPING = (
    ("model.embed_tokens.weight", "embed_VxD", "same"),
    ("model.norm.weight", "final_norm/scale_D", "same"),
    ("lm_head.weight", "unembed_DxV", "t"),
    (_LAYER + "input_layernorm.weight", "layers/attn_norm/scale_D", "same"),
    (_LAYER + "self_attn.q_proj.weight", "layers/attn/wq_DxHxDh", "in"),
    (_LAYER + "self_attn.k_proj.weight", "layers/attn/wk_DxHxDh", "in"),
    (_LAYER + "self_attn.v_proj.weight", "layers/attn/wv_DxHxDh", "in"),
    (_LAYER + "self_attn.o_proj.weight", "layers/attn/wo_HxDhxD", "out"),
    (_LAYER + "post_attention_layernorm.weight", "layers/moe_norm/scale_D", "same"),
    (_LAYER + "block_sparse_moe.gate.weight", "layers/moe/w_router_DxE", "t"),
    (_EXPERT + "w1.weight", "layers/moe/w_up_gate_ExDx2F", "t", groups.GATE_COLUMNS),
    (_EXPERT + "w3.weight", "layers/moe/w_up_gate_ExDx2F", "t", groups.UP_COLUMNS),
    (_EXPERT + "w2.weight", "layers/moe/w_down_ExFxD", "t"),
)


# --- config ----------------------------------------------------------------------------


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
  """A Mixtral config.json -> ModelConfig; ConfigError naming what jax_ep cannot run."""
  c = {**DEFAULTS, **hf}

  def refuse(field, why):
    raise ConfigError(f"{where}: {field}={c.get(field)!r}: {why}")

  if c.get("model_type", "mixtral") != "mixtral":
    refuse("model_type", "import-hf reads Mixtral-architecture models (model_type "
           "'mixtral', MixtralForCausalLM).")
  heads = c["num_attention_heads"]
  if c["num_key_value_heads"] != heads:
    refuse("num_key_value_heads", f"grouped-query attention ({heads} query heads share "
           f"{c['num_key_value_heads']} key/value heads) is not supported: jax_ep's "
           "attention has one key/value head per query head (num_key_value_heads = "
           "num_attention_heads). Mixtral 8x7B and 8x22B use GQA.")
  if c["sliding_window"] is not None:
    refuse("sliding_window", "sliding-window attention is not supported; jax_ep attends "
           "to the whole cache (set it to null only if the model was trained without it).")
  if c["tie_word_embeddings"]:
    refuse("tie_word_embeddings", "tied embeddings are not supported (jax_ep keeps the "
           "embedding and the unembedding apart).")
  if c["hidden_act"] not in ("silu", "swish"):
    refuse("hidden_act", "jax_ep's gated experts are SwiGLU (silu).")
  for field in ("rope_scaling", "attention_bias", "mlp_bias"):
    if c.get(field):
      refuse(field, "not supported (jax_ep has plain rotary positions and no biases).")
  hidden = c["hidden_size"]
  head_dim = c.get("head_dim") or hidden // max(heads, 1)
  if head_dim * heads != hidden:
    refuse("head_dim", f"jax_ep needs num_attention_heads x head_dim = hidden_size "
           f"({heads} x {head_dim} != {hidden}).")
  dtype = c.get("torch_dtype") or c.get("dtype") or "float32"
  if dtype not in TORCH_DTYPES:
    refuse("torch_dtype", f"use one of {sorted(TORCH_DTYPES)}.")
  try:
    return ModelConfig(
        num_layers=c["num_hidden_layers"], num_experts=c["num_local_experts"],
        top_k=c["num_experts_per_tok"], num_heads=heads, head_dim=head_dim,
        model_dim=hidden, mlp_dim=c["intermediate_size"], mlp_kind="swiglu",
        vocab_size=c["vocab_size"], max_seq_len=c["max_position_embeddings"],
        dtype=TORCH_DTYPES[dtype], rope_theta=float(c["rope_theta"]),
        norm_eps=float(c["rms_norm_eps"]))
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from e


def config_to_hf(cfg: ModelConfig, base: dict | None = None) -> dict:
  """ModelConfig -> a Mixtral config.json; `base` (an imported model's original config)
  keeps the fields jax_ep does not use, such as token ids."""
  if cfg.mlp_kind != "swiglu":
    raise ConfigError(f"mlp_kind={cfg.mlp_kind!r}: Mixtral's experts are SwiGLU; only a "
                      "model with mlp_kind='swiglu' exports to the Mixtral layout: train or save a "
                      "SwiGLU preset (--config=tiny_swiglu, seed_swiglu) to export.")
  return {**(base or {}),
          "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
          "hidden_size": cfg.model_dim, "intermediate_size": cfg.mlp_dim,
          "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
          "num_key_value_heads": cfg.num_heads, "head_dim": cfg.head_dim,
          "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
          "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
          "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
          "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": cfg.dtype}


# --- weights ------------------------------------------------------------------------------


def _names(cfg: ModelConfig):
  """(HF name, canonical path, transform, index into the canonical leaf) for every tensor."""
  for name, path, how, *columns in MAPPING:
    if "{j}" in name:
      for i in range(cfg.num_layers):
        for j in range(cfg.num_experts):
          yield name.format(i=i, j=j), path, how, (i, j, ..., *columns)
    elif "{i}" in name:
      for i in range(cfg.num_layers):
        yield name.format(i=i), path, how, (i,)
    else:
      yield name, path, how, ()


def _hf_shape(shape, how):
  """The HF tensor's shape for a canonical slice of `shape`."""
  if how == "t":
    return tuple(reversed(shape))
  if how == "in":  # [D, H, Dh] -> [H*Dh, D]
    return (shape[1] * shape[2], shape[0])
  if how == "out":  # [H, Dh, D] -> [D, H*Dh]
    return (shape[2], shape[0] * shape[1])
  return tuple(shape)


def _to_hf(a: np.ndarray, how: str) -> np.ndarray:
  if how == "t":
    a = a.T
  elif how == "in":
    a = a.reshape(a.shape[0], -1).T
  elif how == "out":
    a = a.reshape(-1, a.shape[-1]).T
  return np.ascontiguousarray(a)


def _from_hf(w: np.ndarray, how: str, shape) -> np.ndarray:
  return w if how == "same" else w.T.reshape(shape)


def _files(src: str) -> dict[str, str]:
  """Tensor name -> the safetensors file holding it."""
  index = os.path.join(src, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f"{index} is not a safetensors index ({e}).") from e
    missing = sorted({f for f in weight_map.values() if not os.path.exists(os.path.join(src, f))})
    if missing:
      raise ConfigError(f"{index} names shard(s) that are not in {src}: {missing}.")
    return {name: os.path.join(src, f) for name, f in weight_map.items()}
  paths = sorted(glob.glob(os.path.join(src, "*.safetensors")))
  if not paths:
    raise ConfigError(f"{src} has no *.safetensors file (and no model.safetensors.index.json).")
  out = {}
  for path in paths:
    with _reading(path):
      with safe_open(path, framework="np") as f:
        out.update({name: path for name in f.keys()})
  return out


@contextlib.contextmanager
def _reading(path: str):
  """Turns safetensors' errors about `path` (truncated, not safetensors) into ConfigError."""
  try:
    yield
  except (SafetensorError, OSError) as e:
    raise ConfigError(f"{path} cannot be read as safetensors ({e}): is it complete? Copy or "
                      "download it again.") from None


def _misplaced(cfg: ModelConfig, names: list[str]) -> str | None:
  """Why tensors beyond the config's layers or experts are there: the field to change."""
  for pattern, field, size in ((r"model\.layers\.(\d+)\.", "num_hidden_layers", cfg.num_layers),
                               (r"\.experts\.(\d+)\.", "num_local_experts", cfg.num_experts)):
    found = [int(m.group(1)) for n in names if (m := re.search(pattern, n))]
    if found and max(found) >= size:
      return (f"config.json's {field}={size} but the tensors hold {max(found) + 1} "
              f"(e.g. {next(n for n in names if re.search(pattern, n))}): make {field} "
              "the tensors' count.")
  return None


def _check_dtype(src: str, name: str, w: np.ndarray, cfg: ModelConfig, casts: set) -> None:
  """Refuses tensors that are not floating point; records float casts (stored -> model)."""
  if not (np.issubdtype(w.dtype, np.floating) or w.dtype.name == "bfloat16"):
    raise ConfigError(f"{src}: {name} is stored as {w.dtype.name}; a model's weights are "
                      "floating point (float32, bfloat16 or float16).")
  if w.dtype.name != cfg.dtype and "block_sparse_moe.gate." not in name:
    casts.add(w.dtype.name)


def read_config(src: str) -> tuple[ModelConfig, dict]:
  path = os.path.join(src, "config.json")
  try:
    with open(path) as f:
      hf = json.load(f)
  except FileNotFoundError as e:
    raise ConfigError(f"--src={src} has no config.json.") from e
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from e
  return config_from_hf(hf, path), hf


def load(src: str, log: Callable[[str], None] = lambda m: None
         ) -> tuple[ModelConfig, dict, dict]:
  """Reads a Mixtral directory: (config, canonical params as a pure dict of numpy arrays
  in the model's dtype with the router in float32, the original config.json). Weights
  stored in another float dtype than config.json's torch_dtype are cast, with a note to
  `log`; weights that are not floating point are refused."""
  cfg, hf = read_config(src)
  files = _files(src)
  wanted = list(_names(cfg))
  missing = [name for name, *_ in wanted if name not in files]
  if missing:
    raise ConfigError(f"{src}: {len(missing)} tensor(s) the config implies are missing, e.g. "
                      f"{missing[:3]}; is it a MixtralForCausalLM checkpoint of this config?")
  known = {name for name, *_ in wanted}
  extra = sorted(n for n in files if n not in known and not n.endswith(IGNORED_SUFFIXES))
  if extra:
    raise ConfigError(f"{src}: " + (_misplaced(cfg, extra) or (
        f"it has tensors jax_ep has no place for, e.g. {extra[:3]} (a feature of another "
        "architecture?).")))
  abstract = nnx.to_pure_dict(checkpoint.abstract_state(cfg))
  leaves = {path: np.zeros(leaf.shape, np.float32 if "router" in path else cfg.jnp_dtype)
            for path, leaf in _flat(abstract).items()}
  casts: set[str] = set()
  with contextlib.ExitStack() as stack:
    handles = {}
    for path in sorted({files[name] for name, *_ in wanted}):
      with _reading(path):
        handles[path] = stack.enter_context(safe_open(path, framework="np"))
    for name, path, how, index in wanted:
      with _reading(files[name]):
        w = handles[files[name]].get_tensor(name)
      _check_dtype(src, name, w, cfg, casts)
      dest = leaves[path]
      shape = dest[index].shape
      if tuple(w.shape) != _hf_shape(shape, how):
        raise ConfigError(f"{src}: {name} is {list(w.shape)}, the config implies "
                          f"{list(_hf_shape(shape, how))}.")
      dest[index] = _from_hf(w, how, shape).astype(dest.dtype)
  if casts:
    log(f"note: {src}'s weights stored as {' and '.join(sorted(casts))} were cast to "
        f"{cfg.dtype}, config.json's torch_dtype (the router stays float32).")
  return cfg, _nest(leaves), hf


def _flat(tree, prefix="") -> dict[str, object]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    out.update(_flat(v, key + "/") if isinstance(v, dict) else {key: v})
  return out


def _nest(flat: dict[str, object]) -> dict:
  out: dict = {}
  for key, v in flat.items():
    *parents, last = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def to_hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """Canonical params (pure dict) -> HF tensors by name, in the model's dtype; the router
  stays float32 (jax_ep keeps it so; transformers casts it on load)."""
  flat = {k: np.asarray(v) for k, v in _flat(params).items()}
  return {name: _to_hf(flat[path][index], how) for name, path, how, index in _names(cfg)}


# --- commands -------------------------------------------------------------------------------


def import_hf(src: str, workdir: str, log: Callable[[str], None] = lambda m: None
              ) -> ModelConfig:
  """`jax-ep import-hf`: a Mixtral directory -> an orbax checkpoint (step 0) in workdir."""
  if not os.path.isdir(src):
    raise ConfigError(f"--src={src} is not a directory.")
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise ConfigError(f"--workdir={workdir} is not empty; import into a new directory.")
  cfg, params, hf = load(src, log)
  checkpoint.save_canonical(workdir, cfg, params, extra={"hf_config": hf,
                                                         "source": os.path.abspath(src)})
  return cfg


def _permit(directory: str, names: list[str]) -> None:
  """The umask's modes, as files a user writes get: mkdtemp makes its directory 0700 and
  safetensors writes its files 0600, which would keep the export from other users."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in [*names, "config.json"]:
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def export_hf(checkpoint_dir: str, dst: str, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """`jax-ep export-hf`: a checkpoint -> dst/config.json and safetensors shards (with
  model.safetensors.index.json when there are several). Returns the files written.

  Written into a temporary directory beside dst and renamed, so a failed export leaves
  no partial dst.
  """
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise ConfigError(f"--dst={dst} exists and is not an empty directory.")
  parent = os.path.dirname(os.path.abspath(dst))
  if not os.path.isdir(parent):  # as train's and import-hf's --workdir
    raise ConfigError(f"--dst={dst}: its directory {parent} does not exist; create it first.")
  with checkpoint.Checkpointer(checkpoint_dir) as ckpt:  # refused before anything is read
    hf = config_to_hf(ckpt.config(), ckpt.meta().get("hf_config"))
  cfg, params, _ = checkpoint.restore_canonical(checkpoint_dir)
  tensors = to_hf_tensors(cfg, checkpoint.as_numpy(params))
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  tmp = tempfile.mkdtemp(dir=parent, prefix=".export-hf-")
  try:
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, shard in zip(names, shards, strict=True):
      save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
    if len(shards) > 1:
      index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": {n: f for f, s in zip(names, shards, strict=True) for n in s}}
      with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=1)
      names.append("model.safetensors.index.json")
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(hf, f, indent=1)
    _permit(tmp, names)
    if os.path.isdir(dst):
      os.rmdir(dst)
    os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return [os.path.join(dst, n) for n in ["config.json", *names]]
