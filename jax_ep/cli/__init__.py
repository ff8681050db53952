"""The jax-ep command line (`jax-ep`, `python -m jax_ep`): main.py dispatches to one module a
command; flags.py defines every flag. The only place that reads absl flags."""

from __future__ import annotations

import importlib.util
import pathlib
import sys


def use_own_presets() -> str | None:
  """Makes `import configs` the presets installed beside jax_ep (repo/configs, or
  site-packages/configs), also where another package of that name comes first on
  sys.path: `python -m jax_ep` puts the working directory there, and a project's own
  `configs/` would otherwise break every command with an ImportError. Returns the path of
  the package it displaced, or None."""
  own = pathlib.Path(__file__).resolve().parents[2] / "configs" / "__init__.py"
  loaded = sys.modules.get("configs")
  found = getattr(loaded, "__file__", None) if loaded else None
  if found is None and loaded is None:
    spec = importlib.util.find_spec("configs")
    found = spec.origin if spec else None
  if not own.is_file() or (found and pathlib.Path(found).resolve() == own):
    return None
  spec = importlib.util.spec_from_file_location("configs", own,
                                                submodule_search_locations=[str(own.parent)])
  module = importlib.util.module_from_spec(spec)
  for name in [n for n in sys.modules if n == "configs" or n.startswith("configs.")]:
    del sys.modules[name]
  sys.modules["configs"] = module
  spec.loader.exec_module(module)
  return found


DISPLACED_PRESETS = use_own_presets()
