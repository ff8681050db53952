"""The grouped matmul with its operands swapped: weight columns on the MMA's M side, the
group's rows on its N side.

A decode step gives each expert a few hundred rows at most, and an uneven number
(the seed's random router: 30 to 265 of 2048). With rows on the M side (grouped_matmul's
`_kernel`) a group costs its rows rounded up to block_m = 128, and a group of 140 rows
runs two programs that each stream the same weight tile. Here one program computes
`w[g][:, cols]^T @ x[rows of g]^T` for all of a group's rows, up to `block_m` (256), so
its weight tile is read once; the rows are the MMA's N side, which Hopper's wgmma takes
in steps of 8, and they are rounded up to `row_quantum` (32) only: the kernel picks,
per program, a sum of power-of-two heights that covers them (224 = 128 + 64 + 32), each
its own accumulator, all fed by the same weight tile in one loop over K.

Rows outside the group are loaded unmasked (each output row depends on its own input
row only, and the store is masked), so `x_pad` needs block_m rows of padding past m.
Same contract as grouped_matmul's `_pallas`: [R, N] out, rows past the real ones unset.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_ep.kernels.groups import Blocks, activate, locate, tile_table


def heights(rows: int, block_m: int) -> tuple[tuple[int, int], ...]:
  """(offset, height) pieces, powers of two, largest first, that cover `rows` (a
  multiple of the quantum, at most block_m): 224 -> ((0, 128), (128, 64), (192, 32))."""
  out, off, h = [], 0, block_m
  while off < rows:
    while h > rows - off:
      h //= 2
    out.append((off, h))
    off += h
  return tuple(out)


def _kernel(table_ref, x_ref, w_ref, *rest, blocks: Blocks, k_steps: int, n_tiles: int,
            activation: str):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  gated = activation == "swiglu"
  ws = (w_ref, rest[0]) if gated else (w_ref,)
  o_ref = rest[-1]
  bm, bn, bk, q = blocks.block_m, blocks.block_n, blocks.block_k, blocks.row_quantum
  live, g, n, row0, rows_left = locate(table_ref, pl.program_id(0), bm, n_tiles)
  rows_here = jnp.minimum(rows_left, bm)
  padded = (rows_here + q - 1) // q * q
  cols = pl.ds(pl.multiple_of(n * bn, bn), bn)
  exact = x_ref.dtype == jnp.float32  # float32 models: full float32, not TF32
  # w [bk, bn] contracted on its dim 0, x [h, bk] on its dim 1: [bn, h] (swap AB).
  dims = (((0,), (1,)), ((), ()))

  def dot(w, x):
    return jax.lax.dot_general(w, x, dims, preferred_element_type=jnp.float32,
                               precision=jax.lax.Precision.HIGHEST if exact else None)

  def tile(pieces):
    # accs[i * len(ws) + j]: piece i's product with weight j (up, then gate).
    def step(k, accs):
      ks = pl.ds(pl.multiple_of(k * bk, bk), bk)
      w_tiles = [w[g, ks, cols] for w in ws]
      out = []
      for i, (off, h) in enumerate(pieces):
        x = x_ref[pl.ds(row0 + off, h), ks]
        out += [accs[i * len(ws) + j] + dot(w, x) for j, w in enumerate(w_tiles)]
      return tuple(out)

    zeros = tuple(jnp.zeros((bn, h), jnp.float32) for _, h in pieces for _ in ws)
    accs = jax.lax.fori_loop(0, k_steps, step, zeros)
    for i, (off, h) in enumerate(pieces):
      y_NxH = activate(accs[i * len(ws)], accs[i * len(ws) + len(ws) - 1], activation)
      mask_H1 = (jnp.arange(h, dtype=jnp.int32) + off < rows_here)[:, None]
      plgpu.store(o_ref.at[pl.ds(row0 + off, h), cols], y_NxH.T.astype(o_ref.dtype),
                  mask=mask_H1)

  for rows in range(q, bm + 1, q):
    pl.when(live & (padded == rows))(functools.partial(tile, heights(rows, bm)))


def matmul(x_pad, m, w_GxKxN, group_sizes_G, wg_GxKxN, activation, blocks: Blocks,
           interpret: bool):
  """act(x @ w[g]) on rows x_pad [R, K], R >= m + block_m; returns [R, N]."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  k = x_pad.shape[1]
  g, _, n = w_GxKxN.shape
  bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
  n_tiles = n // bn
  table = tile_table(group_sizes_G, bm)
  weights = (w_GxKxN,) if wg_GxKxN is None else (w_GxKxN, wg_GxKxN)
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  rows = x_pad.shape[0]
  return pl.pallas_call(
      functools.partial(_kernel, blocks=blocks, k_steps=k // bk, n_tiles=n_tiles,
                        activation=activation),
      out_shape=jax.ShapeDtypeStruct((rows, n), x_pad.dtype),
      grid=((pl.cdiv(m, bm) + g) * n_tiles,),
      in_specs=[full(table.shape), full(x_pad.shape)] + [full(w.shape) for w in weights],
      out_specs=full((rows, n)),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret,
      name=f"grouped_matmul_swap_ab_{activation}",
  )(table, x_pad, *weights)
