"""Tests for jax_ep/cli/command_flags.py: the flags each command reads, found in its code,
match what its code does (the expected sets below, written from the command modules), and
every flag is read by some command."""

from absl import flags as absl_flags

from jax_ep.cli import command_flags, flags, main

RUNTIME = set(command_flags.RUNTIME)
MESH = {"deployment", "stages", "expert_axis", "tp", "placement", "microbatches",
        "decode_groups", "tokens_per_call", "prefill_chunk", "kernels", "capacity_factor",
        "dropless"}


def _reads(command):
  return set(command_flags.reads(main.COMMANDS[command], command in main.OFFLINE))


def test_each_command_reads_what_its_code_reads():
  assert _reads("train") == RUNTIME | {"config", "workdir", "steps", "batch", "learning_rate",
                                       "seed", "task", "task_digits", "save_every",
                                       "check_memory"}
  assert _reads("import-hf") == RUNTIME | {"src", "workdir"}
  assert _reads("export-hf") == RUNTIME | {"checkpoint", "dst"}
  assert _reads("predict") == {"batch", "calibration", "context_len", "hardware", "plot"}
  # generate goes through flags.deployment_for / batch_for: the helpers' flags count.
  assert MESH | {"batch", "temperature", "dry_run", "check_numerics", "profile_dir",
                 "output", "checkpoint"} <= _reads("generate")
  assert "steps" not in _reads("generate") and "kinds" not in _reads("generate")
  # bench names the mesh flags only to warn about them (a module-level tuple): not reads.
  assert "deployment" not in _reads("bench") and "kinds" in _reads("bench")
  assert "simulate_devices" not in _reads("plan") and "device_kind" in _reads("plan")


def test_every_flag_is_read_by_some_command():
  names = {h.name for h in vars(flags).values() if isinstance(h, absl_flags.FlagHolder)}
  read = set().union(*(_reads(c) for c in main.COMMANDS))
  assert names - read == set()
