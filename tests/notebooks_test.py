"""The notebooks run top to bottom on CPU, a kernel each (a failing cell fails the test),
and are committed without outputs."""

import importlib.util
import json
import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 180  # the slowest cell compiles a few tiny programs: seconds, not minutes
KERNEL = "jax_ep_tests"

_spec = importlib.util.spec_from_file_location("strip_outputs",
                                               ROOT / "notebooks" / "strip_outputs.py")
strip_outputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(strip_outputs)


def test_the_notebooks_are_found():
  # The tests below are parametrized by this list: an empty one would pass unnoticed.
  assert {"01_quickstart.ipynb", "02_deployments.ipynb", "03_performance_model.ipynb"} <= {
      p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = strip_outputs.dirty_cells(nb)
  assert not dirty, (f"{path.name}: cells {dirty} carry outputs; clear them before committing "
                     "(python notebooks/strip_outputs.py).")


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
  """A kernelspec that runs this interpreter, whatever `python3` kernels are installed."""
  directory = tmp_path_factory.mktemp("kernels")
  (directory / KERNEL).mkdir()
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": f"jax_ep tests ({sys.executable})", "language": "python"}
  (directory / KERNEL / "kernel.json").write_text(json.dumps(spec))
  return KernelSpecManager(kernel_dirs=[str(directory)])


def _kernel_env():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  # The notebooks pick their devices themselves (runtime.simulate_devices). As in
  # conftest.py, LLVM's optimisation costs these tiny programs more than it saves.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  # This checkout's jax_ep, even where another one is installed.
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
  return env


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_specs, tmp_path):
  nb = nbformat.read(path, as_version=4)
  km = AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
  # The kernel starts in notebooks/, as Jupyter starts it for a notebook there; 02 starts
  # outside any checkout, as in Colab after the install cell's clone, and finds the
  # repository's launch/ through the installed jax_ep (here: PYTHONPATH).
  cwd = path.parent
  if path.stem == "02_deployments":
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                          resources={"metadata": {"path": str(cwd)}})
  # Its temporary directories (01's training run) under this test's, not left in /tmp.
  env = {**_kernel_env(), "TMPDIR": str(tmp_path)}
  client.execute(env=env)  # raises CellExecutionError at the first failing cell
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code), "a cell did not run"
  # The install cell found jax_ep importable and installed nothing.
  install = "".join(o.get("text", "") for o in code[0].outputs)
  assert "nothing to install" in install, install

  # strip_outputs.py turns the executed notebook back into the committed one.
  executed = tmp_path / path.name
  nbformat.write(nb, executed)
  assert strip_outputs.strip(executed)
  committed = nbformat.read(path, as_version=4)
  assert nbformat.read(executed, as_version=4).cells == committed.cells
