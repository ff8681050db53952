"""Grouped expert MLP on one GPU: the Pallas kernel's block sizes against the alternatives.

  PYTHONPATH=. python3 benchmarks/kernel_sweep.py --out=$OUT/kernel_sweep.json

The seed's 16 GELU experts (8192 -> 32768 -> 8192, fp16) on 2048 expert-sorted rows
(batch 1024, top-2), with skewed group sizes (30..265 rows, as an untrained router gives)
and balanced ones (128 each); also one expert whose 1024-row receive buffer holds 128
real rows (a proposed-layout device). Compared: the padded batched einsum at the
capacity the largest group needs (what jax_ep did) and at 128 (the bandwidth floor's
shape), jax's Hopper grouped matmul (ragged_dot_mgpu), and jax_ep's kernel over a
block-size sweep. Probes in the same process give the floor. Random data, never zeros.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep.kernels import grouped_matmul as gm
from jax_ep.perf.probes import time_call as timeit

D, F, E = 8192, 32768, 16
IMPL = "pallas"  # --cpu_check: tiny shapes through the Pallas interpreter (a dry run)
SKEWED = [265, 231, 204, 178, 161, 147, 139, 128, 117, 106, 98, 85, 72, 51, 36, 30]
assert sum(SKEWED) == 2048


def probes(log):
  res = {}
  n = (4 << 30) // 2 if IMPL == "pallas" else 1 << 20
  x = jax.random.normal(jax.random.key(1), (n,), jnp.float16)
  res["copy_scale_4GiB"] = 2 * 2 * n / timeit(jax.jit(lambda a: a * jnp.float16(1.0001)), x)
  res["copy_negative_4GiB"] = 2 * 2 * n / timeit(jax.jit(jnp.negative), x)
  del x
  a = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.float16)
  b = jax.random.normal(jax.random.key(3), (8192, 8192), jnp.float16)
  res["matmul_8192_flops"] = 2 * 8192**3 / timeit(jax.jit(jnp.matmul), a, b)
  del a, b
  w = jax.random.normal(jax.random.key(4), (8192, 65536 if IMPL == "pallas" else 64),
                        jnp.float16)  # 1 GiB
  for rows in (64, 128):
    xs = jax.random.normal(jax.random.key(5), (rows, 8192), jnp.float16)
    res[f"weight_stream_{rows}rows"] = w.size * 2 / timeit(jax.jit(jnp.matmul), xs, w)
  del w
  for k, v in res.items():
    log(f"probe {k}: {v / 1e12:.3f} {'TFLOP/s' if 'flops' in k else 'TB/s'}")
  return res


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="kernel_sweep.json")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--cpu_check", action="store_true")
  ap.add_argument("--grid", choices=("wide", "tuned"), default="tuned")
  args = ap.parse_args()
  if args.cpu_check:
    global D, F, IMPL
    D, F, IMPL = 64, 128, "interpret"
  log = lambda m: print(m, flush=True)
  result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__, "device": jax.devices()[0].device_kind, "runs": []}
  result["probes"] = probes(log)
  k = jax.random.split(jax.random.key(0), 6)
  w_up = jax.random.normal(k[0], (E, D, F), jnp.float16) * jnp.float16(D ** -0.5)
  w_down = jax.random.normal(k[1], (E, F, D), jnp.float16) * jnp.float16(F ** -0.5)
  x = jax.random.normal(k[2], (2048, D), jnp.float16)
  weight_bytes = 2 * E * D * F * 2
  result["weight_bytes"] = weight_bytes

  def record(name, t, err=None, **kw):
    rec = {"name": name, "ms": 1e3 * t, "weights_TBps": weight_bytes / t / 1e12, **kw}
    if err is not None:
      rec["max_abs_err"] = err
    result["runs"].append(rec)
    log(f"{name}: {1e3 * t:.3f} ms ({rec['weights_TBps']:.2f} TB/s of weights)"
        + (f", err {err:.4f}" if err is not None else "") + (f" {kw}" if kw else ""))

  def einsum_mlp(xp, wu, wd):
    h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", xp, wu))
    return jnp.einsum("ecf,efd->ecd", h, wd)

  def padded(sizes, c):
    starts = np.cumsum([0] + sizes[:-1])
    idx = np.full((E, c), 2048)
    for e, (s0, n) in enumerate(zip(starts, sizes, strict=True)):
      idx[e, :n] = np.arange(s0, s0 + n)
    return jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[idx], idx

  refs = {}
  f_einsum = jax.jit(einsum_mlp)
  for label, sizes in (("skewed", SKEWED), ("balanced", [128] * E)):
    c = -(-max(sizes) // 16) * 16
    xp, idx = padded(sizes, c)
    t = timeit(f_einsum, xp, w_up, w_down)
    y = f_einsum(xp, w_up, w_down)
    ref = np.zeros((2049, D), np.float32)
    ref[idx.reshape(-1)] = np.asarray(y.reshape(-1, D), np.float32)
    refs[label] = jnp.asarray(ref[:2048])
    record(f"einsum_padded_{label}_C{c}", t, groups=label, capacity=c)
    del xp, y
  xp, _ = padded([128] * E, 128)
  record("einsum_C128_floor_shape", timeit(f_einsum, xp, w_up, w_down))
  del xp

  # jax's Hopper grouped matmul (Pallas Mosaic GPU), GPU.md's best config.
  try:
    if IMPL != "pallas":
      raise RuntimeError("needs a Hopper GPU")
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rdm

    def mgpu(xx, gs, wu, wd):
      kw = dict(block_m=64, block_n=256, block_k=64, max_concurrent_steps=4)
      h = rdm.ragged_dot(xx, wu, group_sizes=gs, grid_block_n=2, **kw)
      h = jax.nn.gelu(h)
      return rdm.ragged_dot(h, wd, group_sizes=gs, grid_block_n=1, **kw)

    f = jax.jit(mgpu)
    for label, sizes in (("skewed", SKEWED), ("balanced", [128] * E)):
      gs = jnp.asarray(sizes, jnp.int32)
      err = float(jnp.abs(f(x, gs, w_up, w_down).astype(jnp.float32) - refs[label]).max())
      record(f"ragged_dot_mgpu_{label}", timeit(f, x, gs, w_up, w_down), err, groups=label)
  except Exception as e:  # noqa: BLE001 - report and go on
    log(f"ragged_dot_mgpu failed: {type(e).__name__}: {str(e)[:300]}")

  # jax_ep's kernel: each product alone over a sweep, then the MLP with the best of each.
  gs = jnp.asarray(SKEWED, jnp.int32)
  if args.grid == "wide":  # the first sweep (results/h200_kernel/sweep_wide.log)
    grid = [gm.Blocks(*c, tail_m=c[0] // 2)  # tails up to half a tile (NOTES 10)
            for c in itertools.product((64, 128), (64, 128, 256), (64,), (4, 8), (3, 4))]
  else:  # around the best of the wide sweep
    grid = [gm.Blocks(128, bn, bk, 8, ns, tail_m=64)
            for bn, bk, ns in itertools.product((128, 256), (64, 128), (3, 4))]
  if args.quick:
    grid = grid[:4]
  best = {}
  for which in ("up", "down"):
    xin = x if which == "up" else jax.random.normal(k[3], (2048, F), jnp.float16)
    w = w_up if which == "up" else w_down
    act = "gelu" if which == "up" else "none"
    for blk in grid:
      if blk.smem_bytes() > 220 * 1024 or blk.block_n > F or blk.block_k > D:
        continue
      try:
        f = jax.jit(lambda xx, ww, g, blk=blk, act=act: gm.grouped_matmul(
            xx, ww, g, activation=act, impl=IMPL, blocks=blk))
        t = timeit(f, xin, w, gs, calls=3, trials=3)
      except Exception as e:  # noqa: BLE001
        log(f"{which} {blk}: failed {type(e).__name__}: {str(e)[:200]}")
        continue
      rec = {"name": f"kernel_{which}", "ms": 1e3 * t,
             "weights_TBps": weight_bytes / 2 / t / 1e12, "blocks": list(blk.__dict__.values())}
      result["runs"].append(rec)
      log(f"kernel {which} {blk}: {1e3 * t:.3f} ms ({rec['weights_TBps']:.2f} TB/s)")
      if which not in best or t < best[which][0]:
        best[which] = (t, blk)
    del xin
  if "up" in best and "down" in best:
    blocks = (best["up"][1], best["down"][1])
    result["best_blocks"] = [list(b.__dict__.values()) for b in blocks]
    f = jax.jit(lambda xx, g, wu, wd: gm.grouped_mlp(xx, g, wu, wd, impl=IMPL,
                                                     blocks=blocks))
    for label, sizes in (("skewed", SKEWED), ("balanced", [128] * E)):
      g2 = jnp.asarray(sizes, jnp.int32)
      err = float(jnp.abs(f(x, g2, w_up, w_down).astype(jnp.float32) - refs[label]).max())
      record(f"kernel_mlp_{label}", timeit(f, x, g2, w_up, w_down), err, groups=label,
             blocks=result["best_blocks"])
    # SwiGLU: the gate's weights too (a third matrix).
    w_gate = jax.random.normal(k[4], (E, D, F), jnp.float16) * jnp.float16(D ** -0.5)
    # The fused gate loads two weight tiles a step: the library's narrower default.
    fs = jax.jit(lambda xx, g, wu, wd, wg: gm.grouped_mlp(xx, g, wu, wd, wg, impl=IMPL))
    t = timeit(fs, x, gs, w_up, w_down, w_gate)
    ys = fs(x, gs, w_up, w_down, w_gate)
    xp, idx = padded(SKEWED, 272)
    hs = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xp, w_gate)) * jnp.einsum("ecd,edf->ecf",
                                                                          xp, w_up)
    yref = jnp.einsum("ecf,efd->ecd", hs, w_down).reshape(-1, D)
    sel = jnp.asarray(idx.reshape(-1) < 2048)
    yk = ys[jnp.asarray(np.minimum(idx.reshape(-1), 2047))]
    err = float(jnp.abs(jnp.where(sel[:, None], yk - yref, 0)).max())
    result["runs"].append({"name": "kernel_swiglu_skewed", "ms": 1e3 * t,
                           "weights_TBps": 1.5 * weight_bytes / t / 1e12, "max_abs_err": err})
    log(f"kernel swiglu skewed: {1e3 * t:.3f} ms ({1.5 * weight_bytes / t / 1e12:.2f} TB/s), "
        f"err {err:.4f}")
    del w_gate, xp, hs, yref, ys

    # One expert, a 1024-row receive buffer with 128 real rows (proposed layout).
    w1u, w1d = w_up[:1], w_down[:1]
    xb = jax.random.normal(k[5], (1024, D), jnp.float16)
    f1 = jax.jit(lambda xx, g, wu, wd: gm.grouped_mlp(xx, g, wu, wd, impl=IMPL,
                                                      blocks=blocks))
    g1 = jnp.asarray([128], jnp.int32)
    t1 = timeit(f1, xb, g1, w1u, w1d, calls=10)
    dense = jax.jit(lambda xx, wu, wd: jnp.einsum("cf,fd->cd", jax.nn.gelu(xx @ wu[0]), wd[0]))
    td = timeit(dense, xb[:128], w1u, w1d, calls=10)
    err = float(jnp.abs(f1(xb, g1, w1u, w1d)[:128].astype(jnp.float32)
                        - dense(xb[:128], w1u, w1d).astype(jnp.float32)).max())
    for name, t in (("kernel_one_expert_128_of_1024", t1), ("dense_one_expert_128", td)):
      result["runs"].append({"name": name, "ms": 1e3 * t,
                             "weights_TBps": weight_bytes / E / t / 1e12})
      log(f"{name}: {1e3 * t:.3f} ms ({weight_bytes / E / t / 1e12:.2f} TB/s)")
    result["one_expert_err"] = err
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=1)
  log(f"wrote {args.out}")


if __name__ == "__main__":
  main()
