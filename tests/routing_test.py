"""Tests for jax_ep/routing.py: gate, buffer sizes, packing by destination, compaction,
dispatch and combine, on hand examples and against numpy on random routings."""

import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from jax_ep import routing

# Four tokens, two picks each, four experts on two devices (two experts each).
#   expert 0: t0k0, t2k0, t3k1   expert 1: t1k1, t3k0   (device 0)
#   expert 2: t2k1               expert 3: t0k1, t1k0   (device 1)
EXPERTS_TxK = jnp.array([[0, 3], [3, 1], [0, 2], [1, 0]], jnp.int32)
WEIGHTS_TxK = jnp.array([[0.5, 0.5], [0.7, 0.3], [0.6, 0.4], [0.9, 0.1]], jnp.float32)
X_TxD = jnp.array([[1, 10], [2, 20], [3, 30], [4, 40]], jnp.float32)
ALL = jnp.ones((4,), bool)


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
  expected = np.argsort(-np.asarray(logits), axis=-1)[:, :4]
  assert_array_equal(experts, expected)
  assert (np.diff(np.asarray(weights), axis=-1) <= 0).all()


def test_top_k_gate_ties_pick_lowest_experts():
  weights, experts = routing.top_k_gate(jnp.zeros((5, 8)), 2)
  assert_array_equal(experts, np.tile([0, 1], (5, 1)))
  assert_allclose(weights, np.full((5, 2), 0.5))


def test_dense_gate():
  gate = routing.dense_gate(WEIGHTS_TxK, EXPERTS_TxK, 4)
  assert_allclose(gate, [[0.5, 0, 0, 0.5], [0, 0.3, 0, 0.7], [0.6, 0, 0.4, 0], [0.1, 0.9, 0, 0]])


def test_rows_per_destination():
  # Dropless: every pick of every token could go to one device, at most min(K, El) each.
  assert routing.rows_per_destination(64, 2, 1, 16, 2.0, True) == 64
  assert routing.rows_per_destination(1024, 2, 16, 1, 2.0, True) == 2048
  assert routing.rows_per_destination(512, 2, 8, 2, 2.0, True) == 1024
  # Otherwise the balanced share (T K / P) times the factor, never past the worst case.
  assert routing.rows_per_destination(64, 2, 1, 16, 2.0, False) == 16
  assert routing.rows_per_destination(64, 2, 1, 16, 100.0, False) == 64
  assert routing.rows_per_destination(3, 2, 4, 4, 0.1, False) == 1


def test_pack_dropless_hand_example():
  pack = routing.pack_by_destination(EXPERTS_TxK, ALL, 4, 2, rows=8)
  # Device 0's block: e0 (t0, t2, t3) then e1 (t1, t3); device 1's from row 8: e2 (t2),
  # e3 (t0, t1). Within an expert, token order.
  assert_array_equal(pack.slot_TxK, [[0, 9], [10, 3], [1, 8], [4, 2]])
  assert_array_equal(pack.counts_PxEl, [[3, 2], [1, 2]])
  assert_array_equal(pack.load_E, [3, 2, 1, 2])
  assert int(pack.dropped) == 0


def test_pack_drops_the_latest_picks_past_the_rows():
  pack = routing.pack_by_destination(EXPERTS_TxK, ALL, 4, 2, rows=2)
  # Device 0 gets, in token order, t0k0 (e0), t1k1 (e1), t2k0, t3k0, t3k1: the first two
  # stay. Device 1 gets t0k1 (e3), t1k0 (e3), t2k1 (e2): the first two stay. 4 = P x W.
  assert_array_equal(pack.slot_TxK, [[0, 2], [3, 1], [4, 4], [4, 4]])
  assert_array_equal(pack.counts_PxEl, [[1, 1], [0, 2]])
  assert_array_equal(pack.load_E, [3, 2, 1, 2])  # load counts dropped picks too
  assert int(pack.dropped) == 4


def test_pack_skips_invalid_tokens():
  valid = jnp.array([True, False, True, False])
  pack = routing.pack_by_destination(EXPERTS_TxK, valid, 4, 2, rows=8)
  assert_array_equal(pack.load_E, [2, 0, 1, 1])
  assert_array_equal(pack.counts_PxEl, [[2, 0], [1, 1]])
  assert (np.asarray(pack.slot_TxK)[[1, 3]] == 16).all() and int(pack.dropped) == 0


def test_compact_hand_example():
  # Source 0 sent [e0, e1] one row each; source 1 sent two rows of e0. W = 3.
  comp = routing.compact_received(jnp.array([[1, 1], [2, 0]]), 3)
  assert_array_equal(comp.group_sizes_El, [3, 1])
  # Compact: e0 = s0w0, s1w0, s1w1; e1 = s0w1. Received flat index i = s * 3 + w.
  assert_array_equal(comp.gather_R, [0, 3, 4, 1, 6, 6])
  assert_array_equal(comp.back_R, [0, 3, 6, 1, 2, 6])


@pytest.mark.parametrize("seed", range(3))
def test_pack_exchange_compact_against_numpy(seed):
  """Random routing over P devices: after packing, a simulated all_to_all and compaction,
  each local expert's run holds exactly the picks routed to it, sources in order."""
  rng = np.random.default_rng(seed)
  p, e_local, t, k = 3, 2, 7, 2
  e = p * e_local
  experts = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
                      for _ in range(p)])  # [source, T, K]
  rows = routing.rows_per_destination(t, k, e_local, p, 2.0, True)
  sends, counts = [], []
  for src in range(p):
    pack = routing.pack_by_destination(jnp.asarray(experts[src]), jnp.ones(t, bool), e, p, rows)
    token_id = np.arange(t) + 100 * src  # a row's content: which (source, token) it is
    buf = routing.dispatch(jnp.asarray(token_id[:, None], jnp.float32), pack.slot_TxK, p * rows)
    sends.append(np.asarray(buf).reshape(p, rows))
    counts.append(np.asarray(pack.counts_PxEl))
  for dst in range(p):
    recv = np.stack([sends[src][dst] for src in range(p)])  # [P, W]
    comp = routing.compact_received(jnp.asarray(np.stack([c[dst] for c in counts])), rows)
    got = np.asarray(routing.take_rows(jnp.asarray(recv.reshape(-1, 1)), comp.gather_R))[:, 0]
    start = 0
    for le in range(e_local):
      n = int(comp.group_sizes_El[le])
      want = [100 * src + tok for src in range(p) for tok in range(t)
              if dst * e_local + le in experts[src, tok]]
      assert_array_equal(got[start:start + n], want)
      start += n
    # back_R sends each received row to its compact row (the inverse permutation).
    back = np.asarray(comp.back_R)
    real = back < p * rows
    assert_array_equal(got[back[real]], recv.reshape(-1)[real])


def test_dispatch_combine_round_trip():
  # Identity experts: each token gets back sum_k w_k x = x.
  pack = routing.pack_by_destination(EXPERTS_TxK, ALL, 4, 2, rows=8)
  buf = routing.dispatch(X_TxD, pack.slot_TxK, 16)
  assert_array_equal(buf[:5], X_TxD[jnp.array([0, 2, 3, 1, 3])])  # device 0's block
  assert_array_equal(buf[5:8], 0)  # empty rows are zero
  assert_allclose(routing.combine(buf, pack.slot_TxK, WEIGHTS_TxK), X_TxD, rtol=1e-6)
  # Dropped picks contribute nothing: with 2 rows a device only t0 and t1 come back.
  pack = routing.pack_by_destination(EXPERTS_TxK, ALL, 4, 2, rows=2)
  out = routing.combine(routing.dispatch(X_TxD, pack.slot_TxK, 4), pack.slot_TxK, WEIGHTS_TxK)
  assert_allclose(out, X_TxD * jnp.array([[1.0], [1.0], [0.0], [0.0]]), rtol=1e-6)


def test_load_imbalance_is_the_worst_layers_max_over_mean():
  load_LxE = np.array([[2, 2, 2, 2], [6, 0, 1, 1]])  # layer 1: 6 / 2
  assert float(routing.load_imbalance(load_LxE)) == pytest.approx(3.0)
  assert float(routing.load_imbalance(np.zeros((2, 4)))) == 0.0
