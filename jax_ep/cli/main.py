"""The jax-ep command line: `jax-ep generate|bench|predict|plan|train|import-hf|export-hf
[--flags]`
(also `python -m jax_ep`).

  generate   prefill prompts and decode them on a deployment; TPS and TPOT
  bench      the single, baseline and proposed deployments side by side (benchmarks/)
  predict    the seed's table predicted by the cost model, term by term (jax_ep/perf/)
  plan       bytes per device and which device holds what, without any GPU
  train      train a small MoE on a checkable task (optax), with orbax checkpoints
  import-hf  Mixtral-format weights (config.json + *.safetensors) -> a checkpoint
  export-hf  a checkpoint -> Mixtral-format weights

`jax-ep --version` prints jax-ep's version and those of jax, flax, optax and orbax.
A thin shell: flags become configs once, here; the work is library calls.
"""

from __future__ import annotations

import os
import sys

from absl import app, logging
from absl import flags as absl_flags

from jax_ep import distributed, presets, runtime
from jax_ep.cli import command_flags, flags, generate, help_text, hf, perf, plan, train
from jax_ep.config import did_you_mean

# Each command, in the order the usage line lists them, and the function that runs it.
COMMANDS = {"generate": generate.run, "bench": perf.bench, "predict": perf.predict,
            "plan": plan.run, "train": train.run, "import-hf": hf.import_hf,
            "export-hf": hf.export_hf}
OFFLINE = ("plan", "predict")  # no device is used: no simulated devices, processes or XLA flags


def _check_flags(command: str):
  """What can be wrong with the flags `command` reads, alone, before any device or
  compile (a flag it does not read is only reported as without effect)."""
  from jax_ep.config import ConfigError
  from jax_ep.output import check_output_dir, check_output_path

  read = command_flags.reads(COMMANDS[command], command in OFFLINE)
  if "simulate_devices" in read and not -1 <= flags.SIMULATE.value <= runtime.MAX_SIMULATED:
    runtime.simulate_devices(flags.SIMULATE.value)  # raises, saying what to use
  for flag in (flags.BATCH, flags.PROMPT_LEN, flags.NEW, flags.DEVICES, flags.STEPS,
               flags.SYNCED, flags.PROBE_MIB, flags.CONTEXT_LEN, flags.TASK_DIGITS,
               flags.PER_CALL):
    if flag.name in read and flag.value is not None and flag.value < 1:
      raise ConfigError(f"--{flag.name}={flag.value} must be a positive integer.")
  for flag in (flags.WARMUP, flags.SAVE_EVERY):
    if flag.name in read and flag.value < 0:
      raise ConfigError(f"--{flag.name}={flag.value} must be 0 or more.")
  for flag in (flags.CHECKPOINT, flags.WORKDIR, flags.SRC, flags.DST):  # "$CKPT" unset
    if flag.name in read and flag.present and not flag.value:
      raise ConfigError(f"--{flag.name}= is empty: give a directory, or leave the flag out.")
  for flag in (flags.WORKDIR, flags.DST):  # created if missing, but not their parents
    if flag.name in read and flag.value:
      parent = os.path.dirname(os.path.abspath(flag.value))
      if not os.path.isdir(parent):
        raise ConfigError(f"--{flag.name}={flag.value}: its directory {parent} does not exist; "
                          "create it first (so that a typo there does not write a new tree).")
  if distributed.resolve(flags.COORDINATOR.value, flags.NUM_PROCESSES.value,
                         flags.PROCESS_ID.value).process_id == 0:  # only process 0 writes
    if "output" in read:
      check_output_path(flags.OUTPUT.value)
    for flag in (flags.PROFILE, flags.OUT_DIR):
      if flag.name in read:
        check_output_dir(flag.value, f"--{flag.name}")


def _setup_processes(command: str):
  """jax.distributed from the flags or environment, then the same flags on every process.

  Process 0 alone writes --output (so only it checks the directory: _check_flags).
  """
  args = (flags.COORDINATOR.value, flags.NUM_PROCESSES.value, flags.PROCESS_ID.value)
  if distributed.resolve(*args).process_id != 0:
    logging.set_verbosity(logging.WARNING)  # process 0 logs; the others only warn and fail
  distributed.initialize(*args, timeout_s=flags.DIST_TIMEOUT.value)
  values = {f"--{f.name}": f.value for f in absl_flags.FLAGS.get_flags_for_module(flags)
            if f.name != "process_id"}
  distributed.check_same("flags", {"command": command, **values, **distributed.versions()},
                         flags.DIST_TIMEOUT.value)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    got = ("no command" if len(argv) < 2 else f"more than one command: {argv[1:]}"
           if len(argv) > 2 else f"unknown command {argv[1]!r}")
    hint = did_you_mean(argv[1], COMMANDS) if len(argv) == 2 else ""
    raise app.UsageError(f"{got}.{hint} usage: jax-ep {{{','.join(COMMANDS)}}} [--flags]")
  if flags.DRY_RUN.value and argv[1] != "generate":
    raise app.UsageError("--dry_run is for generate (jax-ep generate --dry_run).")
  _check_flags(argv[1])
  unread = command_flags.unread(COMMANDS[argv[1]], argv[1] in OFFLINE)
  first = distributed.resolve(flags.COORDINATOR.value, flags.NUM_PROCESSES.value,
                              flags.PROCESS_ID.value).process_id == 0
  if unread and first:  # every process of a launch gets the same flags: one report
    print(f"jax-ep {argv[1]}: not read by {argv[1]}, so without effect: "
          f"{', '.join('--' + n for n in unread)} (`jax-ep {argv[1]} --help` lists its flags).",
          file=sys.stderr, flush=True)
  if argv[1] not in OFFLINE:
    runtime.simulate_devices(flags.SIMULATE.value)
    runtime.set_xla_flags(flags.OVERLAP.value)
    _setup_processes(argv[1])
    runtime.quiet_library_logs()
  return COMMANDS[argv[1]]()


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")


def print_help(command: str | None = None) -> None:
  """The commands and every flag of jax-ep, or one command's line and the flags it reads
  (absl's --help lists the flags of the calling module only: none for the console script,
  and exits 1)."""
  if command is None:
    print(__doc__)
    print("Every flag, with the commands that read it and each one's default\n"
          "(`jax-ep COMMAND --help`: one command's flags only):\n")
    print(help_text.all_help(COMMANDS, OFFLINE))
    return
  line = next(ln for ln in __doc__.splitlines() if ln.strip().startswith(command + " "))
  print(f"jax-ep {command} [--flags]\n\n{line}\n\nFlags it reads:")
  print(help_text.help_text(COMMANDS[command], command in OFFLINE, command))


def _usage_error(message: str):
  """A usage error as jax-ep's other errors read (absl's own prints the entry module's
  docstring first, and points at flags that list nothing here); exit 1."""
  command = next((a for a in sys.argv[1:] if a in COMMANDS), None)
  where = f"`jax-ep {command} --help` lists its flags" if command else (
      "`jax-ep --help` lists the commands and flags")
  print(f"jax-ep: error: {message} ({where}.)", file=sys.stderr)
  sys.exit(1)


def _parse_flags(argv):
  try:
    return absl_flags.FLAGS(argv)
  except absl_flags.Error as e:
    _usage_error(str(e))


def _main(argv):
  try:
    return main(argv)
  except app.UsageError as e:
    _usage_error(str(e))


def version_line() -> str:
  """jax_ep's version and the versions of what it runs on, from the installed packages
  (nothing is imported: jax does not start a backend for this)."""
  from importlib import metadata

  import jax_ep

  def installed(name):
    try:
      return metadata.version(name)
    except metadata.PackageNotFoundError:
      return "not installed"

  deps = ", ".join(f"{n} {installed(n)}" for n in ("jax", "jaxlib", "flax", "optax",
                                                     "orbax-checkpoint"))
  return f"jax-ep {jax_ep.__version__} ({deps})"


def run():
  """Console-script entry point (and `python -m jax_ep`'s)."""
  from jax_ep.config import ConfigError

  if presets.DISPLACED:
    print(f"jax-ep: --config and --deployment name jax-ep's presets ({presets.OWN_INIT}), "
          f"not the 'configs' package at {presets.DISPLACED} that comes first on the path.",
          file=sys.stderr)
  if sys.argv[1:] in (["--version"], ["-V"]):
    print(version_line())
    sys.exit(0)
  if any(a in HELP_FLAGS for a in sys.argv[1:]):
    commands = [a for a in sys.argv[1:] if a in COMMANDS]
    print_help(commands[0] if len(commands) == 1 else None)
    sys.exit(0)
  try:
    app.run(_main, flags_parser=_parse_flags)
  except ConfigError as e:
    command = next((a for a in sys.argv[1:] if a in COMMANDS), None)
    reads = command_flags.reads(COMMANDS[command], command in OFFLINE) if command else None
    message = flags.flag_message(str(e), reads)
    print(f"jax-ep: error: {message}", file=sys.stderr)
    distributed.report_failure(message)  # the others, if any, say so rather than wait
    sys.exit(2)
