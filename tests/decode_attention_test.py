"""Tests for jax_ep/kernels/decode_attention.py: jax's Pallas decode kernel (through the
interpreter) over the live cache, merged with the new token, against plain softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from jax_ep.kernels import decode_attention


def test_attend_decode_equals_softmax_over_live_positions_and_the_new_token():
  rng = np.random.default_rng(0)
  b, h, s, k = 3, 2, 32, 16
  f = lambda *sh: jnp.asarray(rng.normal(size=sh), jnp.float32)
  q, kc, vc, kn, vn = f(b, h, k), f(b, h, s, k), f(b, h, s, k), f(b, h, k), f(b, h, k)
  pos = jnp.array([1, 17, 31], jnp.int32)  # live lengths differ per sequence
  # Poison the stale positions (finite, as a stale cache is): they must weigh nothing.
  stale = jnp.arange(s)[None, None, :, None] >= pos[:, None, None, None]
  kc, vc = jnp.where(stale, 1e3, kc), jnp.where(stale, 1e4, vc)
  scale = k**-0.5
  out = decode_attention.attend_decode(q, kc, vc, pos, kn, vn, scale, interpret=True)
  for i in range(b):
    n = int(pos[i])
    keys = jnp.concatenate([kc[i, :, :n], kn[i, :, None]], axis=1)  # [H, n + 1, Dh]
    vals = jnp.concatenate([vc[i, :, :n], vn[i, :, None]], axis=1)
    p = jax.nn.softmax(jnp.einsum("hk,hsk->hs", q[i], keys) * scale, axis=-1)
    assert_allclose(out[i], jnp.einsum("hs,hsk->hk", p, vals), rtol=1e-5, atol=1e-5)


def test_every_block_choice_gives_the_same_attention():
  # The blocks benchmarks/decode_parts.py --parts=attention compares: each reads the live
  # positions of its own blocks (a length of 40 ends inside a block of 16, 32 and 64).
  rng = np.random.default_rng(1)
  b, h, s, k = 2, 2, 64, 16
  f = lambda *sh: jnp.asarray(rng.normal(size=sh), jnp.float32)
  q, kc, vc = f(b, h, k), f(b, h, s, k), f(b, h, s, k)
  pos = jnp.array([40, 9], jnp.int32)
  ref = decode_attention.cache_attention(q, kc, vc, pos, 0.25, interpret=True)
  for blocks in ({"block_k": 16, "num_stages": 3}, {"block_k": 32, "k_splits": 2},
                 {"block_k": 16, "k_splits": 4, "num_warps": 8}):
    got = decode_attention.cache_attention(q, kc, vc, pos, 0.25, interpret=True, blocks=blocks)
    for g, r in zip(got, ref, strict=True):
      assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=str(blocks))


def test_supports_whole_blocks_within_shared_memory():
  assert decode_attention.supports(64, 512) and decode_attention.supports(48, 512)
  assert not decode_attention.supports(40, 512)  # not whole blocks of 16
  # The requests the H200 refused (NOTES section 13), at the seed's head_dim.
  old = {"block_k": None, "num_warps": 4}
  assert decode_attention.smem_bytes(1024, 512, old) == 282624
  assert decode_attention.smem_bytes(64, 512, {"block_k": 64, "num_stages": 3}) == 280576
  assert not decode_attention.supports(1024, 512, old)  # blocks of 128: XLA's attention
  assert decode_attention.supports(64, 512, old)  # blocks of 64 ran
  assert decode_attention.supports(4096, 512)  # the default's blocks of 16
  assert not decode_attention.supports(64, 8192)  # a head too wide for any block
  # float32 caches take twice the bytes a block: blocks of 64 at head_dim 512 no longer fit.
  assert decode_attention.supports(64, 256, old, itemsize=4)
  assert not decode_attention.supports(64, 512, old, itemsize=4)
  assert not decode_attention.supports(64, 512, {"block_k": 8})  # the kernel's least is 16
  assert not decode_attention.supports(40, 512, {"block_k": None})
  with pytest.raises(ValueError, match="divides the cache length 40"):
    decode_attention.smem_bytes(40, 512, {"block_k": None})
