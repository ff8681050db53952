"""Tests for jax_ep/ep.py: ep.moe equals the dense reference, on one device and in
shard_map (tokens really cross devices in the all_to_all), and the head's collectives."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from numpy.testing import assert_allclose, assert_array_equal

from jax_ep import ep, experts, routing, sampling
from jax_ep.config import DeploymentConfig
from jax_ep.kernels import groups
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
def _moe_one_device(par: ep.Parallel, active=True, pairs=False):
  return jax.jit(functools.partial(ep.moe, top_k=K, par=par, pairs=pairs, active=active))


def _moe(par, x, router, up, down, gate, active=True):
  """ep.moe on one device; SwiGLU's up and gate go in interleaved, as the model holds them."""
  pairs = gate is not None
  w_in = groups.interleave_pairs(up, gate) if pairs else up
  return _moe_one_device(par, active, pairs)(x, router, w_in, down)


def _np_load(x, router):
  """(token, pick) pairs per expert, by numpy."""
  logits = np.asarray(x) @ np.asarray(router)
  picks = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
  return np.bincount(picks.ravel(), minlength=E)


@pytest.mark.parametrize("mlp_kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("kernels", ["xla", "interpret"])
def test_moe_one_device_equals_dense_reference(mlp_kind, kernels):
  x, router, up, down, gate = _weights(mlp_kind)
  y, stats = _moe(ep.Parallel(kernels=kernels), x, router, up, down, gate)
  assert y.shape == (T, D) and y.dtype == x.dtype
  assert_allclose(y, _reference(x, router, up, down, gate), rtol=1e-5, atol=1e-5)
  assert_array_equal(stats.load_E, _np_load(x, router))
  assert int(stats.dropped) == 0


def test_dropless_whatever_the_skew():
  # All-zero router: every token picks experts 0 and 1. Dropless still serves every pick.
  x, router, up, down, _ = _weights(zero_router=True)
  for kernels in ("xla", "interpret"):
    y, stats = _moe(ep.Parallel(kernels=kernels), x, router, up, down, None)
    assert_allclose(y, _reference(x, router, up, down, None), rtol=1e-5, atol=1e-5)
    assert_array_equal(stats.load_E, [T, T, 0, 0, 0, 0, 0, 0])
    assert int(stats.dropped) == 0


def test_dropping_hand_counted():
  # All-zero router, one device: W = ceil(24 * 2 / 1 * 0.25) = 12 rows. In token order the
  # device gets t0->e0, t0->e1, t1->e0, ...: the first 12 picks (tokens 0..5) stay.
  x, router, up, down, _ = _weights(zero_router=True)
  par = ep.Parallel(capacity_factor=0.25, dropless=False)
  assert routing.rows_per_destination(T, K, E, 1, 0.25, False) == 12
  y, stats = _moe(par, x, router, up, down, None)
  assert int(stats.dropped) == 2 * T - 12
  assert_array_equal(stats.load_E, [T, T, 0, 0, 0, 0, 0, 0])
  full = _reference(x, router, up, down, None)
  kept = (np.arange(T) < 6)[:, None].astype(np.float32)
  assert_allclose(y, full * kept, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mlp_kind", ["gelu", "swiglu"])
def test_expert_blocks_reach_the_kernel_and_keep_the_function(monkeypatch, mlp_kind):
  # All-zero router: experts 0 and 1 get 24 rows each, a 16-row tile and an 8-row tail.
  from jax_ep.kernels import grouped_matmul

  seen, pallas = [], grouped_matmul._pallas
  monkeypatch.setattr(grouped_matmul, "_pallas",
                      lambda *a, **k: seen.append(a[6]) or pallas(*a, **k))
  x, router, up, down, gate = _weights(mlp_kind, zero_router=True)
  spec = "block_m=16,block_n=16,block_k=16,up.tail_m=8,up.last_m=0,down.tail_m=0,down.last_m=8"
  y, _ = _moe(ep.Parallel(kernels="interpret", expert_blocks=spec), x, router, up, down, gate)
  assert_allclose(y, _reference(x, router, up, down, gate), rtol=1e-5, atol=1e-5)
  assert [(b.block_m, b.block_n, b.tail_m, b.last_m) for b in seen] == [(16, 16, 8, 0),
                                                                        (16, 16, 0, 8)]


def test_inactive_tokens_are_not_counted_and_get_nothing():
  x, router, up, down, _ = _weights()
  y, stats = _moe(ep.Parallel(kernels="interpret"), x, router, up, down, None, active=False)
  assert int(stats.load_E.sum()) == 0 and int(stats.dropped) == 0
  assert_allclose(y, 0.0)  # a bubble's tokens take no rows: the experts skip them


def test_compiled_moe_has_no_conditional_or_loop():
  x, router, up, down, _ = _weights()
  hlo = _moe_one_device(ep.Parallel()).lower(x, router, up, down).compile().as_text()
  assert " conditional(" not in hlo and " while(" not in hlo


# --- in shard_map, over the expert and tp axes ---------------------------------------------


@functools.cache
def _moe_sharded(dep: DeploymentConfig, pairs=False):
  """ep.moe in shard_map: tokens split over expert (replicated over tp), experts sharded."""
  par = ep.Parallel.of(dep)
  mesh = make_mesh(dep)
  if dep.placement == "ep":
    w_in, w_out = P(("expert", "tp")), P(("expert", "tp"))
  else:
    w_in, w_out = P("expert", None, "tp"), P("expert", "tp", None)

  def f(x_, router, up_, down_):
    y_, stats = ep.moe(x_, router, up_, down_, top_k=K, par=par, pairs=pairs)
    return y_, ep.psum_batch(stats.load_E, par), ep.psum_batch(stats.dropped, par)

  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("expert"), P(), w_in, w_out),
                               out_specs=(P("expert"), P(), P()), check_vma=False))


@pytest.mark.parametrize("placement", ["ep", "tp"])
@pytest.mark.parametrize("per_device", [6, 3, 1])
def test_moe_sharded_equals_dense_reference(placement, per_device):
  # 4 expert devices x tp 2. With placement "ep" each tp rank dispatches its own slice of
  # the device's tokens, so 3 or 1 tokens per device do not split evenly over tp.
  dep = DeploymentConfig(kind="proposed", expert=4, tp=2, placement=placement)
  x, router, up, down, _ = _weights(tokens=4 * per_device, seed=per_device)
  y, load, dropped = _moe_sharded(dep)(x, router, up, down)
  assert_allclose(y, _reference(x, router, up, down, None), rtol=1e-5, atol=1e-5)
  assert_array_equal(load, _np_load(x, router))  # every pick counted once
  assert int(dropped) == 0


@pytest.mark.parametrize("placement", ["ep", "tp"])
def test_moe_sharded_swiglu_pairs_equal_dense_reference(placement):
  # placement "tp": each tp rank holds the 2F / 2 interleaved columns of its F / 2 pairs.
  dep = DeploymentConfig(kind="proposed", expert=4, tp=2, placement=placement,
                         kernels="interpret")
  x, router, up, down, gate = _weights("swiglu", tokens=16, seed=5)
  y, load, _ = _moe_sharded(dep, pairs=True)(x, router, groups.interleave_pairs(up, gate), down)
  assert_allclose(y, _reference(x, router, up, down, gate), rtol=1e-5, atol=1e-5)
  assert_array_equal(load, _np_load(x, router))


def test_moe_sharded_all_to_one_is_dropless_and_the_kernel_agrees():
  x, router, up, down, _ = _weights(tokens=128, zero_router=True)
  for kernels in ("xla", "interpret"):
    dep = DeploymentConfig(kind="proposed", expert=4, tp=2, placement="ep", kernels=kernels)
    y, load, dropped = _moe_sharded(dep)(x, router, up, down)
    assert_allclose(y, _reference(x, router, up, down, None), rtol=1e-5, atol=1e-5)
    assert_array_equal(load, [128, 128, 0, 0, 0, 0, 0, 0])
    assert int(dropped) == 0


def test_moe_sharded_drops_past_the_rows():
  dep = DeploymentConfig(kind="proposed", expert=4, capacity_factor=0.5, dropless=False)
  x, router, up, down, _ = _weights(tokens=64, zero_router=True)
  y, load, dropped = _moe_sharded(dep)(x, router, up, down)
  # Each device routes 16 tokens x 2 picks, all to device 0 (experts 0 and 1): W =
  # ceil(16 * 2 / 4 * 0.5) = 4 rows kept of 32, on each of 4 devices.
  assert int(dropped) == 4 * (32 - 4)
  assert not np.allclose(y, _reference(x, router, up, down, None), atol=1e-3)


def test_tokens_cross_devices_in_the_all_to_all():
  dep = DeploymentConfig(kind="proposed", expert=4)
  x, router, up, down, _ = _weights(tokens=16)
  hlo = _moe_sharded(dep).lower(x, router, up, down).as_text()
  assert hlo.count("all_to_all") >= 3  # rows there, counts there, results back
  # The exchange moves [P, W, D] rows: W = 4 tokens x min(K, 2 experts) = 8.
  assert "tensor<4x8x16xf32>" in hlo


# --- the head's collectives -----------------------------------------------------------------


def test_best_over_vocab_equals_argmax_of_the_whole_logits():
  dep = DeploymentConfig(kind="proposed", expert=4, tp=2)
  par, mesh = ep.Parallel.of(dep), make_mesh(dep)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 64)).astype(np.float32)
  logits[0, [3, 40]] = 9.0  # a tie across shards: the lower id wins, as argmax
  key = jax.random.key(7)
  seq, pos = jnp.arange(5), jnp.full((5,), 3)

  def f(logits_, temperature):
    vocab0 = ep.vocab_shard(par) * logits_.shape[1]
    score, vid = sampling.local_best(logits_, vocab0, temperature, key, seq, pos)
    return ep.best_over_vocab(score, vid, par)

  for temperature in (0.0, 0.7):
    sharded = jax.jit(jax.shard_map(functools.partial(f, temperature=temperature), mesh=mesh,
                                    in_specs=P(None, ("expert", "tp")), out_specs=P(),
                                    check_vma=False))(jnp.asarray(logits))
    whole = sampling.sample(jnp.asarray(logits), temperature, key, seq, pos)
    assert_array_equal(sharded, whole)
  greedy = jax.jit(jax.shard_map(functools.partial(f, temperature=0.0), mesh=mesh,
                                 in_specs=P(None, ("expert", "tp")), out_specs=P(),
                                 check_vma=False))(jnp.asarray(logits))
  assert_array_equal(greedy, np.argmax(logits, axis=-1))
  assert int(greedy[0]) == 3


def test_gather_batch_and_from_last_stage():
  dep = DeploymentConfig(kind="proposed", stages=2, expert=4)
  par, mesh = ep.Parallel.of(dep), make_mesh(dep)
  x = jnp.arange(8, dtype=jnp.float32)

  def f(x_):
    rows = ep.gather_batch(x_, par)  # every row of the stage
    stage = ep.stage_index(par)
    return ep.from_last_stage(rows + 100.0 * stage, par)

  out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("expert"), out_specs=P(),
                              check_vma=False))(x)
  assert_array_equal(out, np.arange(8) + 100.0)  # the last stage's (stage 1) value


def test_to_next_stage_sends_each_stage_to_the_next_and_the_last_nowhere():
  # Stage 0 gets zeros: a ring that also sent the last stage's rows back to stage 0 would
  # compute the same (stage 0 takes the embedding) at one more transfer a micro-step.
  dep = DeploymentConfig(kind="proposed", stages=4, expert=2)
  par, mesh = ep.Parallel.of(dep), make_mesh(dep)

  def f(x_):
    return ep.to_next_stage(x_ + 1.0 + ep.stage_index(par), par)

  out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("stage"), out_specs=P("stage"),
                              check_vma=False))(jnp.zeros((4, 3), jnp.float32))
  assert_array_equal(out, np.repeat([[0.0], [1.0], [2.0], [3.0]], 3, axis=1))


def test_auto_kernels_fall_back_to_xla_for_shapes_the_kernel_cannot_tile(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  auto = ep.Parallel()
  for swiglu in (False, True):
    assert ep.expert_impl(auto, 8192, 32768, swiglu) == "pallas"
    assert ep.expert_impl(auto, 60, 128, swiglu) == "xla"  # D = 60: no block_k divides it
    assert ep.expert_impl(auto, 8192, 32768, swiglu, pairs=swiglu) == "pallas"
    assert ep.expert_impl(auto, 60, 128, swiglu, pairs=swiglu) == "xla"
  assert ep.expert_impl(ep.Parallel(kernels="pallas"), 60, 128, False) == "pallas"  # asked for
