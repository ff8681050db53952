"""Tests for jax_ep/kernels/grouped_matmul.py: the Pallas kernel (through the interpreter)
and the XLA path against a dense per-group reference, on random, empty, all-to-one and
skewed group sizes, with and without split-K, GELU and SwiGLU."""


import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from jax_ep.experts import expert_mlp
from jax_ep.kernels import grouped_matmul as gm
from jax_ep.kernels import groups

G, M, D, F = 4, 40, 64, 128
BLOCKS = gm.Blocks(block_m=16, block_n=32, block_k=32)
SIZES = {
    "random": [10, 0, 17, 5],
    "empty": [0, 0, 0, 0],
    "all_to_one": [0, 0, 0, 40],
    "skewed": [33, 1, 2, 4],
    "buffer_tail": [3, 8, 0, 1],  # 12 real rows in a 40-row buffer
}


def _weights(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return f(M, D), f(G, D, F) / 8, f(G, F, D) / 11, f(G, D, F) / 8


def _dense(x, sizes, up, down, gate):
  """Each group's rows through its expert alone (experts.expert_mlp), zeros after."""
  out, start = [], 0
  for g, n in enumerate(sizes):
    w = (up[g:g + 1], down[g:g + 1], None if gate is None else gate[g:g + 1])
    out.append(expert_mlp(x[None, start:start + n], *w)[0])
    start += n
  return jnp.concatenate(out + [jnp.zeros((M - start, D))])


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_and_xla_equal_the_dense_reference(name, gated):
  x, up, down, gate = _weights()
  gate = gate if gated else None
  sizes = SIZES[name]
  gs = jnp.asarray(sizes, jnp.int32)
  want = _dense(x, sizes, up, down, gate)
  real = sum(sizes)
  xla = gm.grouped_mlp(x, gs, up, down, gate, impl="xla")
  assert_allclose(xla, want, rtol=1e-5, atol=1e-5)  # rows past the real ones are zero
  got = gm.grouped_mlp(x, gs, up, down, gate, impl="interpret", blocks=BLOCKS)
  assert_allclose(got[:real], want[:real], rtol=1e-5, atol=1e-5)
  # padded: the kernels' own buffer, its first M rows the same; the XLA path's [M, D].
  pad = gm.grouped_mlp(x, gs, up, down, gate, impl="interpret", blocks=BLOCKS, padded=True)
  assert pad.shape == (M + BLOCKS.block_m, D)
  assert_allclose(pad[:real], got[:real], rtol=0, atol=0)
  assert gm.grouped_mlp(x, gs, up, down, gate, impl="xla", padded=True).shape == (M, D)


# Last tiles of 9 and 8 rows around last_m=8 (25 = 16 + 9, then 8, then 7), beside SIZES.
EDGE = {"edge": [25, 8, 7, 0]}


@pytest.mark.parametrize("gated", [False, True])
def test_small_last_tiles_compute_the_same(gated):
  # last_m=8: a tile with at most 8 real rows runs an 8-row MMA; one with more (the 9 of
  # "edge", "random"'s 10 and 17) keeps the full 16 and would lose rows on the small
  # path. Split-K takes the same path.
  x, up, down, gate = _weights(2)
  gate = gate if gated else None
  small = gm.Blocks(block_m=16, block_n=32, block_k=32, last_m=8)
  for name, sizes in sorted({**SIZES, **EDGE}.items()):
    gs = jnp.asarray(sizes, jnp.int32)
    want = _dense(x, sizes, up, down, gate)[:sum(sizes)]
    got = gm.grouped_mlp(x, gs, up, down, gate, impl="interpret", blocks=small)
    assert_allclose(got[:sum(sizes)], want, rtol=1e-5, atol=1e-5, err_msg=name)
    pad = jnp.pad(x, ((0, small.block_m), (0, 0)))
    act = "swiglu" if gated else "gelu"
    h = gm._pallas(pad, M, up, gs, gate, act, small, True, split_k=2)
    y = gm._pallas(h, M, down, gs, None, "none", small, True, split_k=2)[:M]
    assert_allclose(y[:sum(sizes)], want, rtol=1e-5, atol=1e-5, err_msg=name)


# Around tail_m=8 with 16-row tiles: 24 = 16 + 8 (merged), 25 = 16 + 9 (not), 8 alone
# (a single tile: not merged), 40 = 16 + 16 + 8 (merged into the second tile).
TAILS = {"tails": [24, 8, 25, 0], "long": [40, 0, 0, 0], "random": SIZES["random"]}


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tail_m,last_m", [(8, 0), (8, 8), (4, 8)])
def test_tails_in_the_tile_before_compute_the_same(gated, tail_m, last_m):
  x, up, down, gate = _weights(3)
  x = jnp.concatenate([x, x[:32]])  # 72 rows: room for "tails"
  gate = gate if gated else None
  blocks = gm.Blocks(block_m=16, block_n=32, block_k=32, tail_m=tail_m, last_m=last_m)
  for name, sizes in sorted(TAILS.items()):
    gs = jnp.asarray(sizes, jnp.int32)
    want = _dense(x[:M], sizes, up, down, gate)[:sum(sizes)] if sum(sizes) <= M else None
    if want is None:  # more rows than _dense's M: each group's own reference
      want = jnp.concatenate([
          expert_mlp(x[None, s:s + n], up[g:g + 1], down[g:g + 1],
                     None if gate is None else gate[g:g + 1])[0]
          for g, (s, n) in enumerate(zip(np.cumsum(sizes) - sizes, sizes, strict=True))])
    got = gm.grouped_mlp(x, gs, up, down, gate, impl="interpret", blocks=blocks)
    assert_allclose(got[:sum(sizes)], want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_tails_store_only_their_rows_and_save_a_program():
  # 17 = 16 + 1 rows: the tail path stores 1 of its 8 rows; the rows past the last group
  # stay unset (NaN in the interpreter) as without tails, not written by a tail.
  x, up, _, _ = _weights(4)
  sizes = [10, 0, 17, 0]
  gs = jnp.asarray(sizes, jnp.int32)
  pad = jnp.pad(x, ((0, 16), (0, 0)))
  tails = gm.Blocks(block_m=16, block_n=32, block_k=32, tail_m=8)
  unset = lambda b: np.isnan(np.asarray(gm._pallas(pad, M, up, gs, None, "none", b, True)))
  np.testing.assert_array_equal(unset(tails), unset(BLOCKS))
  assert not unset(tails)[:sum(sizes)].any()
  # The launch's table merges the tail (one row tile fewer); an invalid tail_m does not.
  assert int(gm.kernel_table(gs, tails)[4, 0]) == 2
  assert int(gm.kernel_table(gs, BLOCKS)[4, 0]) == 3
  assert int(gm.kernel_table(gs, gm.Blocks(block_m=16, tail_m=16))[4, 0]) == 3


def test_small_last_tile_is_in_the_kernel_and_checked():
  # The kernel holds an 8-row tile body only with last_m=8 (x loads of [8, block_k]).
  x, up, _, _ = _weights()
  gs = jnp.asarray(EDGE["edge"], jnp.int32)
  pad = jnp.pad(x, ((0, BLOCKS.block_m), (0, 0)))
  jaxpr = lambda b: str(jax.make_jaxpr(
      lambda p: gm._pallas(p, M, up, gs, None, "gelu", b, True))(pad))
  small = gm.Blocks(block_m=16, block_n=32, block_k=32, last_m=8)
  assert "f32[8,32]" in jaxpr(small) and "f32[8,32]" not in jaxpr(BLOCKS)
  for bad in (12, 16, 32):  # not a power of two; not below block_m
    for name in ("last_m", "tail_m"):
      with pytest.raises(ValueError, match=name):
        gm.grouped_matmul(x, up, gs, impl="interpret", blocks=gm.Blocks(
            block_m=16, block_n=32, block_k=32, **{name: bad}))


@pytest.mark.parametrize("split_k", [2])
def test_split_k_sums_to_the_same(split_k):
  x, up, down, gate = _weights(1)
  sizes = SIZES["random"]
  gs = jnp.asarray(sizes, jnp.int32)
  pad = jnp.pad(x, ((0, BLOCKS.block_m), (0, 0)))
  for g, act in ((None, "gelu"), (gate, "swiglu")):
    h = gm._pallas(pad, M, up, gs, g, act, BLOCKS, True, split_k=split_k)
    y = gm._pallas(h, M, down, gs, None, "none", BLOCKS, True, split_k=split_k)[:M]
    want = _dense(x, sizes, up, down, g)
    assert_allclose(y[:sum(sizes)], want[:sum(sizes)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["random", "skewed", "buffer_tail", "empty"])
def test_interleaved_pairs_equal_the_dense_swiglu(name):
  # SwiGLU's up and gate as one [G, D, 2F] weight (one MMA a K step): the kernel (plain,
  # with a tail, split-K) and the XLA path against each expert's own SwiGLU MLP.
  x, up, down, gate = _weights(5)
  sizes = SIZES[name]
  gs = jnp.asarray(sizes, jnp.int32)
  w = groups.interleave_pairs(up, gate)
  assert w.shape == (G, D, 2 * F)
  np.testing.assert_array_equal(w[:, :, 0::2], up)
  np.testing.assert_array_equal(w[:, :, 1::2], gate)
  for a, b in zip(groups.split_pairs(w), (up, gate), strict=True):
    np.testing.assert_array_equal(a, b)
  want = _dense(x, sizes, up, down, gate)[:sum(sizes)]
  xla = gm.grouped_mlp(x, gs, w, down, impl="xla", pairs=True)
  assert xla.shape == (M, D)
  assert_allclose(xla[:sum(sizes)], want, rtol=1e-5, atol=1e-5)
  for blocks in (BLOCKS, gm.Blocks(block_m=16, block_n=32, block_k=32, tail_m=8)):
    got = gm.grouped_mlp(x, gs, w, down, impl="interpret", blocks=blocks, pairs=True)
    assert_allclose(got[:sum(sizes)], want, rtol=1e-5, atol=1e-5, err_msg=str(blocks))
  pad = jnp.pad(x, ((0, BLOCKS.block_m), (0, 0)))
  h = gm._pallas(pad, M, w, gs, None, "swiglu_pairs", BLOCKS, True, split_k=2)
  assert h.shape == (M + BLOCKS.block_m, F)
  y = gm._pallas(h, M, down, gs, None, "none", BLOCKS, True)[:M]
  assert_allclose(y[:sum(sizes)], want, rtol=1e-5, atol=1e-5)


def test_interleaved_pairs_are_checked():
  x, up, down, gate = _weights()
  gs = jnp.asarray(SIZES["random"], jnp.int32)
  with pytest.raises(ValueError, match="no w_gate"):
    gm.grouped_mlp(x, gs, groups.interleave_pairs(up, gate), down, gate, pairs=True)
  with pytest.raises(ValueError, match=r"\(pairs\) it must be"):
    gm.grouped_mlp(x, gs, up, down, pairs=True)  # [G, D, F]: not interleaved pairs
  assert gm.mlp_blocks(8192, 32768, pairs=True)[0] == gm.DEFAULT_BLOCKS


def test_split_and_narrow_for_few_row_tiles():
  b = gm.DEFAULT_BLOCKS
  # 16 experts on 2048 rows: plenty of programs, no split.
  assert gm.split_for(2048, (16, 8192, 32768), b) == 1
  # One expert, 128 rows (a proposed-layout device): narrower tiles, then split K.
  down = gm.narrow_for(128, (1, 32768, 8192), b)
  assert down.block_n == 128
  assert gm.split_for(128, (1, 32768, 8192), down) == 4
  up = gm.narrow_for(128, (1, 8192, 32768), b)
  assert up.block_n == 128 and gm.split_for(128, (1, 8192, 32768), up) == 1
  with pytest.raises(ValueError, match="does not split"):
    x, w, _, _ = _weights()
    gm._pallas_partial(jnp.pad(x, ((0, 16), (0, 0))), M, w, jnp.asarray([1, 0, 0, 0]),
                       BLOCKS, True, split_k=4)


def test_blocks_for_small_shapes_and_errors():
  b = gm.blocks_for(64, 48)
  assert (b.block_k, b.block_n) == (64, 16)
  x, up, down, _ = _weights()
  with pytest.raises(ValueError, match="multiples of block_k"):
    gm.grouped_matmul(x, up, jnp.asarray([40, 0, 0, 0]), impl="interpret",
                      blocks=gm.Blocks(block_n=96))
  with pytest.raises(ValueError, match="impl="):
    gm.grouped_matmul(x, up, jnp.asarray([40, 0, 0, 0]), impl="cuda")


def test_mlp_blocks_take_the_defaults_and_the_changes():
  up, down = gm.mlp_blocks(8192, 32768, swiglu=True)
  assert (up, down) == (gm.SWIGLU_UP_BLOCKS, gm.DEFAULT_BLOCKS)
  assert gm.mlp_blocks(8192, 32768)[0] == gm.DEFAULT_BLOCKS
  up, down = gm.mlp_blocks(8192, 32768, swiglu=True, spec="up.tail_m=16,num_stages=3")
  assert (up.tail_m, up.last_m, up.block_n, up.num_stages) == (16, 64, 128, 3)
  assert (down.tail_m, down.num_stages, down.block_n) == (64, 3, 256)
  up, down = gm.mlp_blocks(64, 48, spec="block_n=256")  # narrowed to the shapes after
  assert (up.block_n, down.block_n, down.block_k) == (16, 64, 16)
  with pytest.raises(ValueError, match=re.escape("the down product's tail_m=128 must be")):
    gm.mlp_blocks(8192, 32768, spec="down.tail_m=128")
  with pytest.raises(ValueError, match=re.escape("the up product's last_m=64 (its default) "
                                                 "must be 0 or a power of two below block_m")):
    gm.mlp_blocks(8192, 32768, swiglu=True, spec="block_m=64,tail_m=0")  # SwiGLU up's last_m
  assert gm.mlp_supports(8192, 32768, swiglu=True, spec="up.tail_m=32") is None
  assert "multiples of block_k" in gm.mlp_supports(60, 128, spec="up.tail_m=32")


def test_shapes_that_cannot_go_together_are_named():
  x, up, down, _ = _weights()
  gs = jnp.asarray(SIZES["random"], jnp.int32)
  for impl in ("xla", "interpret"):
    for args, message in (((x, up, gs[:3]), "group_sizes has 3 groups and w 4 matrices"),
                          ((x[:, :32], up, gs), "x has K=32 columns and w K=64 rows"),
                          ((x, up[0], gs), "x must be [M, K], w [G, K, N]")):
      with pytest.raises(ValueError, match=re.escape(message)):
        gm.grouped_matmul(*args, impl=impl)
    with pytest.raises(ValueError, match=re.escape("w_down has shape (4, 64, 128)")):
      gm.grouped_mlp(x, gs, up, jnp.swapaxes(down, 1, 2), impl=impl)


def test_default_blocks_narrow_to_small_shapes():
  # K 64 and N 128 are below DEFAULT_BLOCKS' block_k x block_n (64 x 256): narrowed.
  x, up, _, _ = _weights()
  gs = jnp.asarray(SIZES["skewed"], jnp.int32)
  got = gm.grouped_matmul(x, up, gs, activation="gelu", impl="interpret")
  want = gm.grouped_matmul(x, up, gs, activation="gelu", impl="xla")
  assert_allclose(got[:sum(SIZES["skewed"])], want[:sum(SIZES["skewed"])], rtol=1e-5, atol=1e-5)


def test_blocks_over_shared_memory_are_refused_for_the_product_named():
  with pytest.raises(ValueError, match=r"the up product's num_stages=6 x \(block_m=128 \+ 2 x "
                     r"block_n=128\) x block_k=128 16-bit tiles take 576 KiB"):
    gm.mlp_blocks(8192, 32768, swiglu=True, spec="up.block_k=128")
  gm.mlp_blocks(8192, 32768, swiglu=False, spec="block_k=32,num_stages=6")  # 144 KiB: fits
