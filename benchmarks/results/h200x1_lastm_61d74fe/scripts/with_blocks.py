"""Run a script or module with grouped_mlp's blocks changed: argv = n k stages last_m
(script | -m module) args... (SwiGLU's fused up product's blocks)."""
import runpy
import sys

sys.path.insert(0, ".")
from jax_ep.kernels import grouped_matmul as gm  # noqa: E402
from jax_ep.kernels.groups import Blocks  # noqa: E402

n, k, s, last_m = map(int, sys.argv[1:5])
gm.SWIGLU_UP_BLOCKS = Blocks(block_n=n, block_k=k, num_stages=s, last_m=last_m)
sys.argv = sys.argv[5:]
if sys.argv[0] == "-m":
  sys.argv = sys.argv[1:]
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
  runpy.run_path(sys.argv[0], run_name="__main__")
