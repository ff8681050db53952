"""Tests for jax_ep/cli/main.py: --help lists the commands and every flag; a wrong command
line is a usage error (exit 1) naming what to give; run as users run it (cli_runner.py)."""

from cli_runner import run_cases

from configs import model_names

FLAGS = ("deployment", "simulate_devices", "batch", "prompt_len", "skip_unfit", "max_new_tokens",
         "output", "profile_dir", "seed", "config", "check_numerics", "check_memory",
         "device_kind", "devices", "compile", "checkpoint", "workdir", "steps", "save_every",
         "src", "dst", "kinds", "share", "synced", "warmup", "probe_mib", "out_dir", "hardware",
         "context_len", "calibration", "plot")


def test_help_and_usage_errors():
  help_, command_help, usage, dry_run, *required = run_cases([
      ["--help"], ["generate", "--help"], ["frobnicate"], ["plan", "--dry_run"],
      ["train"], ["import-hf", "--src=x"], ["export-hf", "--checkpoint=x"]])
  assert help_["rc"] == 0 and command_help == {**help_, "args": command_help["args"]}
  assert "generate   prefill prompts" in help_["stdout"]
  for flag in FLAGS:
    assert f"--{flag}:" in help_["stdout"] or f"--[no]{flag}:" in help_["stdout"], flag
  config_help = help_["stdout"].split("--config:")[1].split("(default")[0]
  assert all(name in config_help for name in model_names())
  assert usage["rc"] == 1
  assert "usage: jax-ep {generate,bench,predict,plan,train,import-hf,export-hf}" in usage["stderr"]
  assert "unknown command 'frobnicate'" in usage["stderr"]
  assert dry_run["rc"] == 1 and "--dry_run is for generate" in dry_run["stderr"]
  for r, flag in zip(required, ["workdir", "workdir", "dst"], strict=True):
    assert r["rc"] == 1 and f"--{flag} is required here." in r["stderr"], r
