"""The jax-ep command line, run as users run it: a fresh process on simulated CPU devices.

Each test starts one interpreter (tests/cli_runner.py) for all its command lines, so jax
starts once per test, not once per case.
"""

import json
import os
import stat
import subprocess
import sys

from configs import deployments, model_names
from jax_ep.perf import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cases(cases, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_runner.py"),
                         json.dumps(cases)], capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _run(*args, timeout=300, xla_flags=None):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return subprocess.run([sys.executable, "-m", "jax_ep", *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_generate_on_each_deployment_writes_the_same_tokens_and_repeats_them(tmp_path):
  runs = [("single", "single"), ("proposed", "proposed"), ("baseline", "baseline"),
          ("proposed", "sampled"), ("proposed", "sampled_again")]
  sample = ["--temperature=0.8", "--seed=5"]
  results = _run_cases([["generate", f"--deployment={dep}", "--simulate_devices=8", "--batch=8",
                         "--prompt_len=4", "--max_new_tokens=4",
                         f"--output={tmp_path / name}.json", *(sample if "sampled" in name else [])]
                        for dep, name in runs])
  meshes = {"proposed": "stage 4 x expert 2 x tp 1 (8 devices)",
            "baseline": "stage 2 x expert 1 x tp 4 (8 devices)"}
  tokens = {}
  for (dep, name), r in zip(runs, results, strict=True):
    assert r["rc"] == 0, r["stderr"][-2000:]
    assert "TPOT" in r["stdout"] and "TPS" in r["stdout"] and meshes.get(dep, "") in r["stdout"]
    path = tmp_path / f"{name}.json"
    # The usual file mode (0666 less the umask), not a temporary file's 0600.
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    result = json.loads(path.read_text())
    assert result["deployment"]["kind"] == dep and result["tpot_ms"] > 0
    rows = result["tokens"]
    assert len(rows) == 8 and all(len(row) == 4 for row in rows)
    assert all(0 <= t < result["config"]["vocab_size"] for row in rows for t in row)
    tokens[name] = rows
  assert tokens["proposed"] == tokens["single"] and tokens["baseline"] == tokens["single"]
  # The same seed, a second run of one deployment: bitwise the same sampled tokens.
  assert tokens["sampled_again"] == tokens["sampled"] != tokens["proposed"]
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


BAD = [
    (["--batch=0"], "--batch=0 must be a positive integer"),
    (["--batch=-3"], "--batch=-3 must be a positive integer"),
    (["--max_new_tokens=0"], "--max_new_tokens=0 must be a positive integer"),
    (["--temperature=-1"], "--temperature=-1.0 must be >= 0"),
    (["--batch=6"], "--batch=6 is not divisible"),
    (["--prompt_len=60", "--max_new_tokens=10"], "exceeds the KV cache length 64"),
    (["--config=nope"], "--config='nope' is not a preset"),
    (["--deployment=seed_proposed"], "needs 64 devices but 8 are available"),
    (["--deployment=proposed", "--tp=3"], "num_experts=16 is not divisible by the expert x tp"),
    (["--deployment=proposed", "--tp=3", "--placement=tp"], "num_heads=8 is not divisible by "
     "--tp=3"),
    (["--expert_axis=0"], "--expert_axis=0 must be a positive integer"),
    (["--decode_groups=-1"], "--decode_groups=-1 must be 0"),
    (["--simulate_devices=-5"], "--simulate_devices=-5: use -1 (auto), 0"),
    (["--output="], "--output= is empty"),
    (["--output={tmp}"], "is a directory"),
    (["--output={tmp}/missing/out.json"], "does not exist; create it first"),
    (["--output=/proc/jax_ep_out.json"], "cannot create a file in /proc"),
    # Weights alone exceed this host (a batch of 2**20 any host): refused before allocating.
    (["--config=seed", "--deployment=single", f"--batch={2**20}"],
     "does not fit: single"),
]


def test_bad_input_fails_before_compiling_and_writes_nothing(tmp_path):
  out = tmp_path / "out.json"
  cases = []
  for args, _ in BAD:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    has_output = any(a.startswith("--output") for a in args)
    sim = [] if any(a.startswith("--simulate_devices") for a in args) else [
        "--simulate_devices=8"]
    cases.append(["generate", *sim, *([] if has_output else [f"--output={out}"]), *args])
  cases += [["bench", "--simulate_devices=8", "--batch=7", "--prompt_len=4",
             "--max_new_tokens=8"],
            ["bench", "--simulate_devices=8", f"--output={tmp_path}"]]
  results = _run_cases(cases)
  messages = [m for _, m in BAD] + ["--skip_unfit runs the rest", "is a directory"]
  for r, message in zip(results, messages, strict=True):
    assert r["rc"] == 2, (r["args"], r["stdout"][-1000:], r["stderr"][-2000:])
    assert message in r["stderr"], (r["args"], r["stderr"][-2000:])
    assert "compiling" not in r["stdout"] and "probe:" not in r["stdout"], r["args"]
    assert "DeploymentConfig" not in r["stderr"] and "Traceback" not in r["stderr"]
  assert results[-2]["stderr"].count("is not divisible") == 2  # baseline and proposed
  assert not list(tmp_path.iterdir())


def test_help_plan_predict_bench_and_usage(tmp_path):
  results = _run_cases([
      ["--help"], ["frobnicate"],
      ["plan", "--config=seed", "--deployment=single", "--device_kind=h100"],
      ["plan", "--config=seed", "--deployment=seed_proposed", "--device_kind=h200",
       "--batch=1024", "--prompt_len=32", "--max_new_tokens=32"],
      ["predict", "--hardware=h200", "--context_len=256"],
      ["bench", "--simulate_devices=8", "--kinds=single", "--batch=2", "--prompt_len=4",
       "--steps=1", "--synced=1", "--warmup=0", "--probe_mib=1", "--devices=1",
       f"--out_dir={tmp_path}"],
  ])
  help_, usage, refused, fits, predict, bench = results
  assert help_["rc"] == 0
  for flag in ("deployment", "simulate_devices", "batch", "prompt_len", "skip_unfit",
               "max_new_tokens", "output", "profile_dir", "seed", "config", "check_numerics",
               "check_memory", "device_kind", "devices", "compile", "checkpoint", "workdir",
               "steps", "save_every", "src", "dst", "kinds", "share", "synced", "warmup",
               "probe_mib", "out_dir", "hardware", "context_len", "calibration", "plot"):
    assert f"--{flag}:" in help_["stdout"] or f"--[no]{flag}:" in help_["stdout"], flag
  config_help = help_["stdout"].split("--config:")[1].split("(default")[0]
  assert all(name in config_help for name in model_names())
  assert usage["rc"] == 1
  assert "usage: jax-ep {generate,bench,predict,plan,train,import-hf,export-hf}" in usage["stderr"]
  # The seed on one 80 GB H100: refused, and the smallest deployment that fits is named.
  assert refused["rc"] == 0 and "DOES NOT FIT" in refused["stdout"]
  assert "--deployment=proposed_2 (2 devices" in refused["stdout"]
  assert "| weights: experts | 64.000 |" in refused["stdout"]
  assert fits["rc"] == 0 and "fits." in fits["stdout"]
  holdings = [line for line in fits["stdout"].splitlines() if line.startswith("| 63 |")]
  assert holdings == ["| 63 | 3, 15, 0 | 3 | 15 | 0-32767 | 0-15 | 30720-32767 | 960-1023 |"]
  assert deployments.PRESETS["seed_proposed"].num_devices == 64
  assert predict["rc"] == 0 and tables.report("h200", 1024, 256) in predict["stdout"]
  assert bench["rc"] == 0, bench["stderr"][-2000:]
  result = json.loads((tmp_path / "seed_table.json").read_text())
  assert [r["name"] for r in result["runs"]] == ["single"] and result["num_devices"] == 1
  assert (result["spec"]["steps"], result["spec"]["synced"], result["spec"]["warmup"],
          result["spec"]["probe_mib"], result["spec"]["batch"]) == (1, 1, 0, 1, 2)
  assert (tmp_path / "seed_table.md").exists()


def test_train_then_generate_from_its_checkpoint(tmp_path):
  # Two steps: the mechanics (flags, progress, checkpoints, the report), not the learning
  # (train_test.py). LLVM unoptimised, as in-process tests run: the compiles dominate.
  fast = "--xla_backend_optimization_level=0"
  workdir = tmp_path / "run"
  proc = _run("train", "--config=tiny_task", f"--workdir={workdir}", "--steps=2",
              "--save_every=1", "--task_digits=3", xla_flags=fast)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "[########################] 2/2 loss" in proc.stdout
  assert "held-out reverse of 3 digits: accuracy" in proc.stdout and "random router" in proc.stdout
  assert sorted(os.listdir(workdir)) == ["1", "2"]
  assert "orbax" not in proc.stderr  # its INFO logs are dropped
  out = tmp_path / "gen.json"
  proc = _run("generate", f"--checkpoint={workdir}", "--deployment=single",
              f"--output={out}", xla_flags=fast)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "checkpoint" in proc.stdout and "trained on reverse of 3 digits" in proc.stdout
  assert "task accuracy (exact match)" in proc.stdout and "(random router: " in proc.stdout
  result = json.loads(out.read_text())
  assert len(result["tokens"][0]) == 3 and 0 <= result["task_accuracy"] <= 1
  assert result["random_load_max_mean"] >= 1 and result["config"]["vocab_size"] == 16
