"""Tests for jax_ep/ep.py: ep.moe equals the dense reference, on one device and in shard_map."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from numpy.testing import assert_allclose, assert_array_equal

from jax_ep import ep, experts
from jax_ep.config import DeploymentConfig, capacity, capacity_buckets
from jax_ep.mesh import make_mesh

T, E, K, D, F = 24, 8, 2, 16, 32


def _weights(mlp_kind="gelu", tokens=T, seed=0, zero_router=False):
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x = f32(rng.normal(size=(tokens, D)))
  router = f32(np.zeros((D, E)) if zero_router else rng.normal(size=(D, E)))
  up = f32(rng.normal(size=(E, D, F)) / np.sqrt(D))
  down = f32(rng.normal(size=(E, F, D)) / np.sqrt(F))
  gate = f32(rng.normal(size=(E, D, F)) / np.sqrt(D)) if mlp_kind == "swiglu" else None
  return x, router, up, down, gate


def _reference(x, router, up, down, gate):
  return experts.dense_moe_reference(x, router, up, down, K, gate)


@functools.cache
def _moe_one_device(par: ep.Parallel, active=True):
  return jax.jit(functools.partial(ep.moe, top_k=K, par=par, active=active))


def _np_routing(x, router, chunks):
  """(token, pick) load per chunk and expert, by numpy: [chunks, E]."""
  logits = np.asarray(x) @ np.asarray(router)
  picks = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
  load = np.zeros((chunks, E), int)
  for t, row in enumerate(picks):
    for e in row:
      load[t // (len(picks) // chunks), e] += 1
  return load


def _expected_rounds(load, cap, chunk):
  """Dropless: the smallest capacity bucket that holds the longest queue, one round;
  past the largest bucket, as many rounds of it as the longest queue needs."""
  caps = capacity_buckets(cap, chunk)
  most = load.max()
  return 1 if any(c >= most for c in caps[:-1]) else max(1, math.ceil(most / caps[-1]))


@pytest.mark.parametrize("mlp_kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("moe_chunks,capacity_factor", [(1, 2.0), (1, 0.25), (3, 0.25),
                                                        (2, 1.0)])
def test_moe_one_device_equals_dense_reference(mlp_kind, moe_chunks, capacity_factor):
  x, router, up, down, gate = _weights(mlp_kind)
  par = ep.Parallel(capacity_factor=capacity_factor, moe_chunks=moe_chunks)
  y, stats = _moe_one_device(par)(x, router, up, down, gate)
  assert y.shape == (T, D) and y.dtype == x.dtype
  assert_allclose(y, _reference(x, router, up, down, gate), rtol=1e-5, atol=1e-5)

  load = _np_routing(x, router, moe_chunks)
  cap = capacity(T // moe_chunks, E, K, capacity_factor)
  assert_array_equal(stats.load_E, load.sum(0))
  assert int(stats.dropped) == 0
  assert int(stats.rounds) == _expected_rounds(load, cap, T // moe_chunks)
  if capacity_factor < 1:
    assert int(stats.rounds) > 1  # the overflow rounds did run, and the output is right


def test_moe_chunks_that_do_not_divide_tokens_fall_back_to_a_divisor():
  x, router, up, down, _ = _weights()
  y, _ = _moe_one_device(ep.Parallel(moe_chunks=5))(x, router, up, down, None)  # gcd(5, 24)=1
  assert_allclose(y, _reference(x, router, up, down, None), rtol=1e-5, atol=1e-5)


def test_dropping_hand_counted():
  # All-zero router: every token ties and picks experts 0 and 1 with weight 1/2.
  # Two chunks of 12 tokens; capacity ceil(12 * 2 / 8 * 0.5) = 2 slots per expert per chunk,
  # so each chunk keeps its first 2 tokens and drops 10 tokens x 2 picks: 40 dropped.
  x, router, up, down, _ = _weights(zero_router=True)
  par = ep.Parallel(capacity_factor=0.5, moe_chunks=2, dropless=False)
  assert capacity(12, E, K, 0.5) == 2
  y, stats = _moe_one_device(par)(x, router, up, down, None)
  assert int(stats.dropped) == 40
  assert int(stats.rounds) == 1
  assert_array_equal(stats.load_E, [24, 24, 0, 0, 0, 0, 0, 0])
  full = _reference(x, router, up, down, None)
  kept = np.zeros((T, 1))
  kept[[0, 1, 12, 13]] = 1.0
  assert_allclose(y, full * kept, rtol=1e-5, atol=1e-5)
  assert not np.allclose(y, full, atol=1e-3)


def test_dropping_random_routing_counts_overflow():
  x, router, up, down, gate = _weights("swiglu", seed=3)
  par = ep.Parallel(capacity_factor=0.5, moe_chunks=2, dropless=False)
  cap = capacity(T // 2, E, K, 0.5)
  load = _np_routing(x, router, 2)
  expected = int(np.maximum(load - cap, 0).sum())
  assert expected > 0
  y, stats = _moe_one_device(par)(x, router, up, down, gate)
  assert int(stats.dropped) == expected
  assert not np.allclose(y, _reference(x, router, up, down, gate), atol=1e-3)
  # Dropless with the same capacity gets it right (a larger capacity bucket, one round).
  y, stats = _moe_one_device(dataclasses.replace(par, dropless=True))(x, router, up, down, gate)
  assert int(stats.dropped) == 0
  assert int(stats.rounds) == _expected_rounds(load, cap, T // 2)
  assert_allclose(y, _reference(x, router, up, down, gate), rtol=1e-5, atol=1e-5)


def test_inactive_tokens_are_not_counted():
  x, router, up, down, _ = _weights(zero_router=True)
  par = ep.Parallel(capacity_factor=0.5, dropless=False)
  _, stats = _moe_one_device(par, active=False)(x, router, up, down, None)
  assert int(stats.load_E.sum()) == 0 and int(stats.dropped) == 0


# --- in shard_map, over the expert and tp axes ---------------------------------------------


@functools.cache
def _moe_sharded(dep: DeploymentConfig):
  """ep.moe in shard_map: tokens split over expert (replicated over tp), experts sharded."""
  par = ep.Parallel.of(dep)
  mesh = make_mesh(dep)
  if dep.placement == "ep":
    w_in, w_out = P(("expert", "tp")), P(("expert", "tp"))
  else:
    w_in, w_out = P("expert", None, "tp"), P("expert", "tp", None)

  def f(x_, router, up_, down_):
    y_, stats = ep.moe(x_, router, up_, down_, None, top_k=K, par=par)
    return y_, ep.psum_batch(stats.load_E, par), stats.rounds

  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("expert"), P(), w_in, w_out),
                               out_specs=(P("expert"), P(), P()), check_vma=False))


@pytest.mark.parametrize("placement", ["ep", "tp"])
@pytest.mark.parametrize("per_device", [6, 3, 1])
def test_moe_sharded_equals_dense_reference(placement, per_device):
  # 4 expert devices x tp 2. With placement "ep" each tp rank dispatches its own slice of
  # the device's tokens, so 3 or 1 tokens per device do not split evenly over tp.
  dep = DeploymentConfig(kind="proposed", expert=4, tp=2, placement=placement,
                         capacity_factor=0.5)
  x, router, up, down, _ = _weights(tokens=4 * per_device, seed=per_device)
  y, load, rounds = _moe_sharded(dep)(x, router, up, down)
  assert_allclose(y, _reference(x, router, up, down, None), rtol=1e-5, atol=1e-5)
  assert_array_equal(load, _np_routing(x, router, 1).sum(0))  # every pick counted once


def test_moe_sharded_skewed_routing_takes_more_rounds():
  dep = DeploymentConfig(kind="proposed", expert=4, tp=2, placement="ep", capacity_factor=0.5)
  x, router, up, down, _ = _weights(tokens=128, zero_router=True)
  y, load, rounds = _moe_sharded(dep)(x, router, up, down)
  assert_allclose(y, _reference(x, router, up, down, None), rtol=1e-5, atol=1e-5)
  assert_array_equal(load, [128, 128, 0, 0, 0, 0, 0, 0])
  # Each tp rank routes 16 tokens to expert 0 with capacity ceil(16 * 2 / 8 * 0.5) = 2;
  # the largest bucket is 4 x 2 = 8, so the queue of 16 takes two rounds of it.
  assert int(rounds) == 2
