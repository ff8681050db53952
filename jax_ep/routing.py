"""Routing math as pure jnp: top-k gate, the exchange's static sizes, packing by
destination device, compaction for the grouped expert kernel, dispatch and combine.

Nothing here knows about meshes or collectives (those live in ep.py), so every
function is testable on one device. T tokens, K picks per token, E experts, P devices
in the exchange group, El = E / P experts per device, W rows per destination.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


def rows_per_destination(tokens: int, top_k: int, experts_per_device: int, ep_size: int,
                         capacity_factor: float, dropless: bool) -> int:
  """Static rows of the send buffer per destination device (W).

  Dropless: the worst case, every pick of every token going to one device (a token
  picks an expert at most once, so a device receives at most min(K, El) of its
  picks). No step can overflow, so the shapes never depend on the routing and no
  step syncs with the host to choose them; the grouped kernel skips the empty rows,
  so they cost exchange bytes only. Otherwise the balanced share T * K / P times
  `capacity_factor` (at most the worst case): fewer bytes, and picks past it are
  dropped and counted.
  """
  worst = tokens * min(top_k, experts_per_device)
  if dropless:
    return worst
  return max(1, min(worst, math.ceil(tokens * top_k / ep_size * capacity_factor)))


def top_k_gate(logits_TxE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Top-k experts per token and their weights (softmax over the k picked logits).

  Returns:
    weights_TxK: float32, each row sums to 1.
    experts_TxK: int32 expert ids, best first.
  """
  logits_TxE = logits_TxE.astype(jnp.float32)
  top_logits_TxK, experts_TxK = jax.lax.top_k(logits_TxE, k)
  weights_TxK = jax.nn.softmax(top_logits_TxK, axis=-1)
  return weights_TxK, experts_TxK.astype(jnp.int32)


def dense_gate(weights_TxK: jax.Array, experts_TxK: jax.Array, num_experts: int) -> jax.Array:
  """The gate as a dense [T, E] matrix: weight of expert e for token t, zero if not picked."""
  onehot_TxKxE = jax.nn.one_hot(experts_TxK, num_experts, dtype=weights_TxK.dtype)
  return jnp.einsum("tk,tke->te", weights_TxK, onehot_TxKxE)


def dispatch(x_TxD: jax.Array, slot_TxK: jax.Array, num_slots: int) -> jax.Array:
  """Packs tokens into a [num_slots, D] buffer; empty slots are zero.

  A gather of rows (not a one-hot matmul): each slot looks up the token it holds.
  """
  t, k = slot_TxK.shape
  token_A = jnp.repeat(jnp.arange(t, dtype=jnp.int32), k)
  # Slot -> token; the extra row catches the sentinel; unfilled slots read row T (zeros).
  token_for_slot = jnp.full((num_slots + 1,), t, jnp.int32).at[slot_TxK.reshape(-1)].set(token_A)
  x_pad = jnp.concatenate([x_TxD, jnp.zeros((1, x_TxD.shape[1]), x_TxD.dtype)], axis=0)
  return x_pad[token_for_slot[:num_slots]]


def combine(y_RxD: jax.Array, slot_TxK: jax.Array, weights_TxK: jax.Array) -> jax.Array:
  """Weighted sum over each token's picks of the expert outputs in its slots (float32).

  Picks whose slot is the sentinel (len(y_RxD)) contribute zero.
  """
  y_pad = jnp.concatenate([y_RxD, jnp.zeros((1, y_RxD.shape[1]), y_RxD.dtype)], axis=0)
  picked_TxKxD = y_pad[slot_TxK]
  return jnp.einsum("tk,tkd->td", weights_TxK.astype(jnp.float32), picked_TxKxD,
                    preferred_element_type=jnp.float32)


class Packing(NamedTuple):
  """Where this device's picks go in its send buffer [P * W, D]."""

  slot_TxK: jax.Array  # int32 flat row in [0, P * W]; P * W means dropped (or no token)
  counts_PxEl: jax.Array  # int32 rows sent to each (destination, its local expert)
  load_E: jax.Array  # int32 picks of real tokens per expert, dropped ones included
  dropped: jax.Array  # int32 scalar: picks of real tokens left out for lack of rows


def pack_by_destination(experts_TxK: jax.Array, valid_T: jax.Array, num_experts: int,
                        ep_size: int, rows: int) -> Packing:
  """Packs each pick into the block of the device that holds its expert.

  Expert e lives on device e // El as its local expert e % El. Each destination's W
  rows hold, in order of local expert, that expert's picks in token order, so the
  receiver finds each (source, local expert) run contiguous. If a destination gets
  more than W picks, the earliest W in token order are kept (never when dropless:
  rows_per_destination). Picks of tokens with valid_T False (pipeline bubbles, tp
  padding) take no row and count no load.
  """
  t, k = experts_TxK.shape
  e_local = num_experts // ep_size
  flat_A = experts_TxK.reshape(t * k)
  valid_A = jnp.repeat(valid_T, k)
  dest_A = flat_A // e_local
  # Rank among the valid picks bound for the same device, in token order: the first W stay.
  dest_AxP = jax.nn.one_hot(dest_A, ep_size, dtype=jnp.int32) * valid_A[:, None]
  dest_rank_A = jnp.take_along_axis(jnp.cumsum(dest_AxP, 0) - dest_AxP, dest_A[:, None], 1)[:, 0]
  kept_A = valid_A & (dest_rank_A < rows)
  # Among the kept, rank within the expert; experts of one device follow each other.
  kept_AxE = jax.nn.one_hot(flat_A, num_experts, dtype=jnp.int32) * kept_A[:, None]
  rank_A = jnp.take_along_axis(jnp.cumsum(kept_AxE, 0) - kept_AxE, flat_A[:, None], 1)[:, 0]
  counts_PxEl = kept_AxE.sum(0).reshape(ep_size, e_local)
  start_PxEl = jnp.cumsum(counts_PxEl, axis=1) - counts_PxEl
  slot_A = dest_A * rows + start_PxEl.reshape(-1)[flat_A] + rank_A
  slot_A = jnp.where(kept_A, slot_A, ep_size * rows)
  load_E = (jax.nn.one_hot(flat_A, num_experts, dtype=jnp.int32) * valid_A[:, None]).sum(0)
  # Valid picks less kept ones, from the per-expert sums: a sum over the picks joined
  # slot_A's fusion, which took 43-129 us a layer of the seed step on an H200
  # (results/h200x1_tails_8dff91f/call4_part1_60f1315/profile_single.json).
  dropped = (load_E.sum() - counts_PxEl.sum()).astype(jnp.int32)
  return Packing(slot_A.reshape(t, k).astype(jnp.int32), counts_PxEl, load_E, dropped)


class Compaction(NamedTuple):
  """The received rows re-ordered for the grouped kernel: by local expert, no gaps."""

  gather_R: jax.Array  # int32 [P * W]: compact row r holds received row gather_R[r] (P * W: none)
  back_R: jax.Array  # int32 [P * W]: received row i sits at compact row back_R[i] (P * W: none)
  group_sizes_El: jax.Array  # int32 rows of each local expert, in order


def compact_received(counts_PxEl: jax.Array, rows: int) -> Compaction:
  """Received buffer [P sources, W rows] (each source's block by local expert, with
  counts_PxEl rows each, then empty) -> one run per local expert, sources in order."""
  p, e_local = counts_PxEl.shape
  end_PxEl = jnp.cumsum(counts_PxEl, axis=1)
  start_PxEl = end_PxEl - counts_PxEl
  w_W = jnp.arange(rows, dtype=jnp.int32)
  # Local expert of each received row: how many runs of its source end at or before it.
  expert_PxW = jnp.sum(end_PxEl[:, None, :] <= w_W[None, :, None], axis=2)
  valid_PxW = expert_PxW < e_local
  expert_PxW = jnp.minimum(expert_PxW, e_local - 1)
  group_sizes_El = counts_PxEl.sum(0)
  group_start_El = jnp.cumsum(group_sizes_El) - group_sizes_El
  before_PxEl = jnp.cumsum(counts_PxEl, axis=0) - counts_PxEl  # earlier sources' rows
  take = lambda a_PxEl: jnp.take_along_axis(a_PxEl, expert_PxW, axis=1)
  pos_PxW = (group_start_El[expert_PxW] + take(before_PxEl) + w_W[None, :] - take(start_PxEl))
  back_R = jnp.where(valid_PxW, pos_PxW, p * rows).reshape(-1).astype(jnp.int32)
  gather_R = jnp.full((p * rows + 1,), p * rows, jnp.int32).at[back_R].set(
      jnp.arange(p * rows, dtype=jnp.int32))[:p * rows]
  return Compaction(gather_R, back_R, group_sizes_El.astype(jnp.int32))


def take_rows(x_RxD: jax.Array, index_R: jax.Array) -> jax.Array:
  """x[index] with index == N (the sentinel) giving a zero row."""
  x_pad = jnp.concatenate([x_RxD, jnp.zeros((1, x_RxD.shape[1]), x_RxD.dtype)], axis=0)
  return x_pad[index_R]


def load_imbalance(load_LxE) -> jax.Array:
  """Expert load max/mean of the worst layer (1.0: balanced): the one definition that
  generate, bench, train and evaluate report."""
  load = jnp.asarray(load_LxE, jnp.float32)
  return jnp.max(load.max(-1) / jnp.maximum(load.mean(-1), 1e-9))

