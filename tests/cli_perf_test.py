"""Tests for jax_ep/cli/perf.py: `jax-ep predict` and `jax-ep bench` run as users run them
(cli_runner.py), bench on simulated CPU devices."""

import json

from cli_runner import run_cases

from jax_ep.perf import tables


def test_predict_bench_and_bench_refusals(tmp_path):
  out_dir, refused_dir = tmp_path / "bench", tmp_path / "refused"
  out_dir.mkdir()
  refused_dir.mkdir()
  (tmp_path / "not_bench.json").write_text(json.dumps({"tokens": [[1, 2]]}))
  results = run_cases([
      ["predict", "--hardware=h200", "--context_len=256"],
      ["bench", "--simulate_devices=8", "--kinds=single", "--batch=2", "--prompt_len=4",
       "--max_new_tokens=4", "--synced=1", "--warmup=0", "--probe_mib=1", "--devices=1",
       f"--output={out_dir / 'run.result'}"],
      ["bench", "--simulate_devices=8", "--batch=7", "--prompt_len=4", "--max_new_tokens=9"],
      ["bench", "--simulate_devices=8", f"--output={refused_dir}"],
      ["predict", f"--calibration={tmp_path / 'missing.json'}"],
      ["predict", f"--calibration={tmp_path / 'not_bench.json'}"],
      ["predict", f"--plot={tmp_path / 'missing_dir' / 'x.png'}"],
      ["bench", "--simulate_devices=8", f"--out_dir={tmp_path / 'not_bench.json'}"],
      ["bench", "--simulate_devices=8", "--kinds=single", "--synced=0"],
      ["bench", "--simulate_devices=8", "--kinds=single", "--steps=0"],
      ["bench", "--simulate_devices=8", "--kinds=single", "--warmup=-1"],
      ["bench", "--simulate_devices=8", "--kinds=single", "--probe_mib=-3"],
      ["predict", "--context_len=0"],
      ["bench", "--simulate_devices=8", "--kinds=single", "--tokens_per_call=0"],
      ["bench", "--simulate_devices=8", "--kinds=single", "--max_new_tokens=8"],
      ["predict", "--steps=0", "--warmup=-1"],
      ["predict", "--hardware=h200", f"--calibration={out_dir / 'run.result'}"],
  ])
  predict, bench, *refused, unread, calibrated = results
  # The CPU bench's result calibrates, with a warning that it says nothing about a GPU.
  assert calibrated["rc"] == 0, calibrated["stderr"][-2000:]
  assert "was measured on CPU devices" in calibrated["stderr"]
  assert predict["rc"] == 0 and tables.report("h200", 1024, 256) in predict["stdout"]
  assert bench["rc"] == 0, bench["stderr"][-2000:]
  # --output is the JSON's own path; the table and the plot are beside it, by its stem.
  result = json.loads((out_dir / "run.result").read_text())
  assert [r["name"] for r in result["runs"]] == ["single"] and result["num_devices"] == 1
  assert (result["spec"]["steps"], result["spec"]["synced"], result["spec"]["warmup"],
          result["spec"]["probe_mib"], result["spec"]["batch"]) == (1, 1, 0, 1, 2)
  assert sorted(p.name for p in out_dir.iterdir()) == ["run.md", "run.png", "run.result"]
  # Refused before any probe or compile, nothing written.
  for r, message in zip(refused, ["--skip_unfit runs the rest", "is a directory",
                                  "cannot read it", "holds no measured run",
                                  "does not exist; create it first",
                                  "not_bench.json is a file, not a directory",
                                  "--synced=0 must be a positive integer",
                                  "--steps=0 must be a positive integer",
                                  "--warmup=-1 must be 0 or more",
                                  "--probe_mib=-3 must be a positive integer",
                                  "--context_len=0 must be a positive integer",
                                  "--tokens_per_call=0 must be a positive integer",
                                  "--max_new_tokens=8 is fewer than a bench decodes: prefill's "
                                  "token, the ring's fill, --warmup=1 and --synced=5 steps and "
                                  "one timed back to back, 9; give --max_new_tokens=9 or more"],
                          strict=True):
    assert r["rc"] == 2, (r["args"], r["stdout"][-1000:], r["stderr"][-2000:])
    assert message in r["stderr"], (r["args"], r["stderr"][-2000:])
    assert "compiling" not in r["stdout"] and "probe:" not in r["stdout"], r["args"]
    assert "DeploymentConfig" not in r["stderr"] and "Traceback" not in r["stderr"]
  assert refused[0]["stderr"].count("is not divisible") == 2  # baseline and proposed
  # A bad value of a flag the command does not read is only reported as without effect.
  assert unread["rc"] == 0, unread["stderr"][-2000:]
  assert "not read by predict, so without effect: --steps, --warmup" in unread["stderr"]
  assert not list(refused_dir.iterdir())
