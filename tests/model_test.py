"""Tests for jax_ep/model.py: full-size shapes without allocating; Transformer.__call__,
the single-device reference every deployment is tested against (tests/reference.py),
incremental with its KV cache against a full forward pass, causality, rotary positions."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose, assert_array_equal

from configs import seed, seed_e64, tiny
from jax_ep import ep, experts
from jax_ep.kernels import groups
from jax_ep.kv_cache import KVCache
from jax_ep.model import MoEBlock, Transformer, rope
from tests import reference

TINY = tiny.get_config()
B, L, PROMPT = 2, 8, 3  # batch, whole sequence, prefilled part


def _abstract_params(cfg):
  _, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


# --- full size, abstractly ----------------------------------------------------------------


def test_seed_model_shapes_and_bytes_without_allocating():
  params = _abstract_params(seed.get_config())
  assert all(isinstance(a, jax.ShapeDtypeStruct) for a in params.values())  # nothing allocated
  shapes = {k.replace(".value", ""): (a.shape, a.dtype) for k, a in params.items()}
  f16, f32 = jnp.float16, jnp.float32
  assert shapes == {
      "['embed_VxD']": ((32768, 8192), f16),
      "['unembed_DxV']": ((8192, 32768), f16),
      "['final_norm']['scale_D']": ((8192,), f16),
      "['layers']['attn_norm']['scale_D']": ((4, 8192), f16),
      "['layers']['moe_norm']['scale_D']": ((4, 8192), f16),
      "['layers']['attn']['wq_DxHxDh']": ((4, 8192, 16, 512), f16),
      "['layers']['attn']['wk_DxHxDh']": ((4, 8192, 16, 512), f16),
      "['layers']['attn']['wv_DxHxDh']": ((4, 8192, 16, 512), f16),
      "['layers']['attn']['wo_HxDhxD']": ((4, 16, 512, 8192), f16),
      "['layers']['moe']['w_router_DxE']": ((4, 8192, 16), f32),  # the router stays f32
      "['layers']['moe']['w_up_ExDxF']": ((4, 16, 8192, 32768), f16),
      "['layers']['moe']['w_down_ExFxD']": ((4, 16, 32768, 8192), f16),
  }
  nbytes = {k: a.size * a.dtype.itemsize for k, a in params.items()}
  expert_bytes = sum(v for k, v in nbytes.items() if "w_up" in k or "w_down" in k)
  # 4 layers x 16 experts x 2 matrices x 8192 x 32768 x 2 bytes, about 68.7 GB. Only a change
  # of the seed's model (configs/seed.py) may change these numbers.
  assert expert_bytes == 4 * 16 * 2 * 8192 * 32768 * 2 == 68_719_476_736
  assert sum(nbytes.values()) == 71_942_946_816  # + attention 2.1 GB, embeddings 1.1 GB, ...


def test_seed_e64_model_bytes():
  params = _abstract_params(seed_e64.get_config())
  up = next(a for k, a in params.items() if "w_up" in k)
  assert up.shape == (4, 64, 8192, 32768)
  nbytes = sum(a.size * a.dtype.itemsize for a in params.values())
  assert nbytes == 278_107_668_480  # experts alone: 4 x 64 x 2 x 8192 x 32768 x 2 = 274.9 GB


def test_swiglu_stores_up_and_gate_as_one_interleaved_weight():
  params = _abstract_params(dataclasses.replace(seed.get_config(), mlp_kind="swiglu"))
  assert params["['layers']['moe']['w_up_gate_ExDx2F'].value"].shape == (4, 16, 8192, 65536)
  assert not any("w_up_ExDxF" in k or "w_gate" in k for k in params)
  assert "['layers']['moe']['w_up_gate_ExDx2F'].value" not in _abstract_params(
      seed.get_config())


# --- the tiny model, on one device ----------------------------------------------------------


class _Model(reference.Reference):
  """The tiny model's Transformer.__call__ (the tests' reference), whole or incremental."""

  def full(self, tokens):
    return self.forward(tokens, L)

  def incremental(self, tokens):
    """Prefill the first PROMPT tokens, then one token at a time."""
    logits, cache, _ = self(tokens[:, :PROMPT], KVCache.zeros(self.cfg, B, L), 0)
    out = [logits]
    for pos in range(PROMPT, L):
      logits, cache, _ = self(tokens[:, pos:pos + 1], cache, pos)
      out.append(logits)
    return jnp.concatenate(out, axis=1), cache


@functools.cache
def _model(mlp_kind):
  return _Model(dataclasses.replace(TINY, mlp_kind=mlp_kind))


@pytest.fixture(scope="module", params=["gelu", "swiglu"])
def model(request):
  return _model(request.param)


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (B, L)), jnp.int32)


def test_cache_decoding_equals_full_forward(model, tokens):
  full, full_cache, stats = model.full(tokens)
  assert full.shape == (B, L, TINY.vocab_size) and full.dtype == jnp.float32
  inc, inc_cache = model.incremental(tokens)
  assert_allclose(inc, full, rtol=1e-5, atol=1e-5)
  # The cache holds the same keys and values either way, at every position.
  assert_allclose(inc_cache.k_LxBxHxSxDh, full_cache.k_LxBxHxSxDh, rtol=1e-5, atol=1e-5)
  assert_allclose(inc_cache.v_LxBxHxSxDh, full_cache.v_LxBxHxSxDh, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(full_cache.k_LxBxHxSxDh)).min(axis=(0, 1, 2, 4)).all()  # all written
  # Every token picks top_k experts in every layer.
  assert_array_equal(stats.load_E.sum(-1), [B * L * TINY.top_k] * TINY.num_layers)


def test_decode_kernels_equal_full_forward():
  """One token at a time through the Pallas decode attention and grouped expert kernels
  (interpreted; a 16-position cache, the kernel's tile) equals the full forward."""
  cfg = dataclasses.replace(TINY, max_seq_len=16)
  full_model = _Model(cfg)
  kern = _Model(cfg, par=ep.Parallel(kernels="interpret"))
  kern.params = full_model.params
  toks = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (B, 16)), jnp.int32)
  full, _, _ = full_model(toks[:, :10], KVCache.zeros(cfg, B, 16), 0)
  _, cache, _ = kern(toks[:, :PROMPT], KVCache.zeros(cfg, B, 16), 0)
  for pos in range(PROMPT, 10):
    logits, cache, _ = kern(toks[:, pos:pos + 1], cache, pos)
    assert_allclose(logits[:, 0], full[:, pos], rtol=1e-4, atol=1e-4)


def _attention_kernels(jaxpr, out):
  """The compiler params of every decode attention kernel (pallas_call mha_forward) in
  `jaxpr` and the jaxprs it nests."""
  for e in jaxpr.eqns:
    if e.primitive.name == "pallas_call" and e.params["name"] == "mha_forward":
      out.append(e.params["compiler_params"])
    for v in e.params.values():
      for w in v if isinstance(v, tuple | list) else (v,):
        inner = getattr(w, "jaxpr", w)
        if hasattr(inner, "eqns"):
          _attention_kernels(inner, out)
  return out


def test_the_decode_step_takes_the_attention_kernels_blocks_when_traced(monkeypatch):
  # What benchmarks/decode_parts.py's attention_step part relies on: a new engine's step
  # traces the kernel with decode_attention.BLOCKS as they are then; blocks the cache
  # cannot take send every layer to XLA's attention.
  from jax_ep.config import DeploymentConfig
  from jax_ep.engine import Engine
  from jax_ep.kernels import decode_attention

  cfg = dataclasses.replace(TINY, max_seq_len=16)

  def traced():
    engine = Engine(cfg, DeploymentConfig(kernels="interpret"))
    params = jax.eval_shape(lambda: engine.init_params(0))
    jaxpr = jax.make_jaxpr(engine.decode_program(B, 1))(
        params, engine.abstract_decode_state(B, 16), jax.random.key(0))
    return [(p.num_warps, p.num_stages) for p in _attention_kernels(jaxpr.jaxpr, [])]

  assert traced() == [(2, 2)] * cfg.num_layers
  monkeypatch.setitem(decode_attention.BLOCKS, "num_warps", 4)
  monkeypatch.setitem(decode_attention.BLOCKS, "num_stages", 3)
  assert traced() == [(4, 3)] * cfg.num_layers
  monkeypatch.setitem(decode_attention.BLOCKS, "block_k", 8)  # under the kernel's least
  assert traced() == []


def test_sequences_at_different_positions(model, tokens):
  """pos_B per sequence: sequence 1 decodes a position behind sequence 0, in one call."""
  full, _, _ = model.full(tokens)
  _, cache, _ = model(tokens[:, :PROMPT], KVCache.zeros(model.cfg, B, L), 0)
  step = jnp.stack([tokens[0, PROMPT], tokens[1, PROMPT - 1]])[:, None]
  logits, _, _ = model(step, cache, np.array([PROMPT, PROMPT - 1]))
  assert_allclose(logits[0, 0], full[0, PROMPT], rtol=1e-5, atol=1e-5)
  assert_allclose(logits[1, 0], full[1, PROMPT - 1], rtol=1e-5, atol=1e-5)


def test_stale_cache_beyond_pos_is_ignored(model, tokens):
  # Garbage in cache positions >= pos must not leak into attention.
  garbage = KVCache(*(jnp.full(KVCache.shape(model.cfg, B, L), 7.0, jnp.float32) for _ in range(2)))
  logits, _, _ = model(tokens[:, :PROMPT], garbage, 0)
  clean, _, _ = model(tokens[:, :PROMPT], KVCache.zeros(model.cfg, B, L), 0)
  assert_allclose(logits, clean, rtol=1e-5, atol=1e-5)


def test_causality(model, tokens):
  full, _, _ = model.full(tokens)
  changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % TINY.vocab_size)
  other, _, _ = model.full(changed)
  assert_allclose(other[:, :5], full[:, :5], rtol=1e-6, atol=1e-6)  # the past is unchanged
  assert not np.allclose(other[:, 5:], full[:, 5:], atol=1e-3)  # the future sees the change


def test_sequences_in_a_batch_are_independent(model, tokens):
  full, _, _ = model.full(tokens)
  other, _, _ = model.full(tokens.at[1].set(tokens[0]))
  assert_allclose(other[0], full[0], rtol=1e-5, atol=1e-5)
  assert_allclose(other[1], other[0], rtol=1e-5, atol=1e-5)


def test_swiglu_gate_is_used(tokens):
  m = _model("swiglu")
  base, _, _ = m.full(tokens)
  doubled = jax.tree_util.tree_map_with_path(
      lambda path, a: a.at[..., 1::2].multiply(2) if "w_up_gate" in jax.tree_util.keystr(path)
      else a, m.params)  # the gate's columns only
  logits, _, _ = m.call(doubled, tokens, KVCache.zeros(m.cfg, B, L), jnp.int32(0))
  assert not np.allclose(logits, base, atol=1e-4)


def test_swiglu_block_reads_even_columns_as_up_and_odd_as_gate():
  cfg = dataclasses.replace(TINY, mlp_kind="swiglu")
  block = MoEBlock(cfg, nnx.Rngs(3))
  x = jax.random.normal(jax.random.PRNGKey(4), (6, cfg.model_dim))
  y, _ = block(x, ep.Parallel())
  up, gate = groups.split_pairs(block.w_up_gate_ExDx2F[...])
  args = x, block.w_router_DxE[...]
  want = experts.dense_moe_reference(*args, up, block.w_down_ExFxD[...], cfg.top_k, gate)
  assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  swapped = experts.dense_moe_reference(*args, gate, block.w_down_ExFxD[...], cfg.top_k, up)
  assert not np.allclose(y, swapped, atol=1e-3)


# --- rotary positions -----------------------------------------------------------------------


def test_rope_depends_on_relative_position_only():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
  pos = lambda p: jnp.full((1, 1), p, jnp.int32)
  dot = lambda m, n: float(jnp.sum(rope(q, pos(m), 1e4) * rope(k, pos(n), 1e4)))
  assert dot(3, 1) == pytest.approx(dot(12, 10), rel=1e-5)
  assert dot(3, 1) != pytest.approx(dot(3, 2), rel=1e-3)
  # A rotation: norms are kept; position 0 is the identity.
  assert_allclose(jnp.linalg.norm(rope(q, pos(5), 1e4), axis=-1), jnp.linalg.norm(q, axis=-1),
                  rtol=1e-5)
  assert_allclose(rope(q, pos(0), 1e4), q)
