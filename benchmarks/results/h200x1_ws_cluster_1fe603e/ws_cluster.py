"""jax_ep's Mosaic GPU grouped kernel of 1fe603e (grouped_mgpu.py beside this), one product:
argv = case cluster delay [down]."""
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, ".probe")
sys.path.insert(0, ".")
import grouped_mgpu as gmg  # noqa: E402

case, cluster, delay = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
D, F = (32768, 8192) if sys.argv[4:] == ["down"] else (8192, 32768)
sizes = {"dense": [3072], "balanced": [128] * 16,
         "skewed": [265, 231, 204, 178, 161, 147, 139, 128, 117, 106, 98, 85, 72, 51, 36, 30],
         "aligned256": [256] * 8, "s192": [192] * 16, "s136": [136] * 16,
         "zero": [256, 0] * 8, "s72": [72] * 16}[case]
g, m = len(sizes), sum(sizes)
x = jax.random.normal(jax.random.key(0), (gmg.pad_rows(m), D), jnp.float16)
w = (jax.random.normal(jax.random.key(1), (g, D, F), jnp.float16) / 90).astype(jnp.float16)
gs = jnp.asarray(sizes, jnp.int32)
blocks = gmg.MgpuBlocks(cluster=cluster, delay=delay)
f = jax.jit(lambda x, w, gs: gmg.grouped_matmul_mgpu(x, m, w, gs, blocks=blocks))
out = f(x, w, gs).block_until_ready()
ref = jax.lax.ragged_dot(x[:m], w, gs, preferred_element_type=jnp.float32)
err = float(jnp.abs(out[:m].astype(jnp.float32) - ref).max())
t = time.perf_counter()
for _ in range(5):
  out = f(x, w, gs)
out.block_until_ready()
print(f"{case} cluster={cluster} delay={delay}: {(time.perf_counter() - t) / 5 * 1e3:.3f} ms, "
      f"err {err:.3g}", flush=True)
