"""jax's hopper_matmul_mgpu with and without a cluster (argv[1]: none, N or M)."""
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

dim = {"N": hm.MatmulDimension.N, "M": hm.MatmulDimension.M, "none": None}[sys.argv[1]]
M, K, N = 3072, 8192, 32768
a = jax.random.normal(jax.random.key(0), (M, K), jnp.float16)
b = (jax.random.normal(jax.random.key(1), (K, N), jnp.float16) / 90).astype(jnp.float16)
cfg = hm.TuningConfig(tile_m=64, tile_n=256, tile_k=64, max_concurrent_steps=4,
                      wg_dimension=hm.MatmulDimension.M, cluster_dimension=dim)
f = jax.jit(lambda a, b: hm.matmul(a, b, None, cfg))
out = f(a, b).block_until_ready()
ref = (a @ b).astype(jnp.float32)
err = float(jnp.abs(out.astype(jnp.float32) - ref).max())
t, n = time.perf_counter(), 10
for _ in range(n):
  out = f(a, b)
out.block_until_ready()
ms = (time.perf_counter() - t) / n * 1e3
print(f"hopper cluster={sys.argv[1]}: {ms:.3f} ms, {2 * M * K * N / ms / 1e9:.0f} TFLOP/s, "
      f"max err {err:.3g}", flush=True)
