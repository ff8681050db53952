"""Tests for jax_ep/cli/train.py: `jax-ep train` in a process of its own (cli_runner.py), then
`jax-ep generate` from the checkpoint it wrote."""

import json
import os

from cli_runner import run


def test_train_then_generate_from_its_checkpoint(tmp_path):
  # Two steps: the mechanics (flags, progress, checkpoints, the report), not the learning
  # (train_test.py).
  workdir = tmp_path / "run"
  proc = run("train", "--config=tiny_task", f"--workdir={workdir}", "--steps=2",
             "--save_every=1", "--task_digits=3")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "[########################] 2/2 loss" in proc.stdout
  assert "held-out reverse of 3 digits: accuracy" in proc.stdout
  assert "(its initial weights " in proc.stdout
  assert sorted(os.listdir(workdir)) == ["1", "2"]
  assert "orbax" not in proc.stderr  # its INFO logs are dropped
  out = tmp_path / "gen.json"
  proc = run("generate", f"--checkpoint={workdir}", "--deployment=single",
             f"--output={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "model tiny_task (the checkpoint's)" in proc.stdout
  assert "trained on reverse of 3 digits" in proc.stdout
  assert "task accuracy (exact match)" in proc.stdout
  assert "(random weights of --seed=0: " in proc.stdout
  result = json.loads(out.read_text())
  assert len(result["tokens"][0]) == 3 and 0 <= result["task_accuracy"] <= 1
  assert result["random_load_max_mean"] >= 1 and result["config"]["vocab_size"] == 16

  # A checkpoint's run that does not fit names the checkpoint, not a --config never given.
  proc = run("generate", f"--checkpoint={workdir}", "--deployment=single", "--batch=200000000")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"generate --checkpoint={workdir} does not fit" in proc.stderr, proc.stderr[-2000:]


def test_a_workdir_whose_directory_is_missing_is_refused(tmp_path):
  # The run would create the whole path: a typo would train into a new tree unnoticed.
  missing = tmp_path / "typo" / "run"
  proc = run("train", "--config=tiny_task", f"--workdir={missing}", "--steps=2")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"its directory {missing.parent} does not exist; create it first" in proc.stderr
  assert not (tmp_path / "typo").exists() and "compiling" not in proc.stdout
  proc = run("train", "--config=tiny_task", "--workdir=", "--steps=2")
  assert proc.returncode == 2 and "--workdir= is empty" in proc.stderr, proc.stderr[-2000:]
