"""The jax-ep command line, run as users run it: a fresh process on simulated CPU devices."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300, xla_flags=None):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return subprocess.run([sys.executable, "-m", "jax_ep", *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("deployment,devices,mesh", [
    ("proposed", 8, "stage 4 x expert 2 x tp 1 (8 devices)"),
    ("baseline", 8, "stage 2 x expert 1 x tp 4 (8 devices)"),
])
def test_generate_writes_tokens_and_metrics(tmp_path, deployment, devices, mesh):
  out = tmp_path / "out.json"
  proc = _run("generate", f"--deployment={deployment}", f"--simulate_devices={devices}",
              "--batch=8", "--prompt_len=4", "--max_new_tokens=3", f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert mesh in proc.stdout and "TPOT" in proc.stdout and "TPS" in proc.stdout
  result = json.loads(out.read_text())
  tokens = result["tokens"]
  assert len(tokens) == 8 and all(len(row) == 3 for row in tokens)
  assert all(0 <= t < result["config"]["vocab_size"] for row in tokens for t in row)
  assert result["deployment"]["kind"] == deployment and result["tpot_ms"] > 0


def test_same_tokens_on_every_deployment(tmp_path):
  outs = {}
  for deployment in ("single", "proposed", "baseline"):
    out = tmp_path / f"{deployment}.json"
    proc = _run("generate", f"--deployment={deployment}", "--simulate_devices=8", "--batch=8",
                "--prompt_len=4", "--max_new_tokens=4", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs[deployment] = json.loads(out.read_text())["tokens"]
  assert outs["proposed"] == outs["single"] and outs["baseline"] == outs["single"]


@pytest.mark.parametrize("args,message", [
    (["--batch=0"], "--batch=0 must be a positive integer"),
    (["--batch=-3"], "--batch=-3 must be a positive integer"),
    (["--max_new_tokens=0"], "--max_new_tokens=0 must be a positive integer"),
    (["--temperature=-1"], "temperature=-1.0 must be >= 0"),
    (["--batch=6"], "batch=6 is not divisible"),
    (["--prompt_len=60", "--max_new_tokens=10"], "exceeds the KV cache length 64"),
    (["--config=nope"], "--config='nope' is not a preset"),
    (["--deployment=seed_proposed"], "needs 64 devices but 8 are available"),
    (["--deployment=proposed", "--tp=3"], "num_experts=16 is not divisible by the expert x tp"),
    (["--deployment=proposed", "--tp=3", "--placement=tp"], "num_heads=8 is not divisible by tp=3"),
])
def test_bad_input_fails_before_compiling_and_writes_nothing(tmp_path, args, message):
  out = tmp_path / "out.json"
  proc = _run("generate", "--simulate_devices=8", f"--output={out}", *args)
  assert proc.returncode == 2, (proc.stdout[-1000:], proc.stderr[-2000:])
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "compiling" not in proc.stdout
  assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_command_and_help():
  proc = _run("frobnicate")
  assert proc.returncode != 0 and (
      "usage: jax-ep {generate,bench,train,import-hf,export-hf}" in proc.stderr)
  proc = _run("--help")
  for flag in ("--deployment", "--simulate_devices", "--batch", "--prompt_len",
               "--max_new_tokens", "--output", "--profile_dir", "--seed", "--config",
               "--checkpoint", "--workdir", "--steps", "--save_every", "--src", "--dst"):
    assert flag in proc.stdout, flag


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
