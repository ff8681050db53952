"""Grouped matmul over expert-sorted rows, whose cost follows the real rows.

Rows `x_MxK` are sorted by group (expert); `group_sizes_G` says how many belong to
each, in order, and may sum to less than M (a worst-case receive buffer whose tail is
empty). Group g's rows are multiplied by `w_GxKxN[g]`. Each program of the Pallas
Triton kernel here computes one (row tile, column tile) of one group and skips rows
outside it, in the program order of kernels/groups.py, so the weights of each non-empty
group are read about once from HBM and the FLOPs are those of the real rows rounded up
to `block_m` per group: the padded batched einsum's cost grows with the largest group
times the number of groups instead (shared/GPU.md).

`impl`: "pallas" (the Triton kernel; GPU), "interpret" (the same kernel run by the
Pallas interpreter: CPU tests), "xla" (`jax.lax.ragged_dot`: the reference, and the
path on CPU; on NVIDIA XLA rewrites it as a masked dense product over all groups, ten
times slower, shared/GPU.md). All compute the same function.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jax_ep.kernels.groups import (
  DEFAULT_BLOCKS,
  SWIGLU_UP_BLOCKS,
  Blocks,
  activate,
  locate,
  parse_blocks,
  small_tiles_error,
  smem_error,
  tile_table,
  with_blocks,
)

IMPLS = ("xla", "pallas", "interpret")
# "swiglu_pairs": SwiGLU from one weight whose columns interleave up and gate
# (interleave_pairs): one MMA a K step in place of two, half as many output columns.
ACTIVATIONS = ("none", "gelu", "swiglu", "swiglu_pairs")


def _kernel(table_ref, x_ref, w_ref, *rest, blocks: Blocks, k_steps: int, n_tiles: int,
            activation: str, split_k: int):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  if activation == "swiglu":
    wg_ref, o_ref = rest
  else:
    (o_ref,) = rest
  bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
  # With split_k > 1, program (pid, s) sums the s-th of split_k slices of K into its own
  # float32 partial; the caller adds the partials and applies the activation.
  k0 = pl.program_id(1) * k_steps if split_k > 1 else 0
  live, g, n, row0, rows_left = locate(table_ref, pl.program_id(0), bm, n_tiles)
  cols = pl.ds(pl.multiple_of(n * bn, bn), bn)
  gated = activation == "swiglu"
  pairs = activation == "swiglu_pairs"
  out_cols = pl.ds(pl.multiple_of(n * (bn // 2), bn // 2), bn // 2) if pairs else cols

  def dot(a, b):
    # float32 models (the agreement tests) multiply in full float32, not TF32.
    exact = a.dtype == jnp.float32
    return jnp.dot(a, b, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST if exact else None)

  def tile(height, tail=0):
    # (rows, mask) of the tile's `height` rows, then of its group's last `tail` rows.
    parts = [(pl.ds(row0, height), (jnp.arange(height, dtype=jnp.int32) < rows_left)[:, None])]
    if tail:
      parts.append((pl.ds(row0 + height, tail),
                    (jnp.arange(tail, dtype=jnp.int32) < rows_left - height)[:, None]))
    w_refs = (w_ref, wg_ref) if gated else (w_ref,)

    def step(k, accs):
      ks = pl.ds(pl.multiple_of((k0 + k) * bk, bk), bk)
      ws, out = [], []
      for (rows, mask), acc in zip(parts, accs, strict=True):
        x = plgpu.load(x_ref.at[rows, ks], mask=mask, other=0.0)
        new = []
        for j, ref in enumerate(w_refs):
          if len(ws) == j:  # each weight tile loaded once a step, for every part
            ws.append(ref[g, ks, cols])
          new.append(acc[j] + dot(x, ws[j]))
        out.append(tuple(new))
      return tuple(out)

    init = tuple((jnp.zeros((h, bn), jnp.float32),) * len(w_refs)
                 for h in [height] + ([tail] if tail else []))
    accs = jax.lax.fori_loop(0, k_steps, step, init)
    for (rows, mask), acc in zip(parts, accs, strict=True):
      if split_k > 1:
        plgpu.store(o_ref.at[rows, cols], acc[0], mask=mask)
      else:
        y = activate(acc[0], acc[-1], activation)
        plgpu.store(o_ref.at[rows, out_cols], y.astype(o_ref.dtype), mask=mask)

  rest = live
  if 0 < blocks.tail_m < bm and split_k == 1:
    # The tile before a group's last few rows computes them too (tile_table's tail_m).
    tail = (rows_left > bm) & (rows_left <= bm + blocks.tail_m)
    pl.when(live & tail)(lambda: tile(bm, blocks.tail_m))
    rest = live & ~tail
  if 0 < blocks.last_m < bm:
    # A group's nearly empty last tile: fewer MMA rows, the same weight tile loads.
    small = rows_left <= blocks.last_m
    pl.when(rest & small)(lambda: tile(blocks.last_m))
    pl.when(rest & ~small)(lambda: tile(bm))
  else:
    pl.when(rest)(lambda: tile(bm))


def _pallas(x_pad, m, w_GxKxN, group_sizes_G, wg_GxKxN, activation, blocks: Blocks,
            interpret: bool, split_k: int = 1):
  """The kernel on rows x_pad [R, K], R >= m + block_m (rows past m are padding, so the
  last tile's masked slice stays in bounds); returns [R, N], rows past the real ones
  unset."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  k = x_pad.shape[1]
  g, _, n = w_GxKxN.shape
  bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
  n_tiles = n // bn
  if split_k > 1:
    # Few row tiles (one expert per device): more programs, each on a slice of K. The
    # gate of SwiGLU is then a product of its own.
    parts = [_pallas_partial(x_pad, m, w, group_sizes_G, blocks, interpret, split_k)
             for w in ((w_GxKxN,) if wg_GxKxN is None else (w_GxKxN, wg_GxKxN))]
    return _reduce_partials(parts, m, group_sizes_G, activation, blocks, interpret,
                            x_pad.dtype)
  # At most cdiv(M, bm) + G - 1 row tiles hold a real row (each group adds at most one
  # partial tile); the rest of the grid exits at once.
  programs = (pl.cdiv(m, bm) + g) * n_tiles
  n_out = n // 2 if activation == "swiglu_pairs" else n
  table = kernel_table(group_sizes_G, blocks)
  weights = (w_GxKxN,) if wg_GxKxN is None else (w_GxKxN, wg_GxKxN)
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  rows = x_pad.shape[0]
  return pl.pallas_call(
      functools.partial(_kernel, blocks=blocks, k_steps=k // bk, n_tiles=n_tiles,
                        activation=activation, split_k=1),
      out_shape=jax.ShapeDtypeStruct((rows, n_out), x_pad.dtype),
      grid=(programs,),
      in_specs=[full(table.shape), full(x_pad.shape)] + [full(w.shape) for w in weights],
      out_specs=full((rows, n_out)),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret,
      name=f"grouped_matmul_{activation}",
  )(table, x_pad, *weights)


def kernel_table(group_sizes_G: jax.Array, blocks: Blocks) -> jax.Array:
  """The tile table of a launch without split-K: a group's last few rows merged into the
  tile before them where the kernel's tail path computes them (Blocks.tail_m)."""
  bm = blocks.block_m
  return tile_table(group_sizes_G, bm, blocks.tail_m if 0 < blocks.tail_m < bm else 0)


def _pallas_partial(x_pad, m, w_GxKxN, group_sizes_G, blocks: Blocks, interpret: bool,
                    split_k: int):
  """split_k float32 partial products [split_k, R, N], summed: x @ w in float32."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  k = x_pad.shape[1]
  g, _, n = w_GxKxN.shape
  bm, bn, bk = blocks.block_m, blocks.block_n, blocks.block_k
  if k % (bk * split_k):
    raise ValueError(f"K={k} does not split into {split_k} slices of block_k={bk} steps")
  n_tiles = n // bn
  programs = (pl.cdiv(m, bm) + g) * n_tiles
  table = tile_table(group_sizes_G, bm)
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  rows = x_pad.shape[0]
  out = pl.pallas_call(
      functools.partial(_kernel, blocks=blocks, k_steps=k // bk // split_k, n_tiles=n_tiles,
                        activation="none", split_k=split_k),
      out_shape=jax.ShapeDtypeStruct((split_k, rows, n), jnp.float32),
      grid=(programs, split_k),
      in_specs=[full(table.shape), full(x_pad.shape), full(w_GxKxN.shape)],
      out_specs=pl.BlockSpec((None, rows, n), lambda i, s: (s, 0, 0)),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret,
      name="grouped_matmul_split_k",
  )(table, x_pad, w_GxKxN)
  return out


def _reduce_kernel(table_ref, *refs, blocks: Blocks, n_tiles: int, split_k: int,
                   activation: str):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  *part_refs, o_ref = refs
  bm, bn = blocks.block_m, blocks.block_n
  live, _, n, row0, rows_left = locate(table_ref, pl.program_id(0), bm, n_tiles)
  mask_M1 = (jnp.arange(bm, dtype=jnp.int32) < rows_left)[:, None]
  rows, cols = pl.ds(row0, bm), pl.ds(pl.multiple_of(n * bn, bn), bn)
  out_cols = (pl.ds(pl.multiple_of(n * (bn // 2), bn // 2), bn // 2)
              if activation == "swiglu_pairs" else cols)

  @pl.when(live)
  def _():
    sums = []
    for ref in part_refs:
      acc = jnp.zeros((bm, bn), jnp.float32)
      for s in range(split_k):
        acc += plgpu.load(ref.at[pl.ds(s, 1), rows, cols], mask=mask_M1[None],
                          other=0.0)[0]
      sums.append(acc)
    y = activate(sums[0], sums[-1], activation)
    plgpu.store(o_ref.at[rows, out_cols], y.astype(o_ref.dtype), mask=mask_M1)


def _reduce_partials(parts, m, group_sizes_G, activation, blocks: Blocks, interpret: bool,
                     dtype):
  """Sums split-K partials [split, R, N] and applies the activation, on the real rows'
  tiles only (the partials' other rows are never written, and never read)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  split_k, rows, n = parts[0].shape
  g = group_sizes_G.shape[0]
  bm, bn = blocks.block_m, blocks.block_n
  n_tiles = n // bn
  table = tile_table(group_sizes_G, bm)
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  n_out = n // 2 if activation == "swiglu_pairs" else n
  return pl.pallas_call(
      functools.partial(_reduce_kernel, blocks=blocks, n_tiles=n_tiles, split_k=split_k,
                        activation=activation),
      out_shape=jax.ShapeDtypeStruct((rows, n_out), dtype),
      grid=((pl.cdiv(m, bm) + g) * n_tiles,),
      in_specs=[full(table.shape)] + [full(p.shape) for p in parts],
      out_specs=full((rows, n_out)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name=f"grouped_matmul_reduce_{activation}",
  )(table, *parts)


def _xla(x_MxK, w_GxKxN, group_sizes_G, wg_GxKxN, activation):
  dot = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes_G.astype(jnp.int32),
                          preferred_element_type=jnp.float32)
  acc = dot(x_MxK, w_GxKxN)
  gate = dot(x_MxK, wg_GxKxN) if wg_GxKxN is not None else None
  y = activate(acc, gate, activation)
  # ragged_dot leaves rows past sum(group_sizes) zero; the kernel leaves them unwritten.
  # Zero them here too so the two agree on every row.
  real = jnp.arange(x_MxK.shape[0]) < jnp.sum(group_sizes_G)
  return jnp.where(real[:, None], y, 0).astype(x_MxK.dtype)


def supports(x_MxK, w_GxKxN, blocks: Blocks = DEFAULT_BLOCKS) -> str | None:
  """Why the Pallas kernel cannot take these shapes, or None if it can."""
  return _supports(x_MxK.shape[1], w_GxKxN.shape[1], w_GxKxN.shape[2], blocks)


def _supports(k: int, k2: int, n: int, blocks: Blocks) -> str | None:
  if k != k2:
    return f"contraction sizes differ: x has {k}, w has {k2}"
  if k % blocks.block_k or n % blocks.block_n:
    return (f"K={k} and N={n} must be multiples of block_k={blocks.block_k} and "
            f"block_n={blocks.block_n}")
  return small_tiles_error(blocks)


def mlp_blocks(d: int, f: int, swiglu: bool = False, spec: str = "",
               pairs: bool = False) -> tuple[Blocks, Blocks]:
  """(up, down) Blocks of a D x F expert MLP: the measured defaults (SWIGLU_UP_BLOCKS for
  SwiGLU's fused up product of two weights; with pairs, SwiGLU's one interleaved [D, 2F]
  weight takes DEFAULT_BLOCKS), changed as `spec` says (groups.parse_blocks, e.g. "up.tail_m=16"),
  then narrowed to the shapes (blocks_for). ValueError for a bad spec."""
  changes = parse_blocks(spec)
  out = []
  fused = swiglu and not pairs  # two up weights, two MMAs a K step
  up_default = SWIGLU_UP_BLOCKS if fused else DEFAULT_BLOCKS
  for name, default, k, n in (("up", up_default, d, 2 * f if pairs else f),
                              ("down", DEFAULT_BLOCKS, f, d)):
    try:
      b = blocks_for(k, n, with_blocks(default, changes[name]))
      if why := smem_error(b, weights=2 if fused and name == "up" else 1):
        raise ValueError(why)
      out.append(b)
    except ValueError as e:
      raise ValueError(f"the {name} product's {e}") from None
  return tuple(out)


def mlp_supports(d: int, f: int, swiglu: bool = False, spec: str = "",
                 pairs: bool = False) -> str | None:
  """Why grouped_mlp's kernels cannot take a D x F expert MLP with these blocks
  (mlp_blocks; pairs: SwiGLU's interleaved [D, 2F] up weight), or None if they can."""
  up, down = mlp_blocks(d, f, swiglu, spec, pairs)
  return _supports(d, d, 2 * f if pairs else f, up) or _supports(f, f, d, down)


def _check_operands(x_MxK, w_GxKxN, group_sizes_G, w_gate_GxKxN=None, what="grouped_matmul"):
  """ValueError naming the operand whose shape cannot go with the others."""
  if x_MxK.ndim != 2 or w_GxKxN.ndim != 3 or group_sizes_G.ndim != 1:
    raise ValueError(f"{what}: x must be [M, K], w [G, K, N] and group_sizes [G]; got "
                     f"{x_MxK.shape}, {w_GxKxN.shape} and {group_sizes_G.shape}")
  g, k, _ = w_GxKxN.shape
  if group_sizes_G.shape[0] != g:
    raise ValueError(f"{what}: group_sizes has {group_sizes_G.shape[0]} groups and w "
                     f"{g} matrices; give one size per matrix")
  if x_MxK.shape[1] != k:
    raise ValueError(f"{what}: x has K={x_MxK.shape[1]} columns and w K={k} rows; they "
                     "must be equal")
  if w_gate_GxKxN is not None and w_gate_GxKxN.shape != w_GxKxN.shape:
    raise ValueError(f"{what}: w_gate has shape {w_gate_GxKxN.shape}, w {w_GxKxN.shape}; "
                     "they must be equal")


def grouped_matmul(x_MxK: jax.Array, w_GxKxN: jax.Array, group_sizes_G: jax.Array, *,
                   activation: str = "none", w_gate_GxKxN: jax.Array | None = None,
                   impl: str = "xla", blocks: Blocks | None = None) -> jax.Array:
  """act(x[rows of g] @ w[g]) for each group g; rows past sum(group_sizes) come out zero
  ("xla") or unspecified (kernels: callers never read them).

  Args:
    x_MxK: rows sorted by group.
    w_GxKxN: one matrix per group.
    group_sizes_G: int32, rows of each group, in order; sum <= M.
    activation: "none", "gelu" (tanh form, as jax.nn.gelu), or "swiglu":
      silu(x @ w_gate) * (x @ w), fused so each row tile reads both; or "swiglu_pairs":
      the same from one w of interleaved columns (groups.interleave_pairs), [M, N / 2].
    impl: "xla", "pallas" or "interpret" (module docstring).
    blocks: the kernel's tiles; None: DEFAULT_BLOCKS narrowed to K and N (blocks_for).
  Returns:
    [M, N] in x's dtype, accumulated in float32.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: use one of {IMPLS}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}: use one of {ACTIVATIONS}")
  if (activation == "swiglu") != (w_gate_GxKxN is not None):
    raise ValueError("w_gate_GxKxN is given exactly when activation='swiglu'")
  _check_operands(x_MxK, w_GxKxN, group_sizes_G, w_gate_GxKxN)
  if impl == "xla":
    return _xla(x_MxK, w_GxKxN, group_sizes_G, w_gate_GxKxN, activation)
  if blocks is None:
    blocks = blocks_for(*w_GxKxN.shape[1:])
  why = supports(x_MxK, w_GxKxN, blocks)
  if why:
    raise ValueError(f"grouped_matmul impl={impl!r}: {why}; give blocks that tile them "
                     "(blocks_for(K, N) narrows a Blocks to K and N), or use impl='xla'.")
  m = x_MxK.shape[0]
  x_pad = jnp.pad(x_MxK, ((0, blocks.block_m), (0, 0)))
  return _pallas(x_pad, m, w_GxKxN, group_sizes_G, w_gate_GxKxN, activation, blocks,
                 interpret=impl == "interpret")[:m]


def grouped_mlp(x_MxD: jax.Array, group_sizes_G: jax.Array, w_up_GxDxF: jax.Array,
                w_down_GxFxD: jax.Array, w_gate_GxDxF: jax.Array | None = None, *,
                impl: str = "xla", blocks: Blocks | tuple[Blocks, Blocks] | None = None,
                expected_rows: int | None = None, padded: bool = False,
                pairs: bool = False) -> jax.Array:
  """Each group's expert MLP on its rows: gelu(x W_up) W_down, or with w_gate the
  SwiGLU form (silu(x W_gate) * x W_up) W_down. Rows past sum(group_sizes) are zero
  ("xla") or unspecified (kernels).

  pairs: w_up_GxDxF is SwiGLU's up and gate weights interleaved, [G, D, 2F]
  (groups.interleave_pairs), and w_gate_GxDxF is None: one MMA a K step.

  padded: return the kernels' output as they write it, [M + pad, D] with the pad rows
  unspecified, for a consumer that reads rows by index (the MoE combine): slicing it to
  [M, D] would copy it. The XLA path returns [M, D] either way.

  `blocks` may be one Blocks or (up, down); None picks the measured defaults, narrowed
  to the shapes (mlp_blocks). `expected_rows` (the real rows of a typical call, M if
  None) sets split-K: with few row tiles, K is split so the GPU has enough programs.
  The kernels keep the hidden [M + pad, F] padded between the two products, so nothing
  is copied between them.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r}: use one of {IMPLS}")
  if pairs and w_gate_GxDxF is not None:
    raise ValueError("grouped_mlp: with pairs=True, w_up holds the gate too; pass no w_gate")
  _check_operands(x_MxD, w_up_GxDxF, group_sizes_G, w_gate_GxDxF, "grouped_mlp (up)")
  d, f = w_up_GxDxF.shape[1:]
  f //= 2 if pairs else 1
  if w_down_GxFxD.shape != (w_up_GxDxF.shape[0], f, d):
    raise ValueError(f"grouped_mlp: w_down has shape {w_down_GxFxD.shape}; with w_up of "
                     f"{w_up_GxDxF.shape}{' (pairs)' if pairs else ''} it must be "
                     f"{(w_up_GxDxF.shape[0], f, d)} [G, F, D]")
  activation = "swiglu_pairs" if pairs else "gelu" if w_gate_GxDxF is None else "swiglu"
  if blocks is None:
    up, down = mlp_blocks(d, f, swiglu=w_gate_GxDxF is not None, pairs=pairs)
  else:
    up, down = blocks if isinstance(blocks, tuple) else (blocks, blocks)
  if impl in ("pallas", "interpret"):
    m = x_MxD.shape[0]
    bad = (_supports(d, d, w_up_GxDxF.shape[2], up)
           or _supports(f, w_down_GxFxD.shape[1], d, down))
    if bad:
      raise ValueError(f"grouped_mlp impl={impl!r}: {bad}; use impl='xla'.")
    interpret = impl == "interpret"
    rows = expected_rows or m
    up, down = narrow_for(rows, w_up_GxDxF.shape, up), narrow_for(rows, w_down_GxFxD.shape, down)
    x_pad = jnp.pad(x_MxD, ((0, max(up.block_m, down.block_m)), (0, 0)))
    h_pad = _pallas(x_pad, m, w_up_GxDxF, group_sizes_G, w_gate_GxDxF, activation, up,
                    interpret, split_for(rows, w_up_GxDxF.shape, up))
    y_pad = _pallas(h_pad, m, w_down_GxFxD, group_sizes_G, None, "none", down, interpret,
                    split_for(rows, w_down_GxFxD.shape, down))
    return y_pad if padded else y_pad[:m]
  h_MxF = grouped_matmul(x_MxD, w_up_GxDxF, group_sizes_G, activation=activation,
                         w_gate_GxKxN=w_gate_GxDxF, impl=impl)
  return grouped_matmul(h_MxF, w_down_GxFxD, group_sizes_G, impl=impl)


# Programs a launch should have at least, so every SM streams weights: about two waves
# of an H100's / H200's 132 SMs (measured: a one-expert down product of 32 programs ran
# at 1.95 TB/s).
MIN_PROGRAMS = 256


def split_for(rows: int, w_shape, blocks: Blocks) -> int:
  """split_k for a product of `rows` typical real rows with weights [G, K, N]: the
  smallest power of two that gives MIN_PROGRAMS programs, keeping 8 K-steps each."""
  g, k, n = w_shape
  tiles = max(min(g, rows), -(-rows // blocks.block_m))
  programs = tiles * (n // blocks.block_n)
  split = 1
  while programs * split < MIN_PROGRAMS and k % (2 * split * blocks.block_k) == 0 \
      and k // (2 * split * blocks.block_k) >= 8:
    split *= 2
  return split


def narrow_for(rows: int, w_shape, blocks: Blocks) -> Blocks:
  """Narrower column tiles (down to 128) when the launch would have too few programs, so
  split_for needs fewer float32 partials."""
  g, _, n = w_shape
  tiles = max(min(g, rows), -(-rows // blocks.block_m))
  while tiles * (n // blocks.block_n) < MIN_PROGRAMS and blocks.block_n > 128 \
      and n % (blocks.block_n // 2) == 0:
    blocks = dataclasses.replace(blocks, block_n=blocks.block_n // 2)
  return blocks


def blocks_for(k: int, n: int, preferred: Blocks = DEFAULT_BLOCKS) -> Blocks:
  """`preferred`, with block_k and block_n shrunk (halving, down to 16) until they divide
  K and N: small models (the tests' tiny one) run the same kernel."""
  bk, bn = preferred.block_k, preferred.block_n
  while bk > 16 and k % bk:
    bk //= 2
  while bn > 16 and n % bn:
    bn //= 2
  return dataclasses.replace(preferred, block_k=bk, block_n=bn)
