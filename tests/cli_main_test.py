"""Tests for jax_ep/cli/main.py: --help lists the commands and every flag, `<command> --help`
the flags the command reads; a wrong command line is a usage error (exit 1) naming what to
give, a flag the command does not read is reported; run as users run it (cli_runner.py)."""

from cli_runner import run_cases

from configs import model_names

FLAGS = ("deployment", "simulate_devices", "batch", "prompt_len", "skip_unfit", "max_new_tokens",
         "output", "profile_dir", "seed", "config", "check_numerics", "check_memory",
         "device_kind", "devices", "compile", "checkpoint", "workdir", "steps", "save_every",
         "src", "dst", "kinds", "share", "synced", "warmup", "probe_mib", "out_dir", "hardware",
         "context_len", "calibration", "plot", "expert_blocks")


def test_help_and_usage_errors():
  help_, command_help, train_help, usage, dry_run, unread, blocks, *required = run_cases([
      ["--help"], ["generate", "--help"], ["train", "-h"], ["frobnicate"],
      ["plan", "--dry_run"], ["plan", "--steps=3", "--kinds=single"],
      ["bench", "--expert_blocks=up.tail=16"],
      ["train"], ["import-hf", "--src=x"], ["export-hf", "--checkpoint=x"]])
  assert help_["rc"] == 0 and "generate   prefill prompts" in help_["stdout"]
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
  assert "unknown command 'frobnicate'" in usage["stderr"]
  assert dry_run["rc"] == 1 and "--dry_run is for generate" in dry_run["stderr"]
  assert blocks["rc"] == 1 and "'tail' is not a Blocks field" in blocks["stderr"]
  for r, flag in zip(required, ["workdir", "workdir", "dst"], strict=True):
    assert r["rc"] == 1 and f"--{flag} is required here." in r["stderr"], r
