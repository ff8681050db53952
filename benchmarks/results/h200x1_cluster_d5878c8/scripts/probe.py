# ruff: noqa: B007, B023, B905, E501, E701, E702  (archived as it ran)
"""One case of the cluster probe: argv = name product act sizes cluster pairing skip delay [K N].
Prints the Triton kernel's time on the same rows first (A/B in one process), then the
Mosaic GPU kernel's (a hang leaves only the first line)."""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, ".probe"); sys.path.insert(0, ".")
import dataclasses

import grouped_mgpu as gmg

from jax_ep.kernels import grouped_matmul as gm
from jax_ep.kernels.groups import DEFAULT_BLOCKS, SWIGLU_UP_BLOCKS

SIZES = {"dense": [3072], "balanced": [128] * 16,
         "skewed": [265, 231, 204, 178, 161, 147, 139, 128, 117, 106, 98, 85, 72, 51, 36, 30],
         "one265": [265] + [0] * 15,
         # the seed step's layer 3 and layer 1 loads (e8a146a's load_LxE) scaled to 2048 rows
         "l3": [42, 139, 83, 215, 157, 67, 92, 124, 128, 159, 109, 106, 119, 301, 42, 165],
         "near128": [133, 111, 130, 125, 155, 132, 127, 127, 110, 149, 125, 117, 115, 139, 122, 131],
         "l1": [173, 150, 111, 86, 176, 132, 94, 125, 124, 99, 108, 91, 128, 137, 158, 156], "s72": [72] * 16, "s136": [136] * 16}
name, product, act, sizes_name, cluster, pairing, skip, delay = sys.argv[1:9]
cluster, skip, delay = int(cluster), skip == "1", int(delay)
K, N = (8192, 32768) if product == "up" else (32768, 8192)
if len(sys.argv) > 9:
  K, N = int(sys.argv[9]), int(sys.argv[10])
sizes = SIZES[sizes_name]
g, m = len(sizes), sum(sizes)
x = jax.random.normal(jax.random.key(0), (gmg.pad_rows(m), K), jnp.float16)
w = (jax.random.normal(jax.random.key(1), (g, K, N), jnp.float16) / 90).astype(jnp.float16)
gs = jnp.asarray(sizes, jnp.int32)
wg = (jax.random.normal(jax.random.key(2), (g, K, N), jnp.float16) / 90).astype(jnp.float16) \
    if act == "swiglu" else None
ref = jax.lax.ragged_dot(x[:m], w, gs, preferred_element_type=jnp.float32)
if act == "gelu":
  ref = jax.nn.gelu(ref, approximate=True)
elif act == "swiglu":
  ref = jax.nn.silu(jax.lax.ragged_dot(x[:m], wg, gs, preferred_element_type=jnp.float32)) * ref
wbytes = (g * K * N * 2 if sizes_name != "one265" else K * N * 2) * (2 if wg is not None else 1)

def timed(f, reps=20):
  out = f(x, w, gs, wg); out.block_until_ready()
  err = float(jnp.abs(out[:m].astype(jnp.float32) - ref).max())
  out = f(x, w, gs, wg); out.block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(x, w, gs, wg)
  out.block_until_ready()
  return (time.perf_counter() - t) / reps * 1e3, err

def emit(kernel, ms, err):
  rec = dict(case=name, kernel=kernel, product=product, K=K, N=N, sizes=sizes_name,
             cluster=cluster, pairing=pairing, skip=skip, ms=round(ms, 4),
             act=act, delay=delay, weights_floor_ms_at_4TBs=round(wbytes / 4.0e12 * 1e3, 3), max_err=err)
  print(json.dumps(rec), flush=True)

tb = SWIGLU_UP_BLOCKS if act == "swiglu" else DEFAULT_BLOCKS
tri = jax.jit(lambda x, w, gs, wg: gm._pallas(x, m, w, gs, wg, act, tb, False, 1))
emit("triton", *timed(tri))
if act == "swiglu" and os.environ.get("TRITON_VARIANTS"):
  from jax_ep.kernels.groups import Blocks
  for tb2 in (Blocks(block_n=128, num_stages=3),):
    try:
      f2 = jax.jit(lambda x, w, gs, wg, tb2=tb2: gm._pallas(x, m, w, gs, wg, act, tb2, False, 1))
      emit(f"triton_n{tb2.block_n}_k{tb2.block_k}_s{tb2.num_stages}", *timed(f2))
    except Exception as e:  # noqa: BLE001
      print(json.dumps(dict(case=name, kernel=f"triton_n{tb2.block_n}", error=str(e)[:200])), flush=True)
mb = gmg.SWIGLU_MGPU_BLOCKS if act == "swiglu" else gmg.DEFAULT_MGPU_BLOCKS
blocks = dataclasses.replace(mb, cluster=cluster, delay=delay, pairing=pairing, skip=skip)
mg = jax.jit(lambda x, w, gs, wg: gmg.grouped_matmul_mgpu(x, m, w, gs, wg, activation=act,
                                                      blocks=blocks))
emit("mosaic", *timed(mg))
