"""Run a script with grouped_mlp's SwiGLU up blocks replaced: argv = n k stages script args..."""
import runpy
import sys

sys.path.insert(0, ".")
from jax_ep.kernels import grouped_matmul as gm
from jax_ep.kernels.groups import Blocks

n, k, s = map(int, sys.argv[1:4])
gm.SWIGLU_UP_BLOCKS = Blocks(block_n=n, block_k=k, num_stages=s)
sys.argv = sys.argv[4:]
if sys.argv[0] == "-m":
  sys.argv = sys.argv[1:]
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
  runpy.run_path(sys.argv[0], run_name="__main__")
