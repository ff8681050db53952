"""jax_ep/perf/plan.py: what a benchmark runs: one device's share of a deployment, scaled
presets when devices are few, mesh: kinds."""

import dataclasses

import pytest

from configs import deployments, load_model
from jax_ep.config import ConfigError
from jax_ep.perf import per_device, plan


def test_share_of_seed_proposed_is_one_expert_one_layer():
  one_group = dataclasses.replace(deployments.SEED_PROPOSED, decode_groups=1)
  share, one, rows = plan.share_config(load_model("seed"), one_group, 1024)
  assert (share.num_layers, share.num_experts, share.top_k, rows) == (1, 1, 1, 64)
  assert share.model_dim == 8192 and share.mlp_dim == 32768
  # Its head: its 2048 of the 32768 vocabulary columns, on the stage's 16 x 64 rows.
  assert share.vocab_size == 2048 and one.num_devices == 1 and one.head_gather == 16
  lay = per_device.layout(share, one, rows)
  assert lay.group_rows == 1024 and lay.vocab_shards == 1


def test_share_of_tp_deployment_is_refused():
  with pytest.raises(ConfigError, match="tp=8"):
    plan.share_config(load_model("seed"), deployments.SEED_BASELINE, 1024)


def test_scaled_preset_when_devices_are_few():
  assert plan._preset_for("proposed", 64) == ("seed_proposed", "")
  name, note = plan._preset_for("baseline", 8)
  assert name == "baseline_8" and "needs 16 GPUs, 8 present" in note


def test_mesh_kind():
  dep = plan.parse_mesh("mesh:1x2x1")
  assert dep.mesh_shape == (1, 2, 1) and dep.microbatches == 1 and dep.groups == 1
  four = plan.parse_mesh("mesh:4x2x2/8")
  assert four.placement == "tp" and four.groups == 8 and four.microbatches == 4
  with pytest.raises(ConfigError, match="mesh:SxExT"):
    plan.parse_mesh("mesh:2x2")


def test_one_device_has_no_scaled_baseline():
  with pytest.raises(ConfigError, match="single-device run"):
    plan._preset_for("baseline", 1)


def test_names_with_groups_and_unknown_names():
  seed = load_model("seed")
  spec = plan.BenchSpec(config="seed", kinds=("single", "seed_proposed/1"),
                        share="seed_proposed/1")
  plans, skipped = plan.plan(seed, spec, 64, lambda m: None)
  assert not skipped and [p.name for p in plans] == ["single", "seed_proposed/1",
                                                      "share:seed_proposed/1"]
  assert plans[1].dep.groups == 1 and plans[2].share_of.groups == 1
  bad = dataclasses.replace(spec, kinds=("bogus/2",), share="nope")
  _, skipped = plan.plan(seed, bad, 64, lambda m: None)
  assert [s["reason"].split(":")[0] for s in skipped] == ["--kinds", "--share"]


def test_expert_blocks_reach_every_planned_deployment():
  spec = plan.BenchSpec(config="seed_swiglu", kinds=("single", "mesh:1x2x1"), share="proposed",
                        expert_blocks="up.tail_m=16")
  plans, skipped = plan.plan(load_model("seed_swiglu"), spec, 64, lambda m: None)
  assert not skipped and len(plans) == 3
  assert {p.dep.expert_blocks for p in plans} == {"up.tail_m=16"}
  bad = dataclasses.replace(spec, expert_blocks="block_m=16,up.last_m=0,up.tail_m=16")
  plans, skipped = plan.plan(load_model("seed_swiglu"), bad, 64, lambda m: None)
  assert [s["name"] for s in skipped] == ["single", "mesh:1x2x1", "share:seed_proposed"]
  assert all("tail_m=16 must be 0 or a power of two below block_m=16" in s["reason"]
             for s in skipped)


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


def test_a_bench_over_processes_runs_only_what_spans_them():
  spec = plan.BenchSpec(config="tiny", kinds=("single", "mesh:1x2x1", "mesh:1x8x1"),
                        share="proposed")
  plans, skipped = plan.plan(load_model("tiny"), spec, 8, lambda m: None)
  two = [_Device(i // 4) for i in range(8)]  # 2 processes x 4 devices
  kept = plan.span_processes(plans, skipped, two, lambda m: None, False)
  assert [p.name for p in kept] == ["mesh:1x8x1"]
  assert [s["name"] for s in skipped] == ["single", "mesh:1x2x1", "share:seed_proposed"]
  assert "of 1 of the 2 processes" in skipped[0]["reason"]
  one = [_Device(0)] * 8
  assert len(plan.span_processes(plans, [], one, lambda m: None, False)) == 4


def test_a_share_is_cut_from_the_source_weights_and_placed():
  # The bench's path when the share sits beside the source's weights: slice_share, then
  # the share's engine places them (Variable types kept, the first vocabulary shard).
  import numpy as np

  from jax_ep.engine import Engine

  tiny = load_model("tiny")
  source = Engine(tiny, deployments.SINGLE)
  params = source.init_params(0)
  share, one, rows = plan.share_config(tiny, deployments.PRESETS["proposed_8"], 16)
  placed = Engine(share, one).place_params(plan.slice_share(params, tiny, share))
  v = share.vocab_size
  assert v == tiny.vocab_size // 2 and one.head_gather == 2
  np.testing.assert_array_equal(placed["unembed_DxV"][...], params["unembed_DxV"][...][:, :v])
  np.testing.assert_array_equal(placed["embed_VxD"][...], params["embed_VxD"][...][:v])
  assert len(placed["layers"]) == share.num_layers


def test_share_names_mean_the_seed_preset_whatever_the_devices():
  assert plan.share_preset("proposed") == "seed_proposed"
  assert plan.share_preset("proposed/1") == "seed_proposed/1"
  assert plan.share_preset("proposed_8/2") == "proposed_8/2"
  seed = load_model("seed")
  spec = plan.BenchSpec(config="seed", kinds=(), share="proposed/1")
  plans, skipped = plan.plan(seed, spec, 8, lambda m: None)
  assert not skipped and [p.name for p in plans] == ["share:seed_proposed/1"]
  assert plans[0].batch == 64 and plans[0].dep.head_gather == 16
  # A tp > 1 preset: refused, naming what was typed and the presets that work.
  spec = dataclasses.replace(spec, share="seed_proposed_tp2")
  _, skipped = plan.plan(seed, spec, 8, lambda m: None)
  reason = skipped[0]["reason"]
  assert reason.startswith("--share=seed_proposed_tp2: a share of a tp=2 deployment")
  assert "seed_proposed," in reason and "seed_baseline" not in reason
  # A malformed one is a skipped entry too (bench --skip_unfit runs the rest).
  _, skipped = plan.plan(seed, dataclasses.replace(spec, share="proposed/x"), 8, lambda m: None)
  assert skipped[0]["name"] == "share:proposed/x" and "after '/'" in skipped[0]["reason"]
