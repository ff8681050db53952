"""What `jax-ep --help` and `jax-ep COMMAND --help` print: each flag a command reads
(command_flags.py finds them), the parts of its help that concern that command, its
syntax, and the default that command takes.
"""

from __future__ import annotations

import re
import textwrap

from absl import flags as absl_flags

from jax_ep.cli import flags
from jax_ep.cli.command_flags import reads

# The commands' names as a help's parts name them (tests/cli_help_text_test.py: main's).
COMMAND_NAMES = "generate|bench|predict|plan|train|import-hf|export-hf"

# Defaults a command takes itself where a flag is not given (absl's single default is
# another command's, or None): what each command's --help shows.
COMMAND_DEFAULTS = {
    "bench": {"config": "seed on GPU, tiny on CPU", "prompt_len": "32 on GPU, 8 on CPU",
              "steps": "20 on GPU, 4 on CPU", "max_new_tokens": "none: --steps sets the steps",
              "batch": "1024", "tokens_per_call": "1", "devices": "all",
              "probe_mib": "4096 on GPU, 64 on CPU", "kinds": "single, baseline, proposed"},
    "predict": {"batch": "1024"},
    "generate": {"batch": "8, rounded up to a batch the deployment splits"},
    "plan": {"batch": "8, rounded up to a batch the deployment splits",
             "devices": "the deployment's own count; 8 for baseline or proposed",
             "mem_fraction": "$XLA_PYTHON_CLIENT_MEM_FRACTION, else jax's 0.75"},
    "train": {"batch": "32"},
}


def _segments(text: str) -> list[tuple[frozenset[str] | None, str]]:
  """A flag's help cut where a part for some commands begins ("...; train: ..." outside
  brackets): [(the commands it names, or None for the part before any, its text)]."""
  label = re.compile(r"((?:%s)(?:, (?:%s))*): " % ((COMMAND_NAMES,) * 2))
  cuts, depth = [0], 0
  for i, char in enumerate(text):
    depth = max(0, depth + (char in "([{") - (char in ")]}"))
    if depth == 0 and text.startswith("; ", i) and label.match(text, i + 2):
      cuts.append(i + 2)
  parts = [text[a:b].rstrip("; ") for a, b in zip(cuts, cuts[1:] + [len(text)], strict=True)]
  out = []
  for part in parts:
    m = label.match(part)
    out.append((frozenset(m.group(1).split(", ")), part[m.end():]) if m else (None, part))
  return out


def for_command(text: str, command: str) -> str:
  """The parts of a flag's help that concern `command`: "train: steps in all; bench: steps
  timed" reads "steps timed" for bench. absl's "<a|b>: " before an enum's help is kept."""
  enum = re.match(r"<[^>]*>: ", text)
  if enum:
    return enum.group(0) + for_command(text[enum.end():], command)
  segments = _segments(text)
  if not command or all(names is None for names, _ in segments):
    return text
  kept = "; ".join(t for names, t in segments if names is None or command in names)
  if not kept:
    return text
  return kept[0].upper() + kept[1:] + ("" if kept.endswith(".") else ".")


def _entry(name: str, default: str, command: str = "") -> str:
  flag = absl_flags.FLAGS[name]
  prefix = "--[no]" if flag.boolean else "--"
  body = textwrap.fill(f"{prefix}{name}: {for_command(flag.help, command)}", width=88,
                       initial_indent="  ", subsequent_indent="    ")
  syntax = flag.parser.syntactic_help  # "an integer", "a comma separated list", ...
  if syntax and not flag.boolean and "<" not in flag.help[:1]:
    body += f"\n    ({syntax})"
  tail = textwrap.fill(f"(default: {default})", width=88, initial_indent="    ",
                       subsequent_indent="    ")
  return f"{body}\n{tail}"


def _absl_default(name: str) -> str:
  """absl's default; for a flag that overrides a deployment field and is not given, the
  --deployment's value."""
  flag = absl_flags.FLAGS[name]
  if flag.default is None and name in flags.FLAG_OF_FIELD.values():
    return "the --deployment's"
  if flag.default is None:
    return "unset"
  text = flag.default_as_str  # absl quotes them: "'200'"
  return text[1:-1] if len(text) > 2 and text[0] == text[-1] == "'" else text


def all_help(commands: dict, offline=()) -> str:
  """Every flag of jax-ep, each with the commands that read it and the default each of
  them takes: `--steps` is 200 for train and 20 on GPU for bench, not absl's one value."""
  readers: dict[str, list[str]] = {}
  for command, fn in commands.items():
    for name in reads(fn, command in offline):
      readers.setdefault(name, []).append(command)
  lines = []
  for name in sorted(readers):
    by_default: dict[str, list[str]] = {}
    for command in readers[name]:
      value = COMMAND_DEFAULTS.get(command, {}).get(name) or _absl_default(name)
      by_default.setdefault(value, []).append(command)
    if len(by_default) == 1:
      default = next(iter(by_default))
    else:
      default = "; ".join(f"{', '.join(cs)}: {v}" for v, cs in by_default.items())
    lines.append(_entry(name, default)
                 + ("" if len(readers[name]) == len(commands)
                    else f"\n    (read by {', '.join(readers[name])})"))
  return "\n".join(lines)


def help_text(fn, offline: bool = False, command: str = "") -> str:
  """Each flag `fn` reads: name, the parts of its help for `command`, its syntax, and its
  default (the command's own where COMMAND_DEFAULTS has it; "unset" where there is none)."""
  own = COMMAND_DEFAULTS.get(command, {})
  return "\n".join(_entry(name, own.get(name) or _absl_default(name), command)
                   for name in sorted(reads(fn, offline)))
