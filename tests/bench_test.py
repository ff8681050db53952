"""The benchmark harness end to end on 8 of the fake CPU devices (not timed: fields only)."""

import json

import pytest

from configs import deployments, load_model
from jax_ep import bench

RUN_FIELDS = {
    "name", "method", "preset", "note", "gpus", "per_gpu", "model", "deployment", "share_of",
    "batch", "prompt_len", "context_len", "warmup_steps", "timed_steps", "compile_s",
    "prefill_s", "warmup_step_ms", "step_ms", "tpot_ms", "tpot_p10_ms", "tpot_p90_ms",
    "tpot_mean_ms", "tps", "imbalance", "max_rounds", "dropped", "load_LxE", "hbm_bytes",
    "flops", "comm_bytes", "resident_bytes", "micro_steps", "capacity", "rounds_predicted",
    "floor_terms_ms", "floor_ms", "ideal_ms", "achieved_floor_fraction", "model_ms",
    "model_terms_ms", "hardware", "placement_source"}
TOP_FIELDS = {"date", "git_commit", "jax_version", "jaxlib_version", "flax_version", "platform",
              "device_kind", "num_devices", "xla_flags", "spec", "model_name", "init_s",
              "probes", "hardware", "runs", "skipped", "calibration"}
PROBE_FIELDS = {"hbm_bytes_per_s", "matmul_flops", "link_bytes_per_s", "collective_latency_s",
                "all_to_all_s", "all_to_all_small_s"}


def test_share_of_seed_proposed_is_one_expert_one_layer():
  share, rows = bench.share_config(load_model("seed"), deployments.SEED_PROPOSED, 1024)
  assert (share.num_layers, share.num_experts, share.top_k, rows) == (1, 1, 1, 64)
  assert share.model_dim == 8192 and share.mlp_dim == 32768


def test_share_of_tp_deployment_is_refused():
  with pytest.raises(bench.ConfigError, match="tp=8"):
    bench.share_config(load_model("seed"), deployments.SEED_BASELINE, 1024)


def test_scaled_preset_when_devices_are_few():
  assert bench._preset_for("proposed", 64) == ("seed_proposed", "")
  name, note = bench._preset_for("baseline", 8)
  assert name == "baseline_8" and "needs 16 GPUs, 8 present" in note


def test_mesh_kind():
  dep = bench.parse_mesh("mesh:1x2x1")
  assert dep.mesh_shape == (1, 2, 1) and dep.microbatches == 1
  assert bench.parse_mesh("mesh:4x2x2/4").placement == "tp"
  with pytest.raises(bench.ConfigError, match="mesh:SxExT"):
    bench.parse_mesh("mesh:2x2")


def test_one_device_has_no_scaled_baseline():
  with pytest.raises(bench.ConfigError, match="single-device run"):
    bench._preset_for("baseline", 1)


def test_end_to_end_json_holds_every_field(tmp_path):
  spec = bench.BenchSpec(config="tiny", batch=8, prompt_len=4, steps=2, warmup=1,
                         num_devices=8, share="proposed_8", probe_mib=8)
  result = bench.run(spec, log=lambda m: None)
  paths = bench.write(result, str(tmp_path))
  with open(paths[0]) as f:
    saved = json.load(f)
  assert TOP_FIELDS <= set(saved)
  assert PROBE_FIELDS <= set(saved["probes"])
  assert [r["name"] for r in saved["runs"]] == ["single", "baseline", "proposed",
                                                "share:proposed_8"]
  for r in saved["runs"]:
    assert RUN_FIELDS <= set(r), RUN_FIELDS - set(r)
    assert r["timed_steps"] == 2 and len(r["step_ms"]) == 2 and r["tpot_ms"] > 0
    assert r["tpot_p10_ms"] <= r["tpot_ms"] <= r["tpot_p90_ms"]
    assert r["floor_ms"] > 0 and r["model_ms"] > 0
  runs = {r["name"]: r for r in saved["runs"]}
  assert runs["baseline"]["gpus"] == 8 and "scaled preset baseline_8" in runs["baseline"]["note"]
  assert runs["share:proposed_8"]["batch"] == 4 and runs["share:proposed_8"]["share_of"]
  # Same weights and prompts: the full-model deployments decode the same tokens.
  assert runs["proposed"]["tokens_agree_with_first"] == 1.0
  assert set(saved["calibration"]) == {"efficiency", "validation", "seed_table", "extrapolated"}
  assert saved["calibration"]["extrapolated"][0]["gpus"] == 8
  md = open(paths[1]).read()
  assert "| Method | GPUs | Per-GPU deployment | TPS | TPOT ms" in md
  assert "achieved/floor" in md
