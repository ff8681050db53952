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


def test_help_text_lists_each_flag_with_its_default():
  text = command_flags.help_text(main.COMMANDS["import-hf"])
  assert "  --src: import-hf: a Hugging Face Mixtral directory" in text
  assert "(default: unset)" in text and "--steps" not in text
  # bench's own defaults, not train's --steps or absl's None.
  bench = command_flags.help_text(main.COMMANDS["bench"], command="bench")
  assert "(default: 20 on GPU, 4 on CPU)" in bench and "(default: '200')" not in bench
  assert "(default: None)" not in bench


def test_all_help_gives_each_command_its_own_default():
  text = command_flags.all_help(main.COMMANDS, main.OFFLINE)
  steps = text[text.index("  --steps:"):].split("\n  --")[0]
  # absl's one default (train's 200) is not shown as bench's.
  assert "bench: 20 on GPU, 4 on CPU; train: '200'" in " ".join(steps.split())
  assert "(read by bench, train)" in steps
  # The runtime flags: every command that uses devices, not the offline ones.
  runtime = " ".join(text[text.index("  --num_processes:"):].split("\n  --")[0].split())
  assert "(read by generate, bench, train, import-hf, export-hf)" in runtime


def test_each_command_help_keeps_only_its_own_parts_of_a_shared_flag():
  bench = " ".join(command_flags.help_text(main.COMMANDS["bench"], command="bench").split())
  train = " ".join(command_flags.help_text(main.COMMANDS["train"], command="train").split())
  assert "--steps: Decode steps timed back to back, TPOT is their mean." in bench
  assert "optimizer" not in bench and "TPOT" not in train
  assert "--steps: Optimizer steps in all" in train
  assert "--batch: Sequences a training step. (an integer) (default: 32)" in train
  assert "train.py" not in bench.split("--[no]check_memory:")[1].split(" --")[0]
  export = " ".join(command_flags.help_text(main.COMMANDS["export-hf"],
                                            command="export-hf").split())
  assert "its latest step; the model and weights to write." in export
  assert "deployment" not in export
  # A help naming no command, and a command the help names no part for, keep it whole.
  assert command_flags.for_command("Seed for weights.", "bench") == "Seed for weights."
  assert command_flags.for_command("train: a; bench: b", "plan") == "train: a; bench: b"
  assert command_flags.for_command("x (plan: y); train: z", "plan") == "X (plan: y)."


def test_help_segments_respect_brackets_enums_and_the_command_list():
  assert command_flags.for_command("a [x; train: y]; bench: z", "bench") == "A [x; train: y]; z."
  # A stray closing bracket does not stop the splitting.
  assert command_flags.for_command("1) one; train: t; bench: b", "bench") == "1) one; b."
  assert command_flags.for_command("<a|b>: train: the task.", "train") == "<a|b>: The task."
  assert set(command_flags.COMMAND_NAMES.split("|")) == set(main.COMMANDS)
  generate = command_flags.help_text(main.COMMANDS["generate"], command="generate")
  output = " ".join(generate[generate.index("  --output:"):].split("\n  --")[0].split())
  assert output.startswith("--output: Written only when the run succeeds; a JSON file")
  assert "results JSON" not in output
  # absl's syntax line, and what a deployment flag left unset means.
  groups = generate[generate.index("  --decode_groups:"):].split("\n  --")[0]
  assert "(an integer)" in groups and "(default: the --deployment's)" in groups
  assert "(a comma separated list)" in command_flags.all_help(main.COMMANDS, main.OFFLINE)
