"""The presets of configs/ (one model a file, deployments.py) as jax_ep imports them.

In a checkout the presets are the directory configs/ beside jax_ep/, which the tests,
benchmarks and scripts import as `configs`. An install does not put a package of that
common name into site-packages: it installs configs/ as `jax_ep_presets` (pyproject.toml;
an editable install maps that name to the checkout's configs/). In a checkout where
`configs` is jax_ep's, the presets are that module; otherwise (a user's own `configs`
first on sys.path, as `python -m` puts the working directory there, or none) they load
from their own files under the name `jax_ep_presets`, and a user's `configs` stays what it
is. DISPLACED says whose `configs` came first (None when none or jax_ep's).
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys

PRIVATE_NAME = "jax_ep_presets"  # also the name an install gives configs/ (pyproject.toml)
OWN_INIT = pathlib.Path(__file__).resolve().parent.parent / "configs" / "__init__.py"


def _same(path) -> bool:
  return path is not None and pathlib.Path(path).resolve() == OWN_INIT


def _load():
  """(the presets package, the path of another `configs` that comes first, or None)."""
  if not OWN_INIT.is_file():  # installed from a wheel: no checkout beside jax_ep
    try:
      return importlib.import_module(PRIVATE_NAME), None
    except ImportError:
      raise ImportError(f"jax_ep's presets are missing: no {OWN_INIT} and no package "
                        f"{PRIVATE_NAME}; reinstall jax_ep (pip install -e . in a checkout)."
                        ) from None
  loaded = sys.modules.get("configs")
  if loaded is not None:
    other = getattr(loaded, "__file__", None) or f"a namespace package {list(loaded.__path__)}"
  else:
    spec = importlib.util.find_spec("configs")
    other = None if spec is None else (
        spec.origin or f"a namespace package {list(spec.submodule_search_locations)}")
  if _same(other):
    return importlib.import_module("configs"), None
  if PRIVATE_NAME not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        PRIVATE_NAME, OWN_INIT, submodule_search_locations=[str(OWN_INIT.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PRIVATE_NAME] = module
    spec.loader.exec_module(module)
  return sys.modules[PRIVATE_NAME], other


_PACKAGE, DISPLACED = _load()
load_model = _PACKAGE.load_model
model_names = _PACKAGE.model_names
deployments = importlib.import_module(f"{_PACKAGE.__name__}.deployments")


def names_of(cfg) -> list[str]:
  """The model presets whose config is `cfg` (a checkpoint's model, say) but for its KV
  cache length, which a checkpoint does not fix (checkpoint.FREE_FIELDS); [] for none."""
  import dataclasses

  return [n for n in model_names()
          if dataclasses.replace(load_model(n), max_seq_len=cfg.max_seq_len) == cfg]
