"""Routing math as pure jnp: top-k gate, slot assignment, dispatch and combine indices.

Nothing here knows about meshes or collectives (those live in ep.py), so every
function is testable on one device. T tokens, K picks per token, E experts, C slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def assign_slots(experts_TxK: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Position of each (token, pick) in its expert's queue, in token order.

  Returns:
    position_TxK: int32, 0 for the first token routed to that expert, 1 for the next...
    load_E: int32, how many (token, pick) pairs each expert received.
  """
  t, k = experts_TxK.shape
  flat_A = experts_TxK.reshape(t * k)
  onehot_AxE = jax.nn.one_hot(flat_A, num_experts, dtype=jnp.int32)
  # Exclusive prefix count per expert: earlier tokens (and earlier picks) queue first.
  before_AxE = jnp.cumsum(onehot_AxE, axis=0) - onehot_AxE
  position_A = jnp.take_along_axis(before_AxE, flat_A[:, None], axis=1)[:, 0]
  return position_A.reshape(t, k), onehot_AxE.sum(axis=0)


def slot_indices(experts_TxK: jax.Array, position_TxK: jax.Array, round_index,
                 capacity: int, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Flat buffer slot of each (token, pick) in round `round_index`, or a sentinel.

  Round r holds queue positions [r * C, (r + 1) * C). The buffer is [E, C] flattened;
  picks outside this round point at the sentinel E * C.

  Returns:
    slot_TxK: int32 in [0, E * C]; E * C means "not in this round".
    in_round_TxK: bool.
  """
  local_TxK = position_TxK - round_index * capacity
  in_round_TxK = (local_TxK >= 0) & (local_TxK < capacity)
  slot_TxK = jnp.where(in_round_TxK, experts_TxK * capacity + local_TxK, num_experts * capacity)
  return slot_TxK.astype(jnp.int32), in_round_TxK


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


def combine(y_SxD: jax.Array, slot_TxK: jax.Array, weights_TxK: jax.Array) -> jax.Array:
  """Weighted sum over each token's picks of the expert outputs in its slots (float32).

  Picks whose slot is the sentinel (len(y_SxD)) contribute zero.
  """
  y_pad = jnp.concatenate([y_SxD, jnp.zeros((1, y_SxD.shape[1]), y_SxD.dtype)], axis=0)
  picked_TxKxD = y_pad[slot_TxK]
  return jnp.einsum("tk,tkd->td", weights_TxK.astype(jnp.float32), picked_TxKxD,
                    preferred_element_type=jnp.float32)
