"""The seed's grouped expert MLP (16 GELU experts, 8192 x 32768, 2048 rows) on one of
decode_parts.py's row sets (skewed, balanced, seed_layer3, near128), or the SwiGLU MLP
(second argument `swiglu`), three calls, for a hardware-counter profiler to capture, e.g.:

  ncu -k regex:grouped_matmul --launch-skip 2 --launch-count 2 \\
      --metrics dram__bytes_read.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum \\
      python3 benchmarks/ncu_kernel.py skewed

Random weights and rows (never zeros). `bash benchmarks/scripts/h200_x4.sh ncu COMMIT`
runs it under ncu with its speed-of-light, warp-state and memory sections.
"""

import sys

import jax
import jax.numpy as jnp

from benchmarks.decode_parts import ROW_SETS
from jax_ep.kernels import grouped_matmul as gm

E, D, F = 16, 8192, 32768


def _rand(key, shape, scale):
  return (jax.random.normal(jax.random.key(key), shape, jnp.float32) * scale).astype(jnp.float16)


def main(which: str, mlp_kind: str = "gelu"):
  sizes = ROW_SETS[which]
  w_up, w_down = _rand(1, (E, D, F), D ** -0.5), _rand(2, (E, F, D), F ** -0.5)
  w_gate = _rand(4, (E, D, F), D ** -0.5) if mlp_kind == "swiglu" else None
  x, gs = _rand(3, (sum(sizes), D), 1.0), jnp.asarray(sizes, jnp.int32)
  mlp = jax.jit(lambda x, gs, u, d, g: gm.grouped_mlp(x, gs, u, d, g, impl="pallas"))
  for _ in range(3):
    mlp(x, gs, w_up, w_down, w_gate).block_until_ready()


if __name__ == "__main__":
  args = sys.argv[1:]
  which = args[0] if args else "skewed"
  kind = args[1] if len(args) > 1 else "gelu"
  if len(args) > 2 or which not in ROW_SETS or kind not in ("gelu", "swiglu"):
    sys.exit(f"usage: python3 benchmarks/ncu_kernel.py [{'|'.join(ROW_SETS)}] [gelu|swiglu] "
             f"(GPU only)\n{__doc__}")
  main(which, kind)
