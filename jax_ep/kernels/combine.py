"""The MoE combine as a Pallas Triton kernel: each token's weighted sum of its picks' rows.

out[t] = sum_k weight[t, k] * y[slot[t, k]] (float32 sum, y's dtype out), where a slot
equal to y's real rows (a dropped pick, or no token) contributes nothing: routing.combine, the
XLA reference and the CPU path. Each program gathers the K rows of a block of tokens,
one column block at a time, with 16-byte loads along the row; XLA's fusion of the same
gather ran at a twentieth of the memory bandwidth on the H200 (benchmarks/NOTES.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK_T = 16  # tokens per program (T is padded to a multiple)


def block_d(d: int) -> int | None:
  """Columns per program: the widest power of two up to 512 that divides D."""
  return next((b for b in (512, 256, 128, 64, 32, 16) if d % b == 0), None)


def supports(t: int, d: int) -> bool:
  del t  # any T: padded
  return block_d(d) is not None


def _kernel(slot_ref, w_ref, y_ref, o_ref, *, picks: int, rows: int, bd: int):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  toks = pl.ds(pl.program_id(0) * BLOCK_T, BLOCK_T)
  col0 = pl.multiple_of(pl.program_id(1) * bd, bd)
  cols = pl.ds(col0, bd)
  cols_1xD = (col0 + jnp.arange(bd, dtype=jnp.int32))[None, :]
  acc = jnp.zeros((BLOCK_T, bd), jnp.float32)
  for k in range(picks):
    slot_T = slot_ref[toks, k]
    real_T = slot_T < rows
    # A gather of whole row blocks: both indices arrays (the interpreter's form too).
    rows_Tx1 = jnp.where(real_T, slot_T, 0)[:, None]
    y_TxD = plgpu.load(y_ref.at[rows_Tx1, cols_1xD], mask=real_T[:, None], other=0.0)
    acc += w_ref[toks, k].astype(jnp.float32)[:, None] * y_TxD.astype(jnp.float32)
  o_ref[toks, cols] = acc.astype(o_ref.dtype)


def combine(y_RxD: jax.Array, slot_TxK: jax.Array, weights_TxK: jax.Array, *,
            rows: int | None = None, interpret: bool = False) -> jax.Array:
  """sum_k weights[t, k] * y[slot[t, k]] -> [T, D] in y's dtype (slot == rows: nothing).

  rows: the real rows of y (default all R); y may carry padding rows past them, which
  are never read (the grouped kernel's padded output, taken without a copy).
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  t, k = slot_TxK.shape
  r, d = y_RxD.shape
  s = r if rows is None else rows
  if not 0 <= s <= r:
    raise ValueError(f"combine kernel: rows={rows} must be within y's {r} rows")
  bd = block_d(d)
  if bd is None:
    raise ValueError(f"combine kernel: D={d} must be a multiple of 16; use routing.combine")
  tp = -(-t // BLOCK_T) * BLOCK_T
  slot_TxK = jnp.pad(slot_TxK.astype(jnp.int32), ((0, tp - t), (0, 0)), constant_values=s)
  weights_TxK = jnp.pad(weights_TxK.astype(jnp.float32), ((0, tp - t), (0, 0)))
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  out = pl.pallas_call(
      functools.partial(_kernel, picks=k, rows=s, bd=bd),
      out_shape=jax.ShapeDtypeStruct((tp, d), y_RxD.dtype),
      grid=(tp // BLOCK_T, d // bd),
      in_specs=[full((tp, k)), full((tp, k)), full((r, d))],
      out_specs=full((tp, d)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="moe_combine",
  )(slot_TxK, weights_TxK, y_RxD)
  return out[:t]
