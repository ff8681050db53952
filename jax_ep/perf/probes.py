"""Probes: the hardware floor (bandwidth, matmul rate, all_to_all) measured in this
process, and time_call."""

from __future__ import annotations

import functools
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep.perf.hardware import Hardware


def time_call(fn, *args, calls: int = 5, trials: int = 5) -> float:
  """Median seconds per call; `calls` back-to-back calls per trial hide dispatch."""
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
    del out
  return float(np.median(times))


READ_ROW, READ_CHUNK, READ_STEP = 512, 256, 16  # the Pallas read probe's blocks


def _read_rows_max(x_NxR, interpret: bool):
  """The max of each column of each chunk of READ_CHUNK rows by a Pallas kernel: a program
  a chunk, read READ_STEP rows at a time in a pipelined loop (the way the decode
  attention kernel, which reads fastest of our kernels, reads its cache)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  def kernel(x_ref, o_ref):
    def body(i, acc):
      return jnp.maximum(acc, x_ref[pl.ds(i * READ_STEP, READ_STEP), :].astype(jnp.float32))

    acc = jax.lax.fori_loop(0, READ_CHUNK // READ_STEP, body,
                            jnp.full((READ_STEP, READ_ROW), -jnp.inf, jnp.float32))
    o_ref[...] = acc.max(axis=0).astype(o_ref.dtype)

  chunks = x_NxR.shape[0] // READ_CHUNK
  return pl.pallas_call(
      kernel, grid=(chunks,),
      in_specs=[pl.BlockSpec((READ_CHUNK, READ_ROW), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((None, READ_ROW), lambda i: (i, 0)),
      out_shape=jax.ShapeDtypeStruct((chunks, READ_ROW), x_NxR.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=2, num_stages=2),
      interpret=interpret)(x_NxR)


def probe_bandwidth(device, nbytes: int, pallas: bool = True) -> dict[str, float]:
  """Device memory bandwidth by five methods, bytes per second (best is the ceiling).

  "scale" (x * 1.0001) and "negate" count read + write bytes of `nbytes` of random fp16;
  "read" (XLA: the max of each row of 512) and "read_pallas" (a Pallas kernel, if
  `pallas`; the interpreter on a CPU: the max of each column of 256 such rows) count
  what they read and write: a decode step's
  weights and KV cache are reads, which run faster than a copy's reads and writes (NOTES
  section 13); "weights_64_rows" streams an [8192, N] weight of `nbytes` through a 64-row matmul
  (the way decode reads weights) and counts the weight's bytes. Random data, never zeros
  (shared/GPU.md).
  """
  n = nbytes // 2
  x = jax.device_put(jax.random.normal(jax.random.key(1), (n,), jnp.float16), device)
  out = {"scale": 2 * 2 * n / time_call(jax.jit(lambda a: a * jnp.float16(1.0001)), x),
         "negate": 2 * 2 * n / time_call(jax.jit(jnp.negative), x)}
  if n % (READ_ROW * READ_CHUNK) == 0:
    rows = x.reshape(-1, READ_ROW)
    out["read"] = (2 * n + 2 * rows.shape[0]) / time_call(  # the rows, and a max each
        jax.jit(lambda a: a.max(axis=1)), rows)
    if pallas:  # the rows, and a max of each column of each chunk
      out["read_pallas"] = (2 * n + 2 * n // READ_CHUNK) / time_call(jax.jit(
          functools.partial(_read_rows_max, interpret=device.platform == "cpu")), rows)
    del rows
  del x
  k = 8192 if nbytes >= (1 << 30) else 256
  w = jax.device_put(jax.random.normal(jax.random.key(4), (k, n // k), jnp.float16), device)
  rows = jax.device_put(jax.random.normal(jax.random.key(5), (64, k), jnp.float16), device)
  out["weights_64_rows"] = w.size * 2 / time_call(jax.jit(jnp.matmul), rows, w)
  del w, rows
  return out


def probe_matmul(device, sizes, dtype) -> dict[str, float]:
  """Matmul rate (FLOP/s) of random n x n matrices of the model's dtype, per n."""
  out = {}
  for n in sizes:
    ka, kb = jax.random.split(jax.random.key(2))
    a = jax.device_put(jax.random.normal(ka, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), dtype), device)
    out[f"square_{n}"] = 2 * n**3 / time_call(jax.jit(jnp.matmul), a, b)
    del a, b
  return out


def probe_all_to_all(devices, nbytes: int) -> float:
  """Seconds of one all_to_all (jax.shard_map) with `nbytes` per device, random data."""
  g = len(devices)
  mesh = Mesh(np.asarray(devices), ("x",))
  rows = max(g, (nbytes // 2 // 1024) // g * g)  # rows of 512 fp16 per device
  x = jax.random.normal(jax.random.key(3), (g * rows, 512), jnp.float16)
  x = jax.device_put(x, NamedSharding(mesh, P("x")))
  f = jax.jit(jax.shard_map(lambda a: jax.lax.all_to_all(a, "x", 0, 0, tiled=True),
                            mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  t = time_call(f, x)
  del x
  return t


def measure_hardware(devices, dtype, gpu: bool, log,
                     probe_mib: int | None = None) -> tuple[Hardware, dict]:
  """Probes the first device (and the collective over all): a Hardware and the raw numbers.

  The ceilings are the best method of each probe; every method's figure is kept.
  """
  copy_bytes = (probe_mib << 20) if probe_mib else ((4 << 30) if gpu else (64 << 20))
  sizes = (4096, 8192) if gpu else (256, 512)
  a2a_big = copy_bytes // 64
  a2a_small = min(64 << 10, a2a_big // 4)
  raw = {"copy_bytes": copy_bytes, "matmul_sizes": list(sizes),
         "matmul_dtype": jnp.dtype(dtype).name}
  raw["bandwidth_methods"] = probe_bandwidth(devices[0], copy_bytes, pallas=gpu)
  raw["hbm_bytes_per_s"] = max(raw["bandwidth_methods"].values())
  for name, v in raw["bandwidth_methods"].items():
    log(f"probe: bandwidth {name} {copy_bytes / 2**20:.0f} MiB: {v / 1e12:.3f} TB/s")
  raw["matmul_methods"] = probe_matmul(devices[0], sizes, dtype)
  raw["matmul_flops"] = max(raw["matmul_methods"].values())
  for name, v in raw["matmul_methods"].items():
    log(f"probe: matmul {name} {raw['matmul_dtype']}: {v / 1e12:.2f} TFLOP/s")
  g = len(devices)
  if g > 1:
    t_big = probe_all_to_all(devices, a2a_big)
    t_small = probe_all_to_all(devices, a2a_small)
    # Bytes that leave each device, net of a small message's fixed cost.
    raw.update(all_to_all_bytes=a2a_big, all_to_all_s=t_big, all_to_all_small_bytes=a2a_small,
               all_to_all_small_s=t_small)
    link = a2a_big * (g - 1) / g / max(t_big - t_small, 1e-9)
    raw["link_bytes_per_s"], raw["collective_latency_s"] = link, t_small
    log(f"probe: all_to_all over {g}: {a2a_big / 2**20:.0f} MiB/device {t_big * 1e6:.0f} us "
        f"({link / 1e9:.1f} GB/s), {a2a_small >> 10} KiB {t_small * 1e6:.0f} us")
  else:
    raw["link_bytes_per_s"], raw["collective_latency_s"] = float("inf"), 0.0
  hw = Hardware(
      name=f"{devices[0].device_kind} (measured)", hbm_bytes_per_s=raw["hbm_bytes_per_s"],
      matmul_flops=raw["matmul_flops"], intra_node_bytes_per_s=raw["link_bytes_per_s"],
      inter_node_bytes_per_s=raw["link_bytes_per_s"], gpus_per_node=max(g, 1),
      collective_latency_s=raw["collective_latency_s"],
      measured=("hbm_bytes_per_s", "matmul_flops", "intra_node_bytes_per_s",
                "inter_node_bytes_per_s", "collective_latency_s"),
      note="probed in the benchmark process; one host")
  gc.collect()
  return hw, raw
