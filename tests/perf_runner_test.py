"""jax_ep/perf/runner.py: the benchmark harness end to end on 8 of the fake CPU devices (not
timed: fields only), with the report it writes (report.write)."""

import dataclasses
import json

import pytest

from configs import deployments, load_model
from jax_ep.config import ConfigError
from jax_ep.perf import plan, report, runner

RUN_FIELDS = {
    "name", "method", "preset", "note", "gpus", "per_gpu", "model_name", "model", "deployment",
    "share_of", "batch", "groups", "micro_steps_per_token", "prompt_len", "context_len",
    "live_context", "warmup_steps", "synced_steps", "timed_steps", "compile_s", "prefill_s",
    "synced_step_ms", "tpot_ms", "tpot_synced_ms", "tpot_p10_ms", "tpot_p90_ms",
    "micro_step_ms", "tps", "imbalance", "dropped", "load_LxE", "hbm_bytes", "flops",
    "comm_bytes", "resident_bytes", "send_rows", "floor_ops_ms", "floor_ms",
    "achieved_floor_fraction", "exchange_ms", "work_ms", "model_ms", "model_terms_ms",
    "hardware", "placement_source"}
TOP_FIELDS = {"date", "git_commit", "jax_version", "jaxlib_version", "flax_version", "platform",
              "device_kind", "num_devices", "xla_flags", "spec", "model_name", "init_s",
              "probes", "hardware", "runs", "skipped", "calibration"}
PROBE_FIELDS = {"hbm_bytes_per_s", "matmul_flops", "link_bytes_per_s", "collective_latency_s",
                "all_to_all_s", "all_to_all_small_s", "bandwidth_methods", "matmul_methods"}


def test_end_to_end_json_holds_every_field(tmp_path, monkeypatch):
  spec = plan.BenchSpec(config="tiny", kinds=("single", "baseline", "proposed", "proposed/1"),
                         batch=16, prompt_len=4, steps=2, synced=2, warmup=1,
                         num_devices=8, share="proposed_8", probe_mib=8)
  # Devices that hold any one deployment but not single's weights beside those of the
  # source (baseline, the most devices): the sweep frees the source's weights before single
  # and makes each later deployment's own (the same weights: the tokens still agree).
  from jax_ep import memory, memory_budget

  cfg = load_model("tiny")
  single = plan.footprint(plan.Plan("single", "", cfg, deployments.SINGLE, 16, "single"),
                            plan.platform_defaults(spec, "cpu"), "cpu")
  held = sum(memory.weight_bytes(cfg, deployments.PRESETS["baseline_8"]).values())
  budget = memory_budget.Budget(single.total + held / 2, "test", name="test")
  monkeypatch.setattr(memory_budget, "budget_for_devices", lambda devices: budget)
  logs = []
  result = runner.run(spec, log=logs.append)
  assert any("single and baseline's weights do not fit together" in m for m in logs)
  paths = report.write(result, str(tmp_path))
  with open(paths[0]) as f:
    saved = json.load(f)
  assert TOP_FIELDS <= set(saved)
  assert PROBE_FIELDS <= set(saved["probes"])
  assert [r["name"] for r in saved["runs"]] == ["single", "baseline", "proposed", "proposed/1",
                                                "share:proposed_8"]
  for r in saved["runs"]:
    assert RUN_FIELDS <= set(r), RUN_FIELDS - set(r)
    assert r["timed_steps"] == 2 and r["synced_steps"] == 2 and r["tpot_ms"] > 0
    assert r["tpot_p10_ms"] <= r["tpot_synced_ms"] <= r["tpot_p90_ms"]
    assert r["floor_ms"] > 0 and r["model_ms"] > 0
    assert set(r["floor_ops_ms"]) == {"attention projections", "attention over the KV cache",
                                      "router and experts", "head"}
  runs = {r["name"]: r for r in saved["runs"]}
  assert runs["baseline"]["gpus"] == 8 and "scaled preset baseline_8" in runs["baseline"]["note"]
  assert runs["proposed"]["groups"] == 4 and runs["proposed/1"]["groups"] == 1
  assert runs["proposed"]["micro_steps_per_token"] == runs["proposed/1"]["micro_steps_per_token"]
  assert runs["share:proposed_8"]["batch"] == 2 and runs["share:proposed_8"]["share_of"]
  assert runs["baseline"]["placement_source"] == "baseline"
  assert [runs[k]["placement_source"] for k in ("single", "proposed", "share:proposed_8")] == \
      ["initialised"] * 3
  # Same weights and prompts: the full-model deployments decode the same tokens.
  assert runs["single"]["tokens_agree_with_first"] == 1.0
  assert runs["proposed"]["tokens_agree_with_first"] == 1.0
  assert runs["proposed/1"]["tokens_agree_with_first"] == 1.0
  assert set(saved["calibration"]) == {"efficiency", "validation", "seed_table", "extrapolated"}
  assert saved["calibration"]["extrapolated"][0]["gpus"] == 8
  md = open(paths[1]).read()
  assert "| Method | GPUs | Per-GPU deployment | batch | TPS | TPOT ms" in md
  assert "achieved/floor" in md


def test_deployments_that_do_not_fit_are_an_error_unless_skipped():
  spec = plan.BenchSpec(config="tiny", batch=7, prompt_len=4, steps=1, synced=1,
                         num_devices=8, probes=False)
  with pytest.raises(ConfigError, match="--skip_unfit runs the rest") as e:
    runner.run(spec, log=lambda m: None)
  assert "baseline" in str(e.value) and "proposed" in str(e.value)


def test_a_typo_is_not_told_to_skip_what_does_not_fit():
  spec = plan.BenchSpec(config="tiny", kinds=("proposd", "mesh:2x2", "single/x"), batch=8,
                         prompt_len=4, steps=1, synced=1, num_devices=8, probes=False)
  with pytest.raises(ConfigError) as e:
    runner.run(spec, log=lambda m: None)
  assert "'proposd' is not a kind or preset" in str(e.value) and "mesh:SxExT" in str(e.value)
  assert "Did you mean 'proposed'?" in str(e.value)
  assert "after '/'" in str(e.value) and "--skip_unfit" not in str(e.value)
  # With an entry that does not fit here beside the typo, --skip_unfit runs the rest.
  with pytest.raises(ConfigError, match="--skip_unfit runs the rest"):
    runner.run(dataclasses.replace(spec, kinds=("proposd", "proposed_16")), log=lambda m: None)



def test_seed_sized_models_on_cpu_get_a_note():
  seed = load_model("seed")
  spec = plan.BenchSpec(config="seed", kinds=("slice_2x2",), share="proposed/1")
  plans, skipped = plan.plan(seed, spec, 8, lambda m: None)
  assert not skipped
  note = runner.seed_on_cpu_note(plans, "cpu")
  assert note.startswith("note: seed, seed_slice_2x2 on CPU devices") and "--config=tiny" in note
  assert runner.seed_on_cpu_note(plans, "gpu") is None
  tiny, _ = plan.plan(load_model("tiny"), plan.BenchSpec(config="tiny", kinds=("single",)), 8,
                      lambda m: None)
  assert runner.seed_on_cpu_note(tiny, "cpu") is None


def test_a_run_longer_than_the_model_names_the_steps_that_fit():
  # tiny's 64 positions: prompt 8 + 1 + (1 + 5 + steps) x 4 tokens fit up to steps = 7.
  spec = plan.BenchSpec(config="tiny", kinds=("single",), batch=8, prompt_len=8, steps=40,
                         synced=5, warmup=1, tokens_per_call=4, num_devices=1, probes=False)
  with pytest.raises(ConfigError) as e:
    runner.run(spec, log=lambda m: None)
  assert "--prompt_len=8 + 185 decoded tokens" in str(e.value)
  assert "40 back-to-back calls of 4 tokens" in str(e.value)
  assert str(e.value).endswith("exceed max_seq_len 64 of tiny: --steps=7 fits.")
  with pytest.raises(ConfigError, match="lower --prompt_len, --synced"):
    runner.run(dataclasses.replace(spec, prompt_len=40), log=lambda m: None)
  assert plan.new_tokens(dataclasses.replace(spec, steps=7)) - 1 + 8 <= 64
  assert plan.new_tokens(dataclasses.replace(spec, steps=8)) - 1 + 8 > 64
