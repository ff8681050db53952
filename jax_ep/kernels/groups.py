"""What the grouped expert kernels share: their tile sizes, the table that maps a
program to its (group, row tile, column tile), the activations, and the rows a launch
multiplies.

Rows are sorted by group (expert); `group_sizes_G` says how many belong to each, in
order, and may sum to less than the buffer (a worst-case receive buffer whose tail is
empty). Programs are numbered group by group, and within a group column tile by column
tile with its row tiles adjacent, so a group's row tiles read each weight tile at nearly
the same time (HBM once, then L2) and its rows stay in L2 while its weights stream past.
Programs past the last real row tile do nothing.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes and Triton launch parameters (benchmarks/kernel_sweep.py measures them)."""

  block_m: int = 128
  block_n: int = 256
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 4
  # A row tile with at most this many real rows (a group's last) runs a last_m-row MMA
  # on the same weight tile instead of a block_m-row one (0: off). A power of two below
  # block_m; at least 16 on the GPU (Triton's dot).
  last_m: int = 0
  # A group whose last row tile would hold at most this many rows (after a full one)
  # computes them in the tile before it: a second, tail_m-row MMA on the weight tile that
  # tile loads, one program fewer (0: off; without split-K only). A power of two below
  # block_m, at least 16 on the GPU.
  tail_m: int = 0

  def smem_bytes(self, weights: int = 1, itemsize: int = 2) -> int:
    """Shared memory of the software pipeline: x and weight tiles per stage."""
    return self.num_stages * (self.block_m + weights * self.block_n) * self.block_k * itemsize


# Measured on one H200 (benchmarks/results/h200_kernel/, jax 0.11.2): the best of the
# sweep for the seed's 8192 x 32768 products. SwiGLU's fused up product loads two weight
# tiles per step, so it takes narrower ones to fit the 227 KiB of shared memory, and
# shorter K steps in a deeper pipeline (k32 x 6 stages: 0.5-5.5% faster than k64 x 3 on
# three row sets, A/B in one process; 0.6 ms less a seed_swiglu step;
# benchmarks/results/h200x1_cluster_d5878c8/, NOTES section 8). Its nearly empty last
# row tiles run a 64-row MMA (last_m: 6% less on rows near 128 an expert, 1.3 ms less a
# seed_swiglu step); on the other products that measured slower (results/h200x1_lastm_61d74fe/).
# Every product folds a group's last <= 64 rows after a full tile into that tile (tail_m;
# A/B of the step, alternating in one call: tails of 32 took the seed step from 29.9-30.0
# to 29.3-29.5 ms and seed_swiglu's from 45.7-45.9 to 44.0-44.3; tails of 64 then to
# 28.5-28.6 and 43.0-43.1; results/h200x1_tails_8dff91f/, NOTES section 10).
DEFAULT_BLOCKS = Blocks(tail_m=64)
SWIGLU_UP_BLOCKS = Blocks(block_n=128, block_k=32, num_stages=6, last_m=64, tail_m=64)


PRODUCTS = ("up", "down")  # an expert MLP's two grouped products


def parse_blocks(spec: str) -> dict[str, dict[str, int]]:
  """Blocks fields to change, per product, from a comma-separated spec such as
  "up.tail_m=16,up.last_m=0,num_stages=3": `up.` or `down.` names one product, a bare
  field both. Raises ValueError naming what is wrong (field, value, syntax)."""
  fields = {f.name for f in dataclasses.fields(Blocks)}
  out: dict[str, dict[str, int]] = {p: {} for p in PRODUCTS}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    key, eq, value = item.partition("=")
    product, dot, name = key.strip().rpartition(".")
    if not eq or not name:
      raise ValueError(f"{item!r}: write FIELD=VALUE or PRODUCT.FIELD=VALUE, "
                       f"with PRODUCT one of {list(PRODUCTS)}")
    if dot and product not in PRODUCTS:
      raise ValueError(f"{item!r}: the product {product!r} is unknown; "
                       f"use one of {list(PRODUCTS)}, or no prefix for both")
    if name not in fields:
      raise ValueError(f"{item!r}: {name!r} is not a Blocks field; "
                       f"use one of {sorted(fields)}")
    try:
      v = int(value)
    except ValueError:
      raise ValueError(f"{item!r}: {value.strip()!r} is not an integer") from None
    if v < (0 if name in ("last_m", "tail_m") else 1):
      raise ValueError(f"{item!r}: {name} must be "
                       f"{'>= 0' if name in ('last_m', 'tail_m') else '>= 1'}")
    for p in (product,) if dot else PRODUCTS:
      out[p][name] = v
  return out


def with_blocks(blocks: Blocks, changes: dict[str, int]) -> Blocks:
  """`blocks` with these fields changed; ValueError where the result cannot tile."""
  b = dataclasses.replace(blocks, **changes)
  for name in ("block_m", "block_n", "block_k"):
    v = getattr(b, name)
    if v < 16 or v & (v - 1):
      raise ValueError(f"{name}={v} must be a power of two, at least 16")
  if b.num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"num_warps={b.num_warps} must be a power of two up to 16 (Triton)")
  if why := small_tiles_error(b, defaults=[n for n in ("last_m", "tail_m") if n not in changes]):
    raise ValueError(why)
  return b


SMEM_BYTES = 227 * 1024  # shared memory a block may take on an H100/H200 SM, the most here


def smem_error(blocks: Blocks, weights: int) -> str | None:
  """Why the pipeline's tiles cannot fit an SM's shared memory even in 16-bit types (the
  least they take), or None."""
  need = blocks.smem_bytes(weights, itemsize=2)
  if need <= SMEM_BYTES:
    return None
  return (f"num_stages={blocks.num_stages} x (block_m={blocks.block_m} + "
          f"{'2 x ' if weights == 2 else ''}block_n={blocks.block_n}) x block_k={blocks.block_k} "
          f"16-bit tiles take {need // 1024} KiB of shared memory, over the "
          f"{SMEM_BYTES // 1024} KiB of an H100/H200 SM; lower num_stages, block_k or block_n")


def small_tiles_error(blocks: Blocks, defaults=()) -> str | None:
  """Why last_m or tail_m cannot be a tile's smaller height, or None; `defaults` names
  fields the user did not set (the message says so)."""
  for name in ("last_m", "tail_m"):
    v = getattr(blocks, name)
    if v and (v & (v - 1) or v >= blocks.block_m):
      given = " (its default)" if name in defaults else ""
      return (f"{name}={v}{given} must be 0 or a power of two below block_m={blocks.block_m} "
              "(a tile's height)")
  return None


def gelu_tanh(x):
  """jax.nn.gelu(approximate=True), written with exp only (lowers everywhere):
  0.5 x (1 + tanh(z)) = x * sigmoid(2 z)."""
  z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
  return x / (1.0 + jnp.exp(-2.0 * z))


def silu(x):
  return x / (1.0 + jnp.exp(-x))


def activate(acc, gate, activation: str):
  """The activation of a product's float32 accumulator `acc` ([..., N]); for "swiglu",
  `gate` is the gate product's; for "swiglu_pairs", acc's columns interleave up and gate
  (interleave_pairs) and the result has N / 2 columns."""
  if activation == "swiglu_pairs":
    up, gate = jax.lax.unstack(acc.reshape(*acc.shape[:-1], acc.shape[-1] // 2, 2), axis=-1)
    return silu(gate) * up
  if activation == "gelu":
    return gelu_tanh(acc)
  if activation == "swiglu":
    return silu(gate) * acc
  return acc


def interleave_pairs(w_up_xF: jax.Array, w_gate_xF: jax.Array) -> jax.Array:
  """[..., 2F] whose column 2j is w_up's column j and 2j + 1 w_gate's: SwiGLU's two up
  weights as one, so a column tile holds both halves of its outputs (activation
  "swiglu_pairs"). Any leading axes ([G, K, F], the model's [L, E, D, F]); a slice of F
  over tp is the slice of 2F over tp, pairs kept whole."""
  return jnp.stack([w_up_xF, w_gate_xF], axis=-1).reshape(*w_up_xF.shape[:-1], -1)


# Where interleave_pairs puts each weight's columns.
UP_COLUMNS, GATE_COLUMNS = slice(0, None, 2), slice(1, None, 2)


def split_pairs(w_up_gate_x2F: jax.Array) -> tuple[jax.Array, jax.Array]:
  """interleave_pairs' inverse: (w_up, w_gate), each [..., F]."""
  return w_up_gate_x2F[..., UP_COLUMNS], w_up_gate_x2F[..., GATE_COLUMNS]


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def tile_table(group_sizes_G: jax.Array, block_m: int, tail_m: int = 0) -> jax.Array:
  """Per group: [row start, rows, row tiles, first row tile], int32 [4, G_pad], and the
  number of live row tiles in column [4, 0]. G_pad is a power of two (Triton vectors);
  padding groups are empty and start past every live tile. With tail_m, a group's last
  <= tail_m rows after a full tile belong to that tile (Blocks.tail_m)."""
  g = group_sizes_G.shape[0]
  sizes = group_sizes_G.astype(jnp.int32)
  starts = jnp.cumsum(sizes) - sizes
  tiles = (sizes + block_m - 1) // block_m
  if tail_m:
    rest = sizes - (tiles - 1) * block_m
    tiles = tiles - ((tiles >= 2) & (rest <= tail_m)).astype(jnp.int32)
  first = jnp.cumsum(tiles) - tiles
  live = jnp.sum(tiles)
  pad = _next_pow2(g) - g
  table = jnp.stack([
      jnp.pad(starts, (0, pad), constant_values=jnp.sum(sizes)),
      jnp.pad(sizes, (0, pad)),
      jnp.pad(tiles, (0, pad)),
      jnp.pad(first, (0, pad), constant_values=live),
  ])
  live_row = jnp.zeros((1, table.shape[1]), jnp.int32).at[0, 0].set(live)
  return jnp.concatenate([table, live_row], axis=0)


class Tile(NamedTuple):
  live: jax.Array  # bool: this program holds a real row tile
  g: jax.Array  # its group
  n: jax.Array  # its column tile
  row0: jax.Array  # its first row
  rows_left: jax.Array  # real rows from row0 to the group's end


def locate(table_ref, pid, block_m: int, n_tiles: int) -> Tile:
  """Which (group, row tile, column tile) program `pid` computes: group by group, each
  group's column tiles in turn, its row tiles adjacent."""
  live_tiles = table_ref[4, 0]
  first_G = table_ref[3, :]
  g = jnp.maximum(jnp.sum((first_G * n_tiles <= pid).astype(jnp.int32)) - 1, 0)
  tiles = jnp.maximum(table_ref[2, g], 1)
  local = pid - table_ref[3, g] * n_tiles
  n, row_tile = local // tiles, local % tiles
  row0 = table_ref[0, g] + row_tile * block_m
  return Tile(pid < live_tiles * n_tiles, g, n, row0, table_ref[0, g] + table_ref[1, g] - row0)


def cost_rows(group_sizes, blocks: Blocks = DEFAULT_BLOCKS) -> int:
  """Rows the kernel multiplies for these (host) group sizes: each group's rounded up to
  block_m, or its last rows to tail_m (after a full tile) or last_m where they fit."""
  bm, small = blocks.block_m, blocks.last_m if 0 < blocks.last_m < blocks.block_m else 0
  tail = blocks.tail_m if 0 < blocks.tail_m < bm else 0

  def rows(s: int) -> int:
    full, rest = divmod(s, bm)
    if rest == 0:
      return full * bm
    if full and rest <= tail:
      return full * bm + tail
    return full * bm + (small if rest <= small else bm)

  return sum(rows(int(s)) for s in group_sizes)
