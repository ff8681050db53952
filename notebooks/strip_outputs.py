"""Clears notebooks' outputs before a commit: python notebooks/strip_outputs.py [FILES].

Without arguments, every notebook in this folder. tests/notebooks_test.py fails on a
committed notebook with outputs.
"""

import pathlib
import sys

import nbformat


def dirty_cells(nb) -> list[int]:
  """Indices of the code cells that carry outputs, an execution count or run timings."""
  return [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
          and (c.outputs or c.execution_count is not None or "execution" in c.metadata)]


def strip(path) -> bool:
  """Clears the outputs, execution counts and run timings of `path` in place; True if it
  changed."""
  nb = nbformat.read(path, as_version=4)
  dirty = dirty_cells(nb)
  for i in dirty:
    cell = nb.cells[i]
    cell.outputs, cell.execution_count = [], None
    cell.metadata.pop("execution", None)
  if dirty:
    nbformat.write(nb, path)
  return bool(dirty)


if __name__ == "__main__":
  paths = sys.argv[1:] or sorted(pathlib.Path(__file__).parent.glob("*.ipynb"))
  for p in paths:
    print(f"{p}: {'stripped' if strip(p) else 'clean'}")
