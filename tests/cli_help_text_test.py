"""Tests for jax_ep/cli/help_text.py: `jax-ep --help` and `jax-ep COMMAND --help`, each
flag with the parts of its help and the default that concern the command."""

from jax_ep.cli import help_text, main


def test_help_text_lists_each_flag_with_its_default():
  text = help_text.help_text(main.COMMANDS["import-hf"])
  assert "  --src: import-hf: a Hugging Face Mixtral directory" in text
  assert "(default: unset)" in text and "--steps" not in text
  # bench's own defaults, not train's --steps or absl's None.
  bench = help_text.help_text(main.COMMANDS["bench"], command="bench")
  assert "(default: 20 on GPU, 4 on CPU)" in bench and "(default: 200)" not in bench
  assert "(default: None)" not in bench
  # absl's defaults as a user types them: tiny, not 'tiny'.
  generate = help_text.help_text(main.COMMANDS["generate"], command="generate")
  assert "(default: tiny)" in generate and "'tiny'" not in generate


def test_all_help_gives_each_command_its_own_default():
  text = help_text.all_help(main.COMMANDS, main.OFFLINE)
  steps = text[text.index("  --steps:"):].split("\n  --")[0]
  # absl's one default (train's 200) is not shown as bench's.
  assert "bench: 20 on GPU, 4 on CPU; train: 200" in " ".join(steps.split())
  assert "(read by bench, train)" in steps
  # The runtime flags: every command that uses devices, not the offline ones.
  runtime = " ".join(text[text.index("  --num_processes:"):].split("\n  --")[0].split())
  assert "(read by generate, bench, train, import-hf, export-hf)" in runtime


def test_each_command_help_keeps_only_its_own_parts_of_a_shared_flag():
  bench = " ".join(help_text.help_text(main.COMMANDS["bench"], command="bench").split())
  train = " ".join(help_text.help_text(main.COMMANDS["train"], command="train").split())
  assert "--steps: Decode steps timed back to back, TPOT is their mean." in bench
  assert "optimizer" not in bench and "TPOT" not in train
  assert "--steps: Optimizer steps in all" in train
  assert "--batch: Sequences a training step. (an integer) (default: 32)" in train
  assert "train.py" not in bench.split("--[no]check_memory:")[1].split(" --")[0]
  export = " ".join(help_text.help_text(main.COMMANDS["export-hf"],
                                            command="export-hf").split())
  assert "its latest step; the model and weights to write." in export
  assert "deployment" not in export
  # A help naming no command, and a command the help names no part for, keep it whole.
  assert help_text.for_command("Seed for weights.", "bench") == "Seed for weights."
  assert help_text.for_command("train: a; bench: b", "plan") == "train: a; bench: b"
  assert help_text.for_command("x (plan: y); train: z", "plan") == "X (plan: y)."


def test_help_segments_respect_brackets_enums_and_the_command_list():
  assert help_text.for_command("a [x; train: y]; bench: z", "bench") == "A [x; train: y]; z."
  # A stray closing bracket does not stop the splitting.
  assert help_text.for_command("1) one; train: t; bench: b", "bench") == "1) one; b."
  assert help_text.for_command("<a|b>: train: the task.", "train") == "<a|b>: The task."
  assert set(help_text.COMMAND_NAMES.split("|")) == set(main.COMMANDS)
  generate = help_text.help_text(main.COMMANDS["generate"], command="generate")
  output = " ".join(generate[generate.index("  --output:"):].split("\n  --")[0].split())
  assert output.startswith("--output: Written only when the run succeeds; a JSON file")
  assert "results JSON" not in output
  # absl's syntax line, and what a deployment flag left unset means.
  groups = generate[generate.index("  --decode_groups:"):].split("\n  --")[0]
  assert "(an integer)" in groups and "(default: the --deployment's)" in groups
  assert "(a comma separated list)" in help_text.all_help(main.COMMANDS, main.OFFLINE)
