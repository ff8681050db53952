"""The cost model (jax_ep/perf/cost.py, collectives.py) against the programs it models:
every collective of a lowered decode call, with its operand's shape, is one the model
counts with the same bytes, and each one the model counts is in the program. Would fail
if the exchange's buffer rule, the ring's collectives or the model drifted apart (issue 14)."""

import collections
import dataclasses

import jax
import pytest

from configs import deployments, load_model
from jax_ep import decode, introspect
from jax_ep.config import DeploymentConfig
from jax_ep.engine import Engine
from jax_ep.perf import collectives, per_device

CFG = load_model("tiny")  # D 64, float32
MAX_LEN = 16
CASES = {
    "proposed_4x2": (deployments.PRESETS["proposed_8"], 16),
    "baseline_2x1x4": (deployments.PRESETS["baseline_8"], 16),
    "tp_placement_1x2x2": (DeploymentConfig(kind="proposed", expert=2, tp=2, placement="tp"), 8),
    "capacity_2x4": (DeploymentConfig(kind="proposed", stages=2, expert=4, dropless=False,
                                      capacity_factor=1.5), 16),
    "one_group_4x2": (dataclasses.replace(deployments.PRESETS["proposed_8"], decode_groups=1),
                      16),
}


def _expected(dep: DeploymentConfig, batch: int) -> collections.Counter:
  """What the model charges per micro-step, as (op, group, operand shape) counts: each
  of its comm terms, with the shape whose bytes it counts (asserted below)."""
  lay = per_device.layout(CFG, dep, batch)
  d, el, b = CFG.model_dim, lay.experts, CFG.bytes_per_param
  out = collections.Counter()
  for _ in range(lay.layers):
    if lay.ep_size > 1:  # rows there and back, with the row counts
      intra, inter = collectives.all_to_all_bytes(CFG, dep, lay, 8)
      assert intra + inter == (lay.ep_size - 1) * lay.send_rows * d * b
      out["all_to_all", lay.ep_size, (lay.ep_size, lay.send_rows, d)] += 2
      out["all_to_all", lay.ep_size, (lay.ep_size, el)] += 1
    if dep.tp > 1:  # attention's partial sums
      assert collectives.tp_allreduce_bytes(CFG, dep, lay) == pytest.approx(
          2 * (dep.tp - 1) / dep.tp * lay.micro_rows * d * b)
      out["all_reduce", dep.tp, (lay.micro_rows, 1, d)] += 1
    if dep.placement == "tp" and dep.tp > 1:  # expert MLPs split over F
      assert collectives.expert_tp_psum_bytes(CFG, dep, lay) == pytest.approx(
          2 * (dep.tp - 1) / dep.tp * lay.ep_size * lay.send_rows * d * b)
      out["all_reduce", dep.tp, (lay.ep_size * lay.send_rows, d)] += 1
    if dep.placement == "ep" and dep.tp > 1:  # the baseline's token split, gathered back
      assert collectives.tp_allgather_bytes(CFG, dep, lay) == (dep.tp - 1) * lay.moe_tokens * d * b
      out["all_gather", dep.tp, (lay.moe_tokens, d)] += 1
  if dep.stages > 1:  # the group's activations to the next stage
    assert collectives.pipeline_bytes(CFG, dep, lay) == lay.micro_rows * d * b
    out["collective_permute", 2, (lay.micro_rows, d)] += 1
  if dep.expert > 1:  # the head's rows, gathered over the stage
    assert collectives.head_gather_bytes(CFG, dep, lay) == (dep.expert - 1) * lay.micro_rows * d * b
    out["all_gather", dep.expert, (lay.micro_rows, 1, d)] += 1
  return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_program_has_exactly_the_modelled_collectives(name):
  dep, batch = CASES[name]
  engine = Engine(CFG, dep)
  params = jax.eval_shape(lambda: engine.init_params(0))
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params, engine.param_shardings)
  state = engine.abstract_decode_state(batch, decode.cache_len(MAX_LEN))
  # Two micro-steps: the loop body (one micro-step) is in the program once.
  text = engine.decode_program(batch, 2).lower(params, state, jax.random.key(0)).as_text()
  got = collections.Counter(introspect.lowered_collectives(text))
  # Sampling's collectives (the best id and score over vocabulary shards, the token from
  # the last stage to all) and the load statistics' sums carry a few numbers per row or
  # expert, not activations [.., D]: the model counts their latency, not bytes.
  # Everything else must be what the model charges.
  small = collections.Counter({k: n for k, n in got.items()
                               if k[0] != "all_to_all" and k[2][-1:] != (CFG.model_dim,)})
  assert got - small == _expected(dep, batch), name
