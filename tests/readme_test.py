"""README.md's Python example runs as written (in a fresh process: it sets the device count
before jax starts)."""

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_python_example_runs(tmp_path):
  readme = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
  assert len(blocks) == 1, "README.md has one Python example"
  script = blocks[0] + "\nassert set(restored) == set(params)\nprint(ckpt)\nprint('ok')\n"
  # The example sets the device count itself; LLVM unoptimised, as conftest.py runs tests.
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                        text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  *_, ckpt, ok = proc.stdout.split()
  try:
    assert ok == "ok" and os.listdir(ckpt), proc.stdout  # the checkpoint it saved
  finally:
    shutil.rmtree(ckpt, ignore_errors=True)
