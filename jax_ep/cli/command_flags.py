"""Which flags each command reads, found in its code: `jax-ep <command> --help` lists
them, and a flag given to a command that does not read it is reported.

A command reads a flag when its function, a function of its module that it calls, or a
helper of cli/flags.py that it calls, names the flag's holder (`flags.BATCH`); the
module-level constants of a command module (bench's mesh flags, which it only warns
about) are not reads. Reading the code rather than keeping a table means the help cannot
drift from what a command does.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sys
import textwrap

from absl import flags as absl_flags

from jax_ep.cli import flags

# Read by main for every command that uses devices (cli/main.py: OFFLINE ones use none).
RUNTIME = ("simulate_devices", "xla_overlap", "coordinator_address", "num_processes",
           "process_id", "distributed_timeout_s")


def _holders() -> dict[str, str]:
  """Holder name in cli/flags.py -> flag name."""
  return {k: v.name for k, v in vars(flags).items() if isinstance(v, absl_flags.FlagHolder)}


@functools.cache
def _functions(module_name: str) -> dict[str, ast.FunctionDef]:
  tree = ast.parse(inspect.getsource(sys.modules[module_name]))
  return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _reads(module_name: str, fn_name: str, seen: set) -> set[str]:
  if (module_name, fn_name) in seen:
    return set()
  seen.add((module_name, fn_name))
  holders, local = _holders(), _functions(module_name)
  helpers = _functions(flags.__name__)
  out: set[str] = set()
  for node in ast.walk(local[fn_name]):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id == "flags"):
      if node.attr in holders:
        out.add(holders[node.attr])
      elif node.attr in helpers:
        out |= _reads(flags.__name__, node.attr, seen)
    elif isinstance(node, ast.Name):
      if module_name == flags.__name__ and node.id in holders:
        out.add(holders[node.id])
      elif node.id in local and node.id != fn_name:
        out |= _reads(module_name, node.id, seen)
  return out


def reads(fn, offline: bool = False) -> frozenset[str]:
  """The flags command function `fn` reads, with main's runtime flags unless `offline`."""
  found = _reads(fn.__module__, fn.__name__, set())
  return frozenset(found | (set() if offline else set(RUNTIME)))


def unread(fn, offline: bool = False) -> list[str]:
  """The flags given on the command line that `fn` does not read."""
  read = reads(fn, offline)
  return sorted(h.name for h in _holder_objects() if h.present and h.name not in read)


def _holder_objects():
  return [v for v in vars(flags).values() if isinstance(v, absl_flags.FlagHolder)]


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
  return "unset" if flag.default is None else flag.default_as_str


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


COMMAND_NAMES = "generate|bench|predict|plan|train|import-hf|export-hf"


def help_text(fn, offline: bool = False, command: str = "") -> str:
  """Each flag `fn` reads: name, the parts of its help for `command`, its syntax, and its
  default (the command's own where COMMAND_DEFAULTS has it; "unset" where there is none)."""
  own = COMMAND_DEFAULTS.get(command, {})
  return "\n".join(_entry(name, own.get(name) or _absl_default(name), command)
                   for name in sorted(reads(fn, offline)))
