"""Tests for jax_ep/introspect.py: collectives read from HLO text, what each device holds."""

import collections
import dataclasses
import functools
import math

import jax
import pytest

from configs import deployments, tiny
from jax_ep import introspect
from jax_ep.engine import Engine

CFG = tiny.get_config()


def _meta(scope):
  return f'metadata={{op_name="jit(ring_)/shard_map/{scope}"}}'


# The shapes of compiled HLO lines: a plain and a tuple result, an async pair, an operand
# and a fusion whose names contain op names (not collectives themselves).
HLO = "\n".join([
    "%all-to-all.1 = (s32[1,8]{1,0}, s32[1,8]{1,0}) all-to-all(%a, %b), channel_id=1, "
    + _meta("while/body/closed_call/layer0/dispatch/all_to_all"),
    "%ag = f32[2,1,64]{2,1,0} all-gather(%c), channel_id=2, " + _meta("head/all_gather"),
    "%ars = f32[4,64]{1,0} all-reduce-start(%d), channel_id=3, to_apply=%add",
    "%ard = f32[4,64]{1,0} all-reduce-done(%ars)",
    "%cp = f32[1,64]{1,0} collective-permute(%e), source_target_pairs={{0,1},{1,0}}, "
    + _meta("to_next_stage/ppermute"),
    "%t = (s32[1,8]{1,0}, f32[4,64]{1,0}) tuple(%all-to-all.1, %ard)",
    "%f = f32[8]{0} fusion(%g), kind=kLoop, calls=%fused_all-gather_like",
])


def test_collectives_from_hlo_text():
  found = introspect.collectives(HLO)
  assert [c.op for c in found] == ["all-to-all", "all-gather", "all-reduce", "collective-permute"]
  assert found[0].result == "(s32[1,8]{1,0}, s32[1,8]{1,0})"
  assert (found[0].scope, found[0].primitive) == ("layer0/dispatch", "all_to_all")
  assert (found[1].scope, found[3].scope) == ("head", "to_next_stage")
  assert (found[2].scope, found[2].primitive) == ("", "")  # no metadata
  assert introspect.count_collectives(HLO) == {
      "all-to-all": 1, "collective-permute": 1, "all-reduce": 1, "all-gather": 1}
  assert introspect.count_collectives("") == dict.fromkeys(introspect.COLLECTIVES, 0)


@functools.cache
def _shares(name):
  engine = Engine(CFG, deployments.PRESETS[name])
  params = engine.init_params(0)
  return engine, params, introspect.device_shares(engine, params)


@pytest.mark.parametrize("name", ["proposed_8", "baseline_8"])
def test_device_shares_cover_the_model_once_per_replica(name):
  engine, params, shares = _shares(name)
  dep = engine.dep
  assert sorted(s.device for s in shares) == sorted(d.id for d in engine.mesh.devices.flat)
  for s in shares:
    assert len(s.layers) == CFG.num_layers // dep.stages
    assert s.layers[0] == s.stage * len(s.layers)
    assert len(s.experts) == CFG.num_experts // dep.expert_shards
    assert len(s.heads) == CFG.num_heads // dep.tp
    assert len(s.vocab) == CFG.vocab_size // (dep.expert * dep.tp)
    assert len(s.mlp) == CFG.mlp_dim  # placement ep: whole experts
  for stage in range(dep.stages):
    mine = [s for s in shares if s.stage == stage]
    # A stage's devices hold each expert of its layers once, and each vocabulary column once.
    assert sorted(e for s in mine for e in s.experts) == list(range(CFG.num_experts))
    assert sorted(v for s in mine for v in s.vocab) == list(range(CFG.vocab_size))
    for e in range(dep.expert):  # a tp group splits the heads
      heads = [h for s in mine if s.expert == e for h in s.heads]
      assert sorted(heads) == list(range(CFG.num_heads))
  # The bytes are those of the device's shards: float32 elements of each one.
  want = collections.Counter()
  for leaf in jax.tree.leaves(params):
    for shard in leaf.addressable_shards:
      want[shard.device.id] += 4 * math.prod(shard.data.shape)
  assert {s.device: s.param_bytes for s in shares} == want


def test_swiglu_shares_split_the_mlp_features_over_tp():
  # SwiGLU's up weight holds F's (up, gate) pairs as 2F columns: a tp rank holds F / tp.
  cfg = dataclasses.replace(CFG, mlp_kind="swiglu")
  dep = dataclasses.replace(deployments.PRESETS["proposed_4"], tp=2, placement="tp")
  engine = Engine(cfg, dep)
  shares = introspect.device_shares(engine, engine.init_params(0))
  half = cfg.mlp_dim // 2
  assert {(s.tp, s.mlp) for s in shares} == {(0, range(0, half)), (1, range(half, 2 * half))}


def test_format_shares_one_row_per_device():
  engine, _, shares = _shares("baseline_8")
  table = introspect.format_shares(engine, shares).splitlines()
  assert len(table) == 2 + 8
  # Device 1: stage 0, tp rank 1: layers 0 and 1, experts 4-7, heads 2-3, columns 64-127.
  assert table[3].startswith("| 1 | 0, 0, 1 | 0, 1 | 4-7 | all 128 | 2-3 | 64-127 |")


def test_compiled_entry_points_have_the_deployment_collectives():
  # baseline_4: 2 stages x tp 2, whole experts over tp: every kind of collective.
  engine = Engine(CFG, deployments.PRESETS["baseline_4"])
  programs = introspect.compile_entry_points(engine, engine.init_params(0), 4, 3, 8)
  assert set(programs) == {"prefill", "decode"}
  for program in programs.values():
    found = introspect.collectives(program.as_text())
    scopes = {(c.op, c.scope) for c in found}
    for layer in range(CFG.num_layers // 2):
      for phase in ("dispatch", "combine"):
        assert ("all-to-all", f"layer{layer}/{phase}") in scopes, scopes
      assert ("all-reduce", f"layer{layer}") in scopes  # tp attention's partial sums
      assert ("all-gather", f"layer{layer}") in scopes  # the tp ranks' MoE outputs
    assert ("collective-permute", "to_next_stage") in scopes
    assert all(introspect.count_collectives(program.as_text()).values())
