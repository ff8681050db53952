"""Tests for jax_ep/kernels/groups.py: the tile table and the program each id computes
(every live tile exactly once, group by group), the rows a launch multiplies, GELU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from jax_ep.kernels import groups


def test_tile_table():
  table = np.asarray(groups.tile_table(jnp.array([10, 0, 17], jnp.int32), 8))
  # rows start, rows, row tiles, first row tile; G padded to 4 with an empty group.
  np.testing.assert_array_equal(table[:4], [[0, 10, 10, 27], [10, 0, 17, 0], [2, 0, 3, 0],
                                            [0, 2, 2, 5]])
  assert table[4, 0] == 5  # 2 + 3 live row tiles


class _Ref:
  """A table as the kernel reads it (ref[i, j]), on the host."""

  def __init__(self, a):
    self.a = np.asarray(a)

  def __getitem__(self, idx):
    return jnp.asarray(self.a[idx])


def test_every_live_tile_has_exactly_one_program():
  # Sizes [10, 0, 17] at 8-row tiles, 3 column tiles: 5 row tiles x 3 = 15 live programs,
  # each (group, row tile, column tile) once, group by group.
  sizes = [10, 0, 17]
  ref = _Ref(groups.tile_table(jnp.array(sizes, jnp.int32), 8))
  seen = []
  for pid in range(24):
    t = groups.locate(ref, jnp.int32(pid), 8, 3)
    if bool(t.live):
      seen.append((int(t.g), int(t.row0), int(t.n)))
      assert 0 < int(t.rows_left) and int(t.row0) + min(8, int(t.rows_left)) <= 27
    else:
      assert pid >= 15
  want = [(g, r, n) for g, r in ((0, 0), (0, 8), (2, 10), (2, 18), (2, 26)) for n in range(3)]
  assert sorted(seen) == sorted(want) and len(seen) == 15
  assert [g for g, _, _ in seen[:6]] == [0] * 6  # group 0's six programs first


def test_cost_rows_follow_the_real_rows():
  b = groups.Blocks(block_m=128)
  assert groups.cost_rows([128] * 16, b) == 2048
  assert groups.cost_rows([0, 0, 2048], b) == 2048
  assert groups.cost_rows([129, 1, 0], b) == 256 + 128
  small = groups.Blocks(block_m=128, last_m=64)  # a last tile of <= 64 rows costs 64
  assert groups.cost_rows([129, 1, 0, 200, 128], small) == (128 + 64) + 64 + 256 + 128
  assert groups.cost_rows([192, 193], small) == (128 + 64) + 256
  tail = groups.Blocks(block_m=128, tail_m=16, last_m=64)  # 16 rows after a full tile
  assert groups.cost_rows([144, 145, 16, 272], tail) == (128 + 16) + (128 + 64) + 64 + 272


def test_tile_table_merges_tails():
  sizes = jnp.array([24, 8, 25, 0, 40], jnp.int32)  # tiles of 16, tails of 8
  table = np.asarray(groups.tile_table(sizes, 16, tail_m=8))
  np.testing.assert_array_equal(table[2, :5], [1, 1, 2, 0, 2])  # 24 and 40 merge their 8
  assert table[4, 0] == 6
  np.testing.assert_array_equal(np.asarray(groups.tile_table(sizes, 16))[2, :5],
                                [2, 1, 2, 0, 3])


def test_gelu_matches_jax():
  x = jnp.linspace(-30, 30, 301)
  assert_allclose(groups.gelu_tanh(x), jax.nn.gelu(x, approximate=True), rtol=1e-5, atol=1e-6)


def test_default_blocks_fit_hopper_shared_memory():
  # 227 KiB of shared memory a block on H100 / H200; SwiGLU's up product streams two
  # weight tiles a stage. A small last tile is a Triton dot: a power of two of at least
  # 16 rows, fewer than block_m.
  assert groups.DEFAULT_BLOCKS.smem_bytes() <= 227 * 1024
  assert groups.SWIGLU_UP_BLOCKS.smem_bytes(weights=2) <= 227 * 1024
  for b in (groups.DEFAULT_BLOCKS, groups.SWIGLU_UP_BLOCKS):
    for small in (b.last_m, b.tail_m):
      assert small == 0 or (16 <= small < b.block_m and small & (small - 1) == 0)


def test_parse_blocks_per_product_and_both():
  got = groups.parse_blocks(" up.tail_m=16, num_stages=3 ,down.last_m=0")
  assert got == {"up": {"tail_m": 16, "num_stages": 3}, "down": {"num_stages": 3, "last_m": 0}}
  assert groups.parse_blocks("") == {"up": {}, "down": {}}


@pytest.mark.parametrize("spec,message", [
    ("tail_m", "write FIELD=VALUE"), ("mid.tail_m=16", "the product 'mid' is unknown"),
    ("up.tail=16", "'tail' is not a Blocks field"), ("block_n=wide", "'wide' is not an integer"),
    ("num_warps=0", "num_warps must be >= 1"), ("tail_m=-16", "tail_m must be >= 0")])
def test_parse_blocks_says_what_is_wrong(spec, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    groups.parse_blocks(spec)


def test_with_blocks_checks_the_tiles():
  b = groups.with_blocks(groups.DEFAULT_BLOCKS, {"tail_m": 32, "block_n": 128})
  assert (b.tail_m, b.block_n, b.block_m) == (32, 128, 128)
  for changes, message in (({"block_n": 96}, "block_n=96 must be a power of two"),
                           ({"block_k": 8}, "block_k=8 must be a power of two, at least 16"),
                           ({"tail_m": 24}, "tail_m=24 must be 0 or a power of two"),
                           ({"block_m": 64, "last_m": 64}, "below block_m=64")):
    with pytest.raises(ValueError, match=re.escape(message)):
      groups.with_blocks(groups.DEFAULT_BLOCKS, changes)


def test_blocks_that_cannot_launch_or_fit_are_refused():
  with pytest.raises(ValueError, match="num_warps=3 must be a power of two up to 16"):
    groups.with_blocks(groups.DEFAULT_BLOCKS, {"num_warps": 3})
  assert groups.smem_error(groups.DEFAULT_BLOCKS, weights=1) is None
  assert groups.smem_error(groups.SWIGLU_UP_BLOCKS, weights=2) is None
  why = groups.smem_error(groups.Blocks(block_k=128), weights=1)
  assert "take 384 KiB of shared memory, over the 227 KiB" in why


def test_pairs_interleave_any_leading_axes_and_slice_over_tp_whole():
  up, gate = (jax.random.normal(jax.random.PRNGKey(i), (2, 3, 4, 6)) for i in (0, 1))
  w = groups.interleave_pairs(up, gate)  # the model's [L, E, D, 2F]
  assert w.shape == (2, 3, 4, 12)
  np.testing.assert_array_equal(w[..., 4], up[..., 2])
  np.testing.assert_array_equal(w[..., 5], gate[..., 2])
  for a, b in zip(groups.split_pairs(w), (up, gate), strict=True):
    np.testing.assert_array_equal(a, b)
  # tp rank r of 2 holds columns r*6:(r+1)*6 of 2F: the pairs of F's slice r*3:(r+1)*3.
  for r in range(2):
    np.testing.assert_array_equal(
        w[..., r * 6:(r + 1) * 6],
        groups.interleave_pairs(up[..., r * 3:(r + 1) * 3], gate[..., r * 3:(r + 1) * 3]))
