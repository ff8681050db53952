# ruff: noqa: E501  (archived as it ran)
"""The Triton grouped kernel with small last tiles (Blocks.last_m), A/B in one process:
argv = product act sizes; prints one JSON line per variant."""
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
from jax_ep.kernels import grouped_matmul as gm  # noqa: E402
from jax_ep.kernels.groups import DEFAULT_BLOCKS, SWIGLU_UP_BLOCKS  # noqa: E402

SIZES = {"near128": [133, 111, 130, 125, 155, 132, 127, 127, 110, 149, 125, 117, 115, 139, 122, 131],
         "l3": [42, 139, 83, 215, 157, 67, 92, 124, 128, 159, 109, 106, 119, 301, 42, 165],
         "balanced": [128] * 16}
product, act, sizes_name = sys.argv[1:4]
K, N = (8192, 32768) if product == "up" else (32768, 8192)
sizes = SIZES[sizes_name]
g, m = len(sizes), sum(sizes)
x = jax.random.normal(jax.random.key(0), (m + 256, K), jnp.float16)
w = (jax.random.normal(jax.random.key(1), (g, K, N), jnp.float16) / 90).astype(jnp.float16)
wg = ((jax.random.normal(jax.random.key(2), (g, K, N), jnp.float16) / 90).astype(jnp.float16)
      if act == "swiglu" else None)
gs = jnp.asarray(sizes, jnp.int32)
base = SWIGLU_UP_BLOCKS if act == "swiglu" else DEFAULT_BLOCKS
first = None
for last_m in (0, 64, 32, 16, 0):
  b = dataclasses.replace(base, last_m=last_m)
  try:
    f = jax.jit(lambda x, w, gs, wg, b=b: gm._pallas(x, m, w, gs, wg, act, b, False, 1))
    out = f(x, w, gs, wg)
    out.block_until_ready()
    if first is None:
      first = out[:m].astype(jnp.float32)
    diff = float(jnp.abs(out[:m].astype(jnp.float32) - first).max())
    f(x, w, gs, wg).block_until_ready()
    t = time.perf_counter()
    for _ in range(20):
      out = f(x, w, gs, wg)
    out.block_until_ready()
    ms = (time.perf_counter() - t) / 20 * 1e3
    rec = dict(product=product, act=act, sizes=sizes_name, last_m=last_m, ms=round(ms, 4),
               max_diff_vs_first=diff)
  except Exception as e:  # noqa: BLE001
    rec = dict(product=product, act=act, sizes=sizes_name, last_m=last_m, error=str(e)[:300])
  print(json.dumps(rec), flush=True)
