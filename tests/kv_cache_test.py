"""Tests for jax_ep/kv_cache.py: write_rows puts each sequence's new keys and values at
its own positions from row `row0`, drops what falls past the cache and writes nothing
for a pipeline bubble; the cache pytrees' shapes."""

import jax.numpy as jnp
import numpy as np
from numpy.testing import assert_array_equal

from configs import tiny
from jax_ep.kv_cache import KVCache, StagedKVCache, write_rows

L, B, H, S, Dh = 2, 3, 2, 5, 4


def _new(t):
  """[B, t, H, Dh] of distinct nonzero values."""
  return jnp.arange(1, 1 + B * t * H * Dh, dtype=jnp.float32).reshape(B, t, H, Dh)


def test_each_sequence_writes_at_its_own_position_and_past_the_cache_is_dropped():
  new = _new(2)
  pos_B = [0, 2, 4]  # sequence 2's second token would be position 5 = S: dropped
  got = np.asarray(write_rows(jnp.zeros((L, B, H, S, Dh)), 1, jnp.array(pos_B), new))
  want = np.zeros((L, B, H, S, Dh), np.float32)
  for b, p in enumerate(pos_B):
    for j in range(2):
      if p + j < S:
        want[1, b, :, p + j] = new[b, j]
  assert_array_equal(got, want)


def test_rows_from_row0_and_a_bubble_writes_nothing():
  cache = jnp.zeros((1, 2 * B, H, S, Dh))
  new = _new(1)
  got = np.asarray(write_rows(cache, 0, jnp.full((B,), 1), new, row0=B))
  assert (got[0, :B] == 0).all()  # rows before row0 untouched
  assert_array_equal(got[0, B:, :, 1], new[:, 0])
  assert (np.delete(got[0, B:], 1, axis=2) == 0).all()  # only position 1 written
  assert_array_equal(write_rows(cache, 0, jnp.full((B,), 1), new, row0=B, valid=False), cache)


def test_shapes_and_layer_write():
  cfg = tiny.get_config()
  l, h, dh = cfg.num_layers, cfg.num_heads, cfg.head_dim
  assert KVCache.shape(cfg, 4, 16) == (l, 4, h, 16, dh)
  assert KVCache.shape(cfg, 4) == (l, 4, h, cfg.max_seq_len, dh)
  cache = KVCache.zeros(cfg, 4, 16)
  k_new = jnp.ones((4, 1, h, dh))
  cache = cache.write(2, jnp.array([0, 1, 2, 3]), k_new, 2 * k_new)
  k, v = np.asarray(cache.k_LxBxHxSxDh), np.asarray(cache.v_LxBxHxSxDh)
  assert k.sum() == 4 * h * dh and (k[2, np.arange(4), :, np.arange(4)] == 1).all()
  assert_array_equal(v, 2 * k)
  staged = StagedKVCache.zeros(cfg, 2, 4, 16)  # 2 stages of 2 local layers
  assert len(staged.k) == len(staged.v) == l // 2
  assert all(a.shape == (2, 4, h, 16, dh) for a in (*staged.k, *staged.v))
