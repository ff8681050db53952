"""Hostile routing through ep.moe on every mesh shape: uniform, Zipf-skewed, all tokens to
one device's experts, and most experts empty. Dropless, the output is the dense
reference's and nothing drops; with a capacity (--nodropless) the drops and the output
are exactly what the documented policy gives (routing.pack_by_destination: per source
and destination device, the earliest picks in token order keep their rows), computed
here on the host."""

import jax.numpy as jnp
import numpy as np
import pytest
from ep_test import E, K, _moe_sharded  # ep.moe in shard_map over a deployment's mesh
from numpy.testing import assert_allclose, assert_array_equal

from jax_ep import experts, routing
from jax_ep.config import DeploymentConfig

T, D, F = 64, 16, 32

# (expert, tp, placement): one device, experts over 4 and 8, tokens split over tp (the
# baseline's exchange), each expert's MLP over tp, experts over expert x tp.
MESHES = [(1, 1, "ep"), (4, 1, "ep"), (8, 1, "ep"), (4, 2, "ep"), (4, 2, "tp"), (2, 4, "ep")]


def _routing(kind: str, rng) -> np.ndarray:
  """Each token's two experts [T, K], best first."""
  if kind == "uniform":
    return np.stack([np.arange(T) % E, (np.arange(T) + 3) % E], axis=1)
  if kind == "zipf":
    p = 1.0 / np.arange(1, E + 1) ** 1.5
    return np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(T)])
  if kind == "all_to_one":
    return np.tile([0, 1], (T, 1))
  if kind == "empty_experts":  # only experts 0, 2 and 4 are ever picked
    return np.stack([rng.choice([0, 2, 4], K, replace=False) for _ in range(T)])
  raise ValueError(kind)


def _inputs(kind: str):
  """x [T, D] and a router whose logits are x[:, :E]: the picks are exactly _routing's."""
  rng = np.random.default_rng(7)
  picks = _routing(kind, rng)
  x = rng.normal(size=(T, D)).astype(np.float32)
  x[:, :E] = rng.uniform(-1, 0, size=(T, E))
  x[np.arange(T), picks[:, 0]] = 4.0 + rng.uniform(0, 0.5, T)
  x[np.arange(T), picks[:, 1]] = 2.0 + rng.uniform(0, 0.5, T)
  router = np.zeros((D, E), np.float32)
  router[:E, :E] = np.eye(E)
  up = (rng.normal(size=(E, D, F)) / np.sqrt(D)).astype(np.float32)
  down = (rng.normal(size=(E, F, D)) / np.sqrt(F)).astype(np.float32)
  return picks, x, router, up, down


def _dep(mesh, dropless, capacity=1.0):
  e, tp, placement = mesh
  return DeploymentConfig(kind="proposed", expert=e, tp=tp, placement=placement,
                          dropless=dropless, capacity_factor=capacity)


def _kept_on_host(picks, dep: DeploymentConfig) -> np.ndarray:
  """[T, K] bool: which picks keep a row, by the policy pack_by_destination documents."""
  p = dep.expert_shards
  e_local = E // p
  per_device = T // dep.expert
  split = dep.placement == "ep" and dep.tp > 1
  sources = []  # token ids each source device routes, in order
  for e in range(dep.expert):
    mine = np.arange(e * per_device, (e + 1) * per_device)
    if split:
      t = -(-per_device // dep.tp)
      sources += [mine[r * t:(r + 1) * t] for r in range(dep.tp)]
    else:
      sources.append(mine)
  kept = np.zeros((T, K), bool)
  for tokens in sources:
    w = routing.rows_per_destination(len(tokens), K, e_local, p, dep.capacity_factor,
                                     dep.dropless)
    used = np.zeros(p, int)
    for t in tokens:  # token order, then pick order
      for k in range(K):
        dest = picks[t, k] // e_local
        kept[t, k] = used[dest] < w
        used[dest] += 1
  return kept


def _expected(x, router, up, down, picks, kept):
  weights, got = routing.top_k_gate(jnp.asarray(x @ router), K)
  assert_array_equal(got, picks)  # the router routes as designed
  y_ExTxD = np.asarray(experts.expert_mlp(jnp.broadcast_to(x[None], (E, T, D)), up, down))
  w = np.asarray(weights) * kept
  return np.einsum("tk,tkd->td", w, y_ExTxD[picks, np.arange(T)[:, None]])


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"e{m[0]}_tp{m[1]}_{m[2]}")
def test_hostile_routing_on_every_mesh(mesh):
  for dropless in (True, False):
    dep = _dep(mesh, dropless)
    for kind in ("uniform", "zipf", "all_to_one", "empty_experts"):
      picks, x, router, up, down = _inputs(kind)
      y, load, dropped = _moe_sharded(dep)(x, router, up, down)
      kept = _kept_on_host(picks, dep)
      assert_array_equal(load, np.bincount(picks.ravel(), minlength=E), err_msg=kind)
      assert int(dropped) == int((~kept).sum()), (kind, dropless)
      assert_allclose(y, _expected(x, router, up, down, picks, kept), rtol=1e-5, atol=1e-5,
                      err_msg=f"{kind} dropless={dropless}")
      if dropless:
        assert kept.all()
        ref = experts.dense_moe_reference(x, router, up, down, K)
        assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=kind)
      if kind == "all_to_one" and not dropless and dep.expert_shards > 1:
        assert int(dropped) > 0  # one destination gets every pick: the capacity bites
