# ruff: noqa: B007, B023, B905, E501, E701, E702  (archived as it ran)
"""The grouped expert matmul as a warp-specialised Pallas Mosaic GPU kernel (Hopper).

The same function as kernels/grouped_matmul.py's Triton kernel, on the same layout
(rows sorted by group, packed, `group_sizes_G` real rows each; rows past the real ones
unset), but built the way Hopper's fast GEMMs are: a persistent grid of one CTA per SM,
one memory warpgroup streaming x and weight tiles through a ring of shared-memory
stages with TMA, and two compute warpgroups issuing wgmma on 64 rows each of the CTA's
128-row tile. A compute warpgroup whose 64 rows hold no real row skips its MMA, so a
group's rows cost their count rounded up to 64, not to 128 (the Triton kernel's bound on
skewed groups, benchmarks/NOTES.md section 6), and stores are exact: a ladder of
power-of-two TMA stores writes only the real rows of a tile (neighbouring groups share
row tiles in the packed layout).

Work items are numbered as kernels/groups.py numbers programs (group by group, column
tiles in turn, a group's row tiles adjacent), so the CTAs working on one group's weight
tile at one time share it through L2.

Runs on an NVIDIA Hopper GPU, or on the CPU under Mosaic GPU's interpreter (tests).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jax_ep.kernels.groups import activate

WG_ROWS = 64  # rows per compute warpgroup: wgmma's M
CTA_ROWS = 2 * WG_ROWS
ALIGN = 8  # row tiles start on a multiple of the swizzled x tile's 8 rows


@dataclasses.dataclass(frozen=True)
class MgpuBlocks:
  """A CTA's column tile, K step, shared-memory stages and epilogue tile width."""

  block_n: int = 256
  block_k: int = 64
  stages: int = 4
  epi_n: int = 64
  # wgmma groups a compute warpgroup keeps in flight past the one it issues: its shared
  # memory slot is released that many steps later (1: the next step's MMA is issued
  # before this one is awaited, so a warpgroup's tensor-core work does not stall on
  # wgmma's latency).
  delay: int = 1
  # CTAs of a cluster: they take adjacent column tiles of one row tile, and each x tile
  # is loaded once from L2 and multicast to all of them (the kernel is bound by what the
  # SMs load from L2: weights once per row tile, x once per column tile; NOTES section 7).
  cluster: int = 1
  # With a cluster of 2, "n": the pair takes adjacent column tiles of one row tile and
  # shares its x tile; "mn": a group's row tiles go in pairs that share each weight
  # tile (the pair takes adjacent row tiles of one column tile), and its odd last tile
  # in a pair along N as above.
  pairing: str = "n"
  # A compute warpgroup with no real row skips its wgmma (False: it runs them anyway).
  skip: bool = True

  def smem_bytes(self, weights: int = 1, itemsize: int = 2) -> int:
    ring = self.stages * (CTA_ROWS + weights * self.block_n) * self.block_k * itemsize
    return ring + 2 * 2 * WG_ROWS * self.epi_n * itemsize


DEFAULT_MGPU_BLOCKS = MgpuBlocks()
# SwiGLU streams two weight tiles a step and holds two accumulators a warpgroup.
SWIGLU_MGPU_BLOCKS = MgpuBlocks(block_n=128, stages=4)


def fit(k: int, n: int, preferred: MgpuBlocks = DEFAULT_MGPU_BLOCKS) -> MgpuBlocks:
  """`preferred` with block_k and block_n halved (down to 16) until they divide K and N,
  and the epilogue tile no wider than block_n: small models run the same kernel."""
  bk, bn = preferred.block_k, preferred.block_n
  while bk > 16 and k % bk:
    bk //= 2
  while bn > 16 and n % bn:
    bn //= 2
  depth = min(preferred.stages, k // bk)
  return dataclasses.replace(preferred, block_k=bk, block_n=bn,
                             epi_n=min(preferred.epi_n, bn),
                             delay=max(0, min(preferred.delay, depth - 1)))


def row_ladder(rows: int) -> tuple[int, ...]:
  """The power-of-two store sizes, largest first, that an exact store of up to `rows`
  rows is built from (each used or not at run time, by the bits of the count)."""
  sizes, s = [], 1
  while s <= rows:
    sizes.append(s)
    s *= 2
  return tuple(reversed(sizes))


def wg_span(tile_row0, start, end, wg):
  """The real rows [lo, lo + count) of compute warpgroup `wg`'s 64 rows (from
  tile_row0 + 64 wg) that belong to the group [start, end)."""
  base = tile_row0 + wg * WG_ROWS
  clip = lambda v: jnp.minimum(jnp.maximum(v, 0), WG_ROWS)
  lo = clip(start - base)
  return lo, jnp.maximum(clip(end - base) - lo, 0)


def flat_table(group_sizes_G: jax.Array) -> jax.Array:
  """Per group, flattened for scalar reads: [row start G, rows G, row tiles G, first
  tile G, live tiles]. A group's row tiles start at its first row rounded down to a
  multiple of ALIGN (a tiled TMA load starts on a whole tile row), so its first tile may
  begin with up to ALIGN - 1 rows of the group before, which it computes and does not
  store."""
  sizes = group_sizes_G.astype(jnp.int32)
  starts = jnp.cumsum(sizes) - sizes
  span = starts + sizes - (starts // ALIGN) * ALIGN
  tiles = jnp.where(sizes > 0, (span + CTA_ROWS - 1) // CTA_ROWS, 0)
  first = jnp.cumsum(tiles) - tiles
  return jnp.concatenate([starts, sizes, tiles, first, jnp.sum(tiles)[None]])


def locate_scalar(table_ref, item, g: int, n_tiles: int):
  """Which (group, column tile, row tile) work item `item` is, with scalar reads
  unrolled over the groups (Mosaic GPU has no vector search), in kernels/groups.py's
  order: (live, group, column tile, the tile's first row, the group's [start, end)).
  Written with lax's integer ops on non-negative values, which Mosaic GPU lowers."""
  from jax import lax

  grp = jnp.int32(0)
  first_tile = table_ref[3 * g]
  for i in range(1, g):
    here = table_ref[3 * g + i] * n_tiles <= item
    grp = lax.select(here, jnp.int32(i), grp)
    first_tile = lax.select(here, table_ref[3 * g + i], first_tile)
  start = table_ref[grp]
  row_tiles = jnp.maximum(table_ref[2 * g + grp], 1)
  local = item - first_tile * n_tiles
  n = lax.div(local, row_tiles)
  # A multiple of ALIGN by construction; the product says so to Mosaic's tiling check.
  row0 = (lax.div(start, ALIGN) + lax.rem(local, row_tiles) * (CTA_ROWS // ALIGN)) * ALIGN
  return item < table_ref[4 * g] * n_tiles, grp, n, row0, start, start + table_ref[g + grp]


def locate_mn(table_ref, item, g: int, n_pairs: int, cta):
  """locate_scalar for pairing "mn": a group's items, per pair of column tiles, are its
  row-tile pairs on the first column, then on the second (each pair sharing the weight
  tile), then its odd last row tile on both columns (sharing x). Returns (live, group,
  column tile, row0, start, end, shares weights)."""
  from jax import lax

  grp = jnp.int32(0)
  first_tile = table_ref[3 * g]
  for i in range(1, g):
    here = table_ref[3 * g + i] * n_pairs <= item
    grp = lax.select(here, jnp.int32(i), grp)
    first_tile = lax.select(here, table_ref[3 * g + i], first_tile)
  start = table_ref[grp]
  row_tiles = jnp.maximum(table_ref[2 * g + grp], 1)
  local = item - first_tile * n_pairs
  p = lax.div(local, row_tiles)
  r = lax.rem(local, row_tiles)
  half = lax.div(row_tiles, 2)
  m_mode = r < 2 * half
  half1 = jnp.maximum(half, 1)
  col = 2 * p + lax.select(m_mode, lax.div(r, half1), cta)
  tile = lax.select(m_mode, 2 * lax.rem(r, half1) + cta, row_tiles - 1)
  row0 = (lax.div(start, ALIGN) + tile * (CTA_ROWS // ALIGN)) * ALIGN
  return (item < table_ref[4 * g] * n_pairs, grp, col, row0, start,
          start + table_ref[g + grp], m_mode)


def _kernel(table_gmem, x_gmem, *refs, g: int, n_items: int, n_tiles: int,
            blocks: MgpuBlocks, activation: str):
  from jax import lax
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  gated = activation == "swiglu"
  weight_gmems, o_gmem = refs[:-1], refs[-1]
  dtype = x_gmem.dtype
  k = x_gmem.shape[1]
  bn, bk, en = blocks.block_n, blocks.block_k, blocks.epi_n
  swizzle = plgpu.find_swizzle(bk * jnp.dtype(dtype).itemsize * 8)
  transforms = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
                plgpu.SwizzleTransform(swizzle))

  def pipeline(body, context, row0=0, shared="x"):
    # The row tile starts at any row (groups are packed): an element offset. The
    # operand the cluster's CTAs share is loaded once and multicast to both.
    coll = lambda what: ("cluster",) if blocks.cluster > 1 and shared == what else ()
    specs = [plgpu.BlockSpec((pl.Element(CTA_ROWS), bk), lambda s: (row0, s),
                             transforms=transforms, memory_space=plgpu.SMEM,
                             delay_release=blocks.delay, collective_axes=coll("x"))]
    specs += [plgpu.BlockSpec((bk, bn), lambda s: (s, 0), transforms=transforms,
                              memory_space=plgpu.SMEM, delay_release=blocks.delay,
                              collective_axes=coll("w"))
              ] * len(weight_gmems)
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k // bk,), memory_registers=40, in_specs=specs, wg_axis="wg",
        num_compute_wgs=2, max_concurrent_steps=blocks.stages, compute_context=context)

  ignore = lambda *_, **__: None
  allocs = pipeline(ignore, ignore).get_allocations(
      x_gmem, *(w.at[0, :, pl.ds(0, bn)] for w in weight_gmems))

  @functools.partial(pl.run_scoped, allocs=allocs,
                     out_smem=plgpu.SMEM((2, 2, WG_ROWS, en), dtype),
                     collective_axes="wg")
  def _scope(allocs, out_smem):
    wg = lax.axis_index("wg")
    cta = lax.axis_index("cluster") if blocks.cluster > 1 else 0

    @plgpu.nd_loop((n_items,), collective_axes="sm")
    def _items(info):
      (item,) = info.index
      if blocks.cluster > 1 and blocks.pairing == "mn":
        live, grp, n, row0, start, end, m_mode = locate_mn(
            table_gmem, item, g, n_tiles // 2, cta)
      else:
        live, grp, pair, row0, start, end = locate_scalar(
            table_gmem, item, g, n_tiles // blocks.cluster)
        n = pair * blocks.cluster + cta
        m_mode = None
      lo, mine = wg_span(row0, start, end, wg)

      def run_item(shared):
        def context(run):
          accs = [plgpu.ACC((WG_ROWS, bn), jnp.float32) for _ in weight_gmems]

          def _acc_scope(*acc_refs):
            run(acc_refs)
            vals = [a[...] for a in acc_refs]
            y = activate(vals[0], vals[-1], activation).astype(dtype)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for j in range(bn // en):
              slot = j % 2
              plgpu.wait_smem_to_gmem(1, wait_read_only=True)
              out_smem[wg, slot] = y[:, j * en:(j + 1) * en]
              plgpu.commit_smem()
              done = lo
              for size in row_ladder(WG_ROWS):
                at = done

                @pl.when((mine & size) != 0)
                def _():
                  plgpu.copy_smem_to_gmem(
                      out_smem.at[wg].at[slot].at[pl.ds(at, size)],
                      o_gmem.at[pl.ds(row0 + wg * WG_ROWS + at, size),
                                pl.ds(n * bn + j * en, en)])

                done = done + (mine & size)

          pl.run_scoped(_acc_scope, *accs)

        def mma(_, x_smem, *rest):
          w_smems, acc_refs = rest[:-1], rest[-1]

          def issue():
            x_rows = x_smem.at[pl.ds(wg * WG_ROWS, WG_ROWS)]
            for acc, w in zip(acc_refs, w_smems):
              plgpu.wgmma(acc, x_rows, w)

          pl.when(mine > 0)(issue) if blocks.skip else issue()

          plgpu.wgmma_wait(blocks.delay)
          return acc_refs

        cols = pl.ds(n * bn, bn)
        pipeline(mma, context, row0, shared)(
            x_gmem, *(w.at[grp, :, cols] for w in weight_gmems), allocations=allocs)

      if m_mode is None:
        pl.when(live)(lambda: run_item("x"))
      else:
        pl.when(live & m_mode)(lambda: run_item("w"))
        pl.when(live & ~m_mode)(lambda: run_item("x"))

  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  del gated


def pad_rows(m: int) -> int:
  """Rows of the buffer the kernel takes for m real rows: room for the last tile's load,
  a whole number of ALIGN-row tiles (TMA's tiled loads)."""
  return -(-(m + CTA_ROWS) // ALIGN) * ALIGN


def num_sms() -> int:
  try:
    return jax.devices()[0].core_count
  except (AttributeError, RuntimeError):
    return 132


def grouped_matmul_mgpu(x_pad, m: int, w_GxKxN, group_sizes_G, w_gate_GxKxN=None, *,
                        activation: str = "none", blocks: MgpuBlocks = DEFAULT_MGPU_BLOCKS,
                        interpret: bool = False, sms: int | None = None):
  """act(x[rows of g] @ w[g]) on rows x_pad [R, K] (R = pad_rows(m) or more, a
  multiple of ALIGN); returns [R, N] with rows past the real ones unset."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  rows, k = x_pad.shape
  g, _, n = w_GxKxN.shape
  if rows < pad_rows(m) or rows % ALIGN:
    raise ValueError(f"x_pad has {rows} rows for m={m}: give pad_rows(m)={pad_rows(m)}")
  steps = min(blocks.stages, k // max(blocks.block_k, 1))
  if not 0 <= blocks.delay < steps:
    # The pipeline would wait for a release that never comes: a hang, not an error.
    raise ValueError(f"delay={blocks.delay} must be below the pipeline's depth "
                     f"min(stages={blocks.stages}, K/block_k={k // blocks.block_k}); "
                     "use fit(), which lowers it")
  if k % blocks.block_k or n % blocks.block_n or blocks.block_n % blocks.epi_n:
    raise ValueError(f"K={k}, N={n} must be multiples of block_k={blocks.block_k} and "
                     f"block_n={blocks.block_n} (a multiple of epi_n={blocks.epi_n})")
  n_tiles = n // blocks.block_n
  if blocks.cluster not in (1, 2) and blocks.pairing == "mn":
    raise ValueError("pairing='mn' takes a cluster of 2")
  if n_tiles % blocks.cluster:
    raise ValueError(f"N={n} has {n_tiles} column tiles of {blocks.block_n}: not a "
                     f"multiple of cluster={blocks.cluster}")
  # Each group adds at most one partial tile, and its first tile's ALIGN - 1 rows.
  n_items = (pl.cdiv(m + (ALIGN - 1) * g, CTA_ROWS) + g) * (n_tiles // blocks.cluster)
  weights = (w_GxKxN,) if w_gate_GxKxN is None else (w_GxKxN, w_gate_GxKxN)
  kw = {}
  if interpret:
    kw["interpret"] = _interpret_params()
  params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
  call = plgpu.kernel(
      functools.partial(_kernel, g=g, n_items=n_items, n_tiles=n_tiles, blocks=blocks,
                        activation=activation),
      out_type=jax.ShapeDtypeStruct((rows, n), x_pad.dtype),
      grid=((sms or num_sms()) // blocks.cluster,), grid_names=("sm",),
      cluster=(blocks.cluster,) if blocks.cluster > 1 else (),
      cluster_names=("cluster",) if blocks.cluster > 1 else (),
      num_threads=3, thread_name="wg",
      compiler_params=params, **kw)
  return call(flat_table(group_sizes_G), x_pad, *weights)


def _interpret_params():
  from jax.experimental.pallas import mosaic_gpu as plgpu
  if hasattr(plgpu, "InterpretParams"):
    return plgpu.InterpretParams()
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()
