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


READ_ROW = 512  # the read probes' rows: the seed's head_dim


def _attention_positions(n: int) -> int:
  """Cache positions of the attention read probe over n elements of keys and values."""
  return min(256, n // (2 * 16 * READ_ROW))


def _attention_read(k_BxHxSxDh, v_BxHxSxDh, interpret: bool):
  """jax_ep's decode attention kernel (kernels/decode_attention.py, its default blocks)
  over the cache, every position live: it reads the cache once, as a decode step reads
  its KV cache."""
  from jax_ep.kernels import decode_attention

  q = k_BxHxSxDh[:, :, 0]  # a query per sequence and head (its values change no read)
  lengths = jnp.full((k_BxHxSxDh.shape[0],), k_BxHxSxDh.shape[2], jnp.int32)
  return decode_attention.cache_attention(q, k_BxHxSxDh, v_BxHxSxDh, lengths,
                                          READ_ROW**-0.5, interpret)[0]


def probe_bandwidth(device, nbytes: int, pallas: bool = True) -> dict[str, float]:
  """Device memory bandwidth by five methods, bytes per second (best is the ceiling).

  "scale" (x * 1.0001) and "negate" count read + write bytes of `nbytes` of random fp16;
  "read" (XLA: the max of each row of 512) and "read_attention" (if `pallas`: jax_ep's
  decode attention kernel over a cache made of them; the interpreter on a CPU) count
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
  whole = n % (2 * 16 * 16 * READ_ROW) == 0  # halves of whole [16 heads, 16+ positions]
  if whole:
    rows = x.reshape(-1, READ_ROW)
    out["read"] = (2 * n + 2 * rows.shape[0]) / time_call(  # the rows, and a max each
        jax.jit(lambda a: a.max(axis=1)), rows)
    del rows
  del x
  if whole and pallas:  # keys and values of up to `nbytes` together, an output row a query
    s = _attention_positions(n)
    shape = (n // (2 * 16 * s * READ_ROW), 16, s, READ_ROW)
    kv = [jax.device_put(jax.random.normal(jax.random.key(6 + i), shape, jnp.float16), device)
          for i in (0, 1)]
    fn = jax.jit(functools.partial(_attention_read, interpret=device.platform == "cpu"))
    o = jax.eval_shape(fn, *kv)
    read = sum(a.nbytes for a in kv) + o.size * o.dtype.itemsize  # the cache, the output
    out["read_attention"] = read / time_call(fn, *kv)
    del kv
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
