"""The GPU benchmark scripts' logic on the CPU: every kernel variant benchmarks/decode_parts.py
names is a valid --expert_blocks spec for the seed's shapes, a part runs end to end
through the Pallas interpreter (--cpu_check: tiny shapes), and h200_x4.sh runs every part
its usage names and refuses others before writing anything."""

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks import decode_parts
from jax_ep.kernels import grouped_matmul as gm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("swiglu,variants", [
    *[(False, v) for v in decode_parts.KERNEL_SETS.values()],
    *[(True, v) for v in decode_parts.SWIGLU_SETS.values()]])
def test_every_variant_tiles_the_seed(swiglu, variants):
  for name, spec in variants.items():
    up, down = gm.mlp_blocks(decode_parts.D, decode_parts.F, swiglu, spec)
    assert gm.mlp_supports(decode_parts.D, decode_parts.F, swiglu, spec) is None, name
    if spec:  # a variant changes what it says
      assert (up, down) != gm.mlp_blocks(decode_parts.D, decode_parts.F, swiglu), name


def test_the_swiglu_part_runs_through_the_interpreter(tmp_path):
  out = tmp_path / "parts.json"
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  proc = subprocess.run(
      # The swiglu part (the kernel part is the same code with GELU's blocks).
      [sys.executable, "benchmarks/decode_parts.py", "--cpu_check", "--parts=swiglu",
       "--swiglu_set=smoke", "--row_sets=seed_layer3", f"--out={out}"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())["swiglu"]["seed_layer3"]
  assert sorted(got) == sorted(decode_parts.SWIGLU_SETS["smoke"])
  assert all(v["max_abs_diff_vs_first"] < 1e-2 for v in got.values()), got


def test_every_part_of_the_gpu_script_has_its_branch(tmp_path):
  # benchmarks/scripts/h200_x4.sh: the parts its usage names are the parts it runs, and an
  # unknown part is refused before anything runs (a lost device call otherwise).
  script = os.path.join(ROOT, "benchmarks", "scripts", "h200_x4.sh")
  text = open(script).read()
  proc = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True,
                        env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
  assert proc.returncode == 2 and "unknown PART 'bogus'" in proc.stderr
  named = proc.stderr.split("use ")[1].replace(" or ", ", ").strip().split(", ")
  branches = re.findall(r'if \[ "\$PART" = (\w+) \]', text)
  assert sorted(named) == sorted(branches) and len(named) >= 10, (named, branches)
  assert not list(tmp_path.iterdir())  # refused before writing anything
  assert subprocess.run(["bash", "-n", script]).returncode == 0
