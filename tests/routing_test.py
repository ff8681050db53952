"""Tests for jax_ep/routing.py: gate, slot assignment and dispatch/combine on hand examples."""

import jax
import jax.numpy as jnp
import numpy as np
from numpy.testing import assert_allclose, assert_array_equal

from jax_ep import routing

# Four tokens, two picks each, three experts. Queues in (token, pick) order:
#   expert 0: t0k0, t2k0, t3k1   expert 1: t1k1, t3k0   expert 2: t0k1, t1k0, t2k1
EXPERTS_TxK = jnp.array([[0, 2], [2, 1], [0, 2], [1, 0]], jnp.int32)
POSITION_TxK = np.array([[0, 0], [1, 0], [1, 2], [1, 2]])
LOAD_E = np.array([3, 2, 3])
WEIGHTS_TxK = jnp.array([[0.5, 0.5], [0.7, 0.3], [0.6, 0.4], [0.9, 0.1]], jnp.float32)
X_TxD = jnp.array([[1, 10], [2, 20], [3, 30], [4, 40]], jnp.float32)
CAP = 2
SENTINEL = 3 * CAP
# Slot = expert * CAP + (position - round * CAP), or the sentinel outside the round.
SLOTS_ROUND0 = np.array([[0, 4], [5, 2], [1, SENTINEL], [3, SENTINEL]])
SLOTS_ROUND1 = np.array([[SENTINEL] * 2, [SENTINEL] * 2, [SENTINEL, 4], [SENTINEL, 0]])


def test_top_k_gate_picks_the_largest_logits_and_normalises():
  logits = jnp.array([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 1.0, 4.0]], jnp.bfloat16)
  weights, experts = routing.top_k_gate(logits, 2)
  assert experts.dtype == jnp.int32 and weights.dtype == jnp.float32
  assert_array_equal(experts, [[1, 2], [0, 3]])
  hi = np.exp(1.0) / (1 + np.exp(1.0))  # softmax over the two picked logits, 1 apart
  assert_allclose(weights, [[hi, 1 - hi], [hi, 1 - hi]], rtol=1e-6)


def test_top_k_gate_rows_sum_to_one():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(32, 16)), jnp.float32)
  weights, experts = routing.top_k_gate(logits, 4)
  assert_allclose(weights.sum(-1), np.ones(32), rtol=1e-6)
  # The picks are the 4 largest logits, best first.
  expected = np.argsort(-np.asarray(logits), axis=-1)[:, :4]
  assert_array_equal(experts, expected)
  assert (np.diff(np.asarray(weights), axis=-1) <= 0).all()


def test_top_k_gate_ties_pick_lowest_experts():
  # An all-zero router gives every token the same logits: experts 0 and 1, half each.
  weights, experts = routing.top_k_gate(jnp.zeros((5, 8)), 2)
  assert_array_equal(experts, np.tile([0, 1], (5, 1)))
  assert_allclose(weights, np.full((5, 2), 0.5))


def test_dense_gate():
  gate = routing.dense_gate(WEIGHTS_TxK, EXPERTS_TxK, 3)
  assert_allclose(gate, [[0.5, 0, 0.5], [0, 0.3, 0.7], [0.6, 0, 0.4], [0.1, 0.9, 0]])


def test_assign_slots_hand_example():
  position, load = routing.assign_slots(EXPERTS_TxK, 3)
  assert_array_equal(position, POSITION_TxK)
  assert_array_equal(load, LOAD_E)


def test_assign_slots_positions_enumerate_each_queue():
  experts = jnp.asarray(np.random.default_rng(1).integers(0, 7, (50, 3)), jnp.int32)
  position, load = routing.assign_slots(experts, 7)
  experts, position = np.asarray(experts).ravel(), np.asarray(position).ravel()
  for e in range(7):
    # In (token, pick) order, expert e's positions are exactly 0, 1, ..., load - 1.
    assert_array_equal(position[experts == e], np.arange(load[e]))
  assert int(load.sum()) == 150


def test_slot_indices_rounds():
  position = jnp.asarray(POSITION_TxK, jnp.int32)
  slot0, in0 = routing.slot_indices(EXPERTS_TxK, position, 0, CAP, 3)
  slot1, in1 = routing.slot_indices(EXPERTS_TxK, position, 1, CAP, 3)
  assert_array_equal(slot0, SLOTS_ROUND0)
  assert_array_equal(slot1, SLOTS_ROUND1)
  assert_array_equal(in0, SLOTS_ROUND0 != SENTINEL)
  assert_array_equal(in1, SLOTS_ROUND1 != SENTINEL)
  # Every pick is served in exactly one of the two rounds (max load 3 <= 2 rounds x 2).
  assert_array_equal(np.asarray(in0).astype(int) + np.asarray(in1), np.ones((4, 2)))
  slot2, in2 = routing.slot_indices(EXPERTS_TxK, position, jnp.int32(2), CAP, 3)
  assert not np.asarray(in2).any() and (np.asarray(slot2) == SENTINEL).all()


def test_dispatch_hand_example():
  buf0 = routing.dispatch(X_TxD, jnp.asarray(SLOTS_ROUND0), SENTINEL)
  # Slots [e0c0, e0c1, e1c0, e1c1, e2c0, e2c1] hold tokens [t0, t2, t1, t3, t0, t1].
  assert_array_equal(buf0, [[1, 10], [3, 30], [2, 20], [4, 40], [1, 10], [2, 20]])
  buf1 = routing.dispatch(X_TxD, jnp.asarray(SLOTS_ROUND1), SENTINEL)
  # Round 1 holds the overflow t3 -> e0 and t2 -> e2; the other slots are zero.
  assert_array_equal(buf1, [[4, 40], [0, 0], [0, 0], [0, 0], [3, 30], [0, 0]])


def test_combine_hand_example():
  y_SxD = jnp.arange(12, dtype=jnp.float32).reshape(6, 2) * jnp.array([[1.0, 10.0]])
  out = routing.combine(y_SxD, jnp.asarray(SLOTS_ROUND0), WEIGHTS_TxK)
  assert out.dtype == jnp.float32
  # t0: .5 y0 + .5 y4; t1: .7 y5 + .3 y2; t2: .6 y1 (+ sentinel); t3: .9 y3 (+ sentinel).
  y = np.asarray(y_SxD)
  expected = [0.5 * y[0] + 0.5 * y[4], 0.7 * y[5] + 0.3 * y[2], 0.6 * y[1], 0.9 * y[3]]
  assert_allclose(out, expected, rtol=1e-6)


def test_dispatch_combine_round_trip():
  # Identity experts: summed over the rounds, each token gets back sum_k w_k x = x.
  total = jnp.zeros_like(X_TxD)
  for slots in (SLOTS_ROUND0, SLOTS_ROUND1):
    buf = routing.dispatch(X_TxD, jnp.asarray(slots), SENTINEL)
    total = total + routing.combine(buf, jnp.asarray(slots), WEIGHTS_TxK)
  assert_allclose(total, X_TxD, rtol=1e-6)
  # Round 0 alone misses t2's second pick (.4) and t3's second pick (.1).
  buf = routing.dispatch(X_TxD, jnp.asarray(SLOTS_ROUND0), SENTINEL)
  out0 = routing.combine(buf, jnp.asarray(SLOTS_ROUND0), WEIGHTS_TxK)
  assert_allclose(out0, X_TxD * jnp.array([[1.0], [1.0], [0.6], [0.9]]), rtol=1e-6)


def test_round_trip_random():
  t, k, e, d, cap = 40, 2, 8, 4, 3
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
  weights, experts = routing.top_k_gate(jnp.asarray(rng.normal(size=(t, e))), k)
  position, load = routing.assign_slots(experts, e)
  rounds = int(-(-int(load.max()) // cap))
  assert rounds > 1

  @jax.jit
  def one_round(r):
    slots, _ = routing.slot_indices(experts, position, r, cap, e)
    buf = routing.dispatch(x, slots, e * cap)
    return routing.combine(2.0 * buf, slots, weights)  # experts double their input

  total = sum(one_round(jnp.int32(r)) for r in range(rounds))
  assert_allclose(total, 2.0 * x, rtol=1e-5, atol=1e-6)
  # One round fewer leaves some pick unserved.
  assert not np.allclose(total - one_round(jnp.int32(rounds - 1)), 2.0 * x, atol=1e-3)
