"""The seed's grouped expert MLP (16 GELU experts, 8192 x 32768, 2048 rows) on one of
decode_parts.py's row sets (skewed, balanced, seed_layer3, near128), three calls, for a
hardware-counter profiler to capture, e.g.:

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


def main(which: str):
  sizes = ROW_SETS[which]
  w_up, w_down = _rand(1, (E, D, F), D ** -0.5), _rand(2, (E, F, D), F ** -0.5)
  x, gs = _rand(3, (sum(sizes), D), 1.0), jnp.asarray(sizes, jnp.int32)
  mlp = jax.jit(lambda x, gs, u, d: gm.grouped_mlp(x, gs, u, d, impl="pallas"))
  for _ in range(3):
    mlp(x, gs, w_up, w_down).block_until_ready()


if __name__ == "__main__":
  which = sys.argv[1] if len(sys.argv) > 1 else "skewed"
  if len(sys.argv) > 2 or which not in ROW_SETS:
    sys.exit(f"usage: python3 benchmarks/ncu_kernel.py [{'|'.join(ROW_SETS)}] (GPU only)\n"
             f"{__doc__}")
  main(which)
