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
import sys

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
