"""Tests for jax_ep/cli/main.py: --help lists the commands and every flag, `<command> --help`
the flags the command reads; a wrong command line is a usage error (exit 1) naming what to
give, a flag the command does not read is reported; run as users run it (cli_runner.py)."""

import os
import subprocess
import sys

from cli_runner import run_cases

from configs import model_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ("deployment", "simulate_devices", "batch", "prompt_len", "skip_unfit", "max_new_tokens",
         "output", "profile_dir", "seed", "config", "check_numerics", "check_memory",
         "device_kind", "devices", "compile", "checkpoint", "workdir", "steps", "save_every",
         "src", "dst", "kinds", "share", "synced", "warmup", "probe_mib", "out_dir", "hardware",
         "context_len", "calibration", "plot", "expert_blocks")


def test_help_and_usage_errors():
  (version, help_, command_help, train_help, usage, typo, bad_value, dry_run, unread, blocks,
   *required) = run_cases([
      ["--version"], ["--help"], ["generate", "--help"], ["train", "-h"], ["frobnicate"],
      ["genrate"],
      ["generate", "--batch=abc"],
      ["plan", "--dry_run"], ["plan", "--steps=3", "--kinds=single"],
      ["bench", "--expert_blocks=up.tail=16"],
      ["train"], ["import-hf", "--src=x"], ["export-hf", "--checkpoint=x"]])
  import jax

  import jax_ep
  assert version["rc"] == 0, version
  assert version["stdout"].startswith(f"jax-ep {jax_ep.__version__} (jax {jax.__version__}, ")
  assert "flax " in version["stdout"] and "orbax-checkpoint " in version["stdout"]
  assert help_["rc"] == 0 and "generate   prefill prompts" in help_["stdout"]
  assert "`jax-ep --version`" in help_["stdout"]
  gen = command_help["stdout"]
  assert command_help["rc"] == 0 and gen.startswith("jax-ep generate [--flags]")
  assert "--batch:" in gen and "--[no]dry_run:" in gen and "--simulate_devices:" in gen
  assert "--steps:" not in gen and "--kinds:" not in gen and "--src:" not in gen
  train = train_help["stdout"]
  assert "--steps:" in train and "--workdir:" in train and "--deployment:" not in train
  assert unread["rc"] == 0
  assert ("jax-ep plan: not read by plan, so without effect: --kinds, --steps"
          in unread["stderr"])
  for flag in FLAGS:
    assert f"--{flag}:" in help_["stdout"] or f"--[no]{flag}:" in help_["stdout"], flag
  config_help = help_["stdout"].split("--config:")[1].split("(default")[0]
  assert all(name in config_help for name in model_names())
  assert usage["rc"] == 1
  assert "usage: jax-ep {generate,bench,predict,plan,train,import-hf,export-hf}" in usage["stderr"]
  assert "unknown command 'frobnicate'" in usage["stderr"] and "Did you mean" not in usage["stderr"]
  assert typo["rc"] == 1 and "unknown command 'genrate'. Did you mean 'generate'?" in typo["stderr"]
  assert bad_value["rc"] == 1 and bad_value["stderr"].startswith(
      "jax-ep: error: flag --batch=abc: invalid literal"), bad_value["stderr"]
  assert "(`jax-ep generate --help` lists its flags.)" in bad_value["stderr"]
  assert dry_run["rc"] == 1 and "--dry_run is for generate" in dry_run["stderr"]
  assert blocks["rc"] == 1 and "'tail' is not a Blocks field" in blocks["stderr"]
  for r, flag, command, every in zip(required, ["workdir", "workdir", "dst"],
                                     ["train", "import-hf", "export-hf"],
                                     ["--workdir", "--src and --workdir", "--checkpoint and --dst"],
                                     strict=True):
    assert r["rc"] == 1 and (f"--{flag} is required here: jax-ep {command} needs {every}. "
                             f"(`jax-ep {command} --help` lists its flags.)") in r["stderr"], r
    assert "python -m jax_ep" not in r["stderr"] and "--helpshort" not in r["stderr"], r


def test_a_configs_package_in_the_working_directory_does_not_shadow_the_presets(tmp_path):
  # `python -m jax_ep` puts the working directory first on sys.path; a project's own
  # configs/ there would break every command with an ImportError.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "__init__.py").write_text("NOT_JAX_EP = True\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = ROOT  # jax_ep from this checkout; the cwd still comes first
  proc = subprocess.run([sys.executable, "-m", "jax_ep", "plan", "--config=tiny"], cwd=tmp_path,
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "model tiny: 4 layers" in proc.stdout
  assert f"not the 'configs' package at {tmp_path / 'configs' / '__init__.py'}" in proc.stderr
