"""A decode step's parts on one GPU, each variant beside its floor, in one process.

  PYTHONPATH=. python3 benchmarks/decode_parts.py --parts=combine,cache,kernel,calls \\
      --out=$OUT/decode_parts.json

Parts (the seed's shapes: batch 1024, top-2, D 8192, 16 GELU experts of 32768):
  combine: the MoE combine (each token's two picked rows, weighted, plus the residual)
    through XLA (routing.combine) and through the Pallas kernel (kernels/combine.py);
  cache:   the KV-cache write of one decode token per sequence at its own position, as a
    scatter with and without the unique/sorted promise (kv_cache.write_rows);
  kernel:  the grouped expert MLP on each --row_sets row set, per tile shape and kernel
    (kernels/grouped_matmul.py Blocks; --kernel_set);
  swiglu:  the SwiGLU expert MLP (seed_swiglu's) on the same row sets, per variant of its
    fused up product's blocks (--swiglu_set; the down product at its default);
  pairs:   the SwiGLU expert MLP with its up product fused over two weights (the
    default) and over one weight of interleaved up and gate columns (one MMA a K step;
    groups.interleave_pairs), on the same row sets;
  mgpu:    jax's Mosaic GPU grouped matmul (ragged_dot_mgpu) on the skewed rows, as they
    are and padded per group to its row blocks, beside jax_ep's kernel (GPU only);
  calls:   the seed model on one device, and one GPU's share of seed_proposed, with
    1 and more tokens per decode call (DeploymentConfig.tokens_per_call);
  attention: decode attention over a batch-1024 cache of --attention_cache positions,
    --attention_lens live, per variant of the Pallas kernel's blocks
    (kernels/decode_attention.py BLOCKS), beside XLA's softmax over the whole cache;
  attention_step: each --attention_configs decode step on one device (jax-ep bench's run)
    with each --attention_steps variant of those blocks, in turn ("best": the attention part's
    fastest variant of this run, on the mean over its lengths);
  router_step: each --router_configs decode step with the model's router and with a
    diagnostic one that gives every expert the mean rows (--router_steps), in turn: the
    bound on what removing the routing skew's cost could give; balanced_einsum: that
    router with the experts through XLA's batched einsum (the dense alternative).
Every variant is checked against the first one on random data (never zeros), and timed
with time_call (jax_ep/perf/probes.py); the floor is its bytes over the best bandwidth
probe of this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import routing
from jax_ep.kernels import combine as combine_kernel
from jax_ep.kernels import grouped_matmul as gm
from jax_ep.kernels import groups
from jax_ep.kv_cache import write_rows
from jax_ep.perf import plan, runner
from jax_ep.perf.probes import measure_hardware, time_call

T, K, D, E, F, H, HK = 1024, 2, 8192, 16, 32768, 16, 512
INTERPRET, MODEL = False, "seed"  # --cpu_check: tiny shapes through the interpreter
# Per variant of the kernel part, its changes to the measured blocks, as
# DeploymentConfig.expert_blocks (and `jax-ep --expert_blocks`) take them.
KERNEL_SETS = {
    "tiles": {"m128_n256_s4": "", "m128_n256_s3": "num_stages=3",
              "m256_n128_s3": "block_m=256,block_n=128,num_stages=3",
              "m256_n128_s4": "block_m=256,block_n=128,num_stages=4",
              "m64_n256_s4_w4": "block_m=64,num_warps=4,tail_m=32"},
    # The K step and the pipeline depth (the skewed case is MMA-bound: NOTES section 6).
    "k": {"m128_n256_k64_s4": "", "k32_s6": "block_k=32,num_stages=6",
          "k32_s8": "block_k=32,num_stages=8", "k128_s2": "block_k=128,num_stages=2"},
    # A group's last few rows in the tile before (tail_m: one program fewer; 64 by
    # default, NOTES 10) or a smaller last tile (last_m: the same programs, less MMA;
    # it slowed the down product, NOTES 9).
    "tails": {"default": "", "tail0": "tail_m=0", "tail32": "tail_m=32",
              "up_tail0": "up.tail_m=0", "down_tail0": "down.tail_m=0",
              "up_last64": "up.last_m=64"},
    # 64-row tiles of one warpgroup, small enough in shared memory for two programs an SM
    # (2 x 80 KiB): less padding on skewed rows, more work in flight (NOTES 14).
    "m64": {"default": "", "m64_w4_k64_s2_t32": "block_m=64,num_warps=4,num_stages=2,tail_m=32",
            "m64_w4_k32_s4_t32": "block_m=64,num_warps=4,block_k=32,num_stages=4,tail_m=32",
            "m64_w4_k32_s4_t0": "block_m=64,num_warps=4,block_k=32,num_stages=4,tail_m=0",
            "default_again": ""},
    # More warps a program: the tile's MMA split over four warpgroups (NOTES 11).
    "warps": {"default": "", "w16": "num_warps=16", "up_w16": "up.num_warps=16",
              "m256_n128_w16": "block_m=256,block_n=128,num_warps=16",
              "default_again": ""},
}
KERNEL_VARIANTS = KERNEL_SETS["tiles"]
# SwiGLU's fused up product: its changes to SWIGLU_UP_BLOCKS (NOTES 8-9); the down
# product at its default.
SWIGLU_SETS = {
    "tails": {"default": "", "last_m0": "up.last_m=0", "tail0": "up.tail_m=0",
              "tail32": "up.tail_m=32", "tail0_last_m0": "up.tail_m=0,up.last_m=0"},
    "warps": {"default": "", "up_w16": "up.num_warps=16", "w16": "num_warps=16",
              "default_again": ""},
    # The CPU check's (tests/benchmarks_test.py): the default's tail and small-tile paths
    # against neither.
    "smoke": {"default": "", "tail0_last_m0": "up.tail_m=0,up.last_m=0"},
}
SWIGLU_UP_VARIANTS = SWIGLU_SETS["tails"]
SKEWED = [265, 231, 204, 178, 161, 147, 139, 128, 117, 106, 98, 85, 72, 51, 36, 30]
# 2048 rows over 16 experts (batch 1024, top-2); --cpu_check takes the tiny ones.
ROW_SETS = {
    "skewed": SKEWED,  # an untrained router's spread, 30-265 rows
    "balanced": [128] * 16,
    # the seed step's layer 3 loads (results/h200x1_e8a146a load_LxE, scaled to 2048)
    "seed_layer3": [42, 139, 83, 215, 157, 67, 92, 124, 128, 159, 109, 106, 119, 301, 42, 165],
    # one draw of a uniform multinomial: a balanced router's step (seed_swiglu's)
    "near128": [133, 111, 130, 125, 155, 132, 127, 127, 110, 149, 125, 117, 115, 139, 122, 131],
}
TINY_ROW_SETS = {"skewed": [5, 3, 0, 8], "balanced": [8] * 4, "seed_layer3": [2, 9, 1, 4],
                 "near128": [9, 7, 8, 8]}
ROWS = ("skewed", "balanced")  # --row_sets


def _rand(key, shape, dtype=jnp.float16, scale=1.0):
  return (jax.random.normal(jax.random.key(key), shape, jnp.float32) * scale).astype(dtype)


def part_combine(bw, log):
  rows = T * K
  y = _rand(1, (rows + 128, D))
  x = _rand(2, (T, D))
  slot = jnp.asarray(np.random.default_rng(0).permutation(rows).reshape(T, K), jnp.int32)
  w = jax.nn.softmax(_rand(3, (T, K), jnp.float32), axis=-1)
  fns = {
      "xla": lambda y, s, w, x: x + routing.combine(y, s, w).astype(x.dtype),
      "pallas": lambda y, s, w, x: x + combine_kernel.combine(y, s, w, interpret=INTERPRET),
  }
  floor = (rows * D + 2 * T * D) * 2 / bw  # the picked rows and x read, out written
  return _run_variants(fns, (y, slot, w, x), floor, log, "combine")


def _old_write(cache, layer, pos_B, new):
  """kv_cache.write_rows before the unique/sorted promise (commit 7306118)."""
  b, t = new.shape[:2]
  s = cache.shape[3]
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
  pos = pos_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  pos = jnp.where(True, pos, s)
  return cache.at[layer, rows, :, pos].set(new.astype(cache.dtype), mode="drop")


def part_cache(bw, log):
  s = 64
  new = _rand(4, (T, 1, H, HK))
  pos = jnp.asarray(np.random.default_rng(1).integers(0, 48, T), jnp.int32)
  out = {}
  ref = None
  for name, fn in (("scatter", _old_write),
                   ("scatter_unique_sorted", lambda c, l, p, n: write_rows(c, l, p, n))):
    step = jax.jit(lambda c, p, n, fn=fn: fn(c, 0, p, n), donate_argnums=0)
    cache = _rand(5, (1, T, H, s, HK))
    cache = step(cache, pos, new)
    jax.block_until_ready(cache)
    times = []
    for _ in range(5):
      t0 = _now()
      for _ in range(10):
        cache = step(cache, pos, new)
      jax.block_until_ready(cache)
      times.append((_now() - t0) / 10)
    got = np.asarray(cache[0, :, :, :48].astype(jnp.float32))
    if ref is None:
      ref = got
    err = float(np.abs(got - ref).max())
    t = float(np.median(times))
    floor = 2 * T * H * HK * 2 / bw
    out[name] = {"ms": 1e3 * t, "floor_ms": 1e3 * floor, "max_abs_diff_vs_first": err}
    log(f"cache {name}: {1e3 * t:.4f} ms (floor {1e3 * floor:.4f}), diff {err:.2e}")
    del cache
  return out


def part_kernel(bw, log):
  w_up = _rand(6, (E, D, F), scale=D ** -0.5)
  w_down = _rand(7, (E, F, D), scale=F ** -0.5)
  x = _rand(8, (T * K, D))
  out = {}
  variants = KERNEL_VARIANTS
  for sizes_name, sizes in _row_sets():
    gs = jnp.asarray(sizes, jnp.int32)
    fns = {name: jax.jit(functools.partial(_mlp, blocks=gm.mlp_blocks(D, F, False, spec),
                                           real=sum(sizes))) for name, spec in variants.items()}
    floor = 2 * E * D * F * 2 / bw
    out[sizes_name] = _run_variants(fns, (x, gs, w_up, w_down), floor, log,
                                    f"kernel {sizes_name}")
  return out


def part_swiglu(bw, log):
  w_up = _rand(6, (E, D, F), scale=D ** -0.5)
  w_gate = _rand(9, (E, D, F), scale=D ** -0.5)
  w_down = _rand(7, (E, F, D), scale=F ** -0.5)
  x = _rand(8, (T * K, D))
  out = {}
  for sizes_name, sizes in _row_sets():
    gs = jnp.asarray(sizes, jnp.int32)
    fns = {name: jax.jit(functools.partial(_mlp, blocks=gm.mlp_blocks(D, F, True, spec),
                                           real=sum(sizes)))
           for name, spec in SWIGLU_UP_VARIANTS.items()}
    floor = 3 * E * D * F * 2 / bw
    out[sizes_name] = _run_variants(fns, (x, gs, w_up, w_down, w_gate), floor, log,
                                    f"swiglu {sizes_name}")
  return out


# SwiGLU's up product as one interleaved weight (groups.interleave_pairs: one MMA a K step,
# GELU's blocks) against the fused product of two weights: (pairs?, --expert_blocks spec).
PAIRS_VARIANTS = {"fused": (False, ""), "pairs": (True, ""),
                  "pairs_k32_s6": (True, "up.block_k=32,up.num_stages=6"),
                  "pairs_tail0": (True, "up.tail_m=0"), "pairs_n128": (True, "up.block_n=128"),
                  "fused_again": (False, "")}


def part_pairs(bw, log):
  w_up = _rand(6, (E, D, F), scale=D ** -0.5)
  w_gate = _rand(9, (E, D, F), scale=D ** -0.5)
  w_down = _rand(7, (E, F, D), scale=F ** -0.5)
  w_pairs = groups.interleave_pairs(w_up, w_gate)
  x = _rand(8, (T * K, D))
  out = {}
  for sizes_name, sizes in _row_sets():
    gs = jnp.asarray(sizes, jnp.int32)
    fns = {}
    for name, (pairs, spec) in PAIRS_VARIANTS.items():
      mlp = functools.partial(_mlp, blocks=gm.mlp_blocks(D, F, not pairs, spec, pairs=pairs),
                              real=sum(sizes), pairs=pairs)
      fns[name] = ((lambda x, gs, wu, wd, wg, wp, mlp=mlp: mlp(x, gs, wp, wd)) if pairs else
                   (lambda x, gs, wu, wd, wg, wp, mlp=mlp: mlp(x, gs, wu, wd, wg)))
    floor = 3 * E * D * F * 2 / bw
    out[sizes_name] = _run_variants(fns, (x, gs, w_up, w_down, w_gate, w_pairs), floor, log,
                                    f"pairs {sizes_name}")
  return out


def _row_sets():
  """(name, group sizes) of --row_sets."""
  return [(n, (TINY_ROW_SETS if INTERPRET else ROW_SETS)[n]) for n in ROWS]


# jax's Hopper grouped matmul (Pallas Mosaic GPU; TMA loads, wgmma): block_m, block_n,
# block_k, max_concurrent_steps.
MGPU_CONFIGS = {"m64_n256_s4": (64, 256, 64, 4), "m128_n256_s3": (128, 256, 64, 3),
                "m128_n128_s4": (128, 128, 64, 4)}


def part_mgpu(bw, log):
  """jax's ragged_dot_mgpu on the skewed rows as they are (its row blocks straddle
  groups: a boundary block is computed once per group), and on the same rows with each
  group padded to a multiple of block_m (no straddling block: the row blocks a kernel
  with group-aligned tiles, as jax_ep's, runs) beside jax_ep's kernel on the same rows."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rdm

  w_up = _rand(6, (E, D, F), scale=D ** -0.5)
  w_down = _rand(7, (E, F, D), scale=F ** -0.5)
  out = {}
  for name, (bm, bn, bk, steps) in MGPU_CONFIGS.items():
    aligned = [-(-s // bm) * bm for s in SKEWED]
    for layout, sizes in (("skewed", SKEWED), ("skewed_aligned", aligned)):
      x = _rand(8, (sum(sizes), D))
      gs = jnp.asarray(sizes, jnp.int32)

      def mlp(x, gs, w_up, w_down, bm=bm, bn=bn, bk=bk, steps=steps):
        kw = dict(block_m=bm, block_k=bk, max_concurrent_steps=steps)
        h = rdm.ragged_dot(x, w_up, group_sizes=gs, block_n=bn, grid_block_n=2, **kw)
        return rdm.ragged_dot(jax.nn.gelu(h), w_down, group_sizes=gs, block_n=bn,
                              grid_block_n=1, **kw)

      fns = {f"mgpu_{name}": mlp,
             "jax_ep_m128_n256_s4": functools.partial(_mlp, blocks=None, real=sum(sizes))}
      floor = 2 * E * D * F * 2 / bw
      out[f"{name}_{layout}"] = _run_variants(fns, (x, gs, w_up, w_down), floor, log,
                                              f"mgpu {name} {layout} rows {sum(sizes)}")
  return out


def _mlp(x, gs, w_up, w_down, w_gate=None, *, blocks, real, pairs=False):
  """The real rows only: the kernel leaves the buffer's other rows unset. Weights are
  arguments, never closed over (a closed-over array is compiled in as a constant)."""
  return gm.grouped_mlp(x, gs, w_up, w_down, w_gate, impl="interpret" if INTERPRET else "pallas",
                        blocks=blocks, pairs=pairs)[:real]


def _now():
  return time.perf_counter()


def _run_variants(fns, args, floor, log, label):
  out, ref = {}, None
  for name, fn in fns.items():
    try:
      fn = jax.jit(fn)
      got = np.asarray(fn(*args).astype(jnp.float32))
      if ref is None:
        ref = got
      err = float(np.abs(got - ref).max())
      t = time_call(fn, *args, calls=10)
      out[name] = {"ms": 1e3 * t, "floor_ms": 1e3 * floor, "max_abs_diff_vs_first": err}
      log(f"{label} {name}: {1e3 * t:.4f} ms (floor {1e3 * floor:.4f}), diff {err:.2e}")
    except Exception as e:  # a variant that does not compile here is reported, not fatal
      out[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
      log(f"{label} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
  return out


# Variants of the decode attention kernel's blocks (changes to decode_attention.BLOCKS: 16
# positions a block, 2 warps, 2 stages; "old_default": the largest block of 128, 64, 32,
# 16 dividing the cache, 4 warps, as before e80d25b's measurements).
ATTENTION_VARIANTS = {
    "default": {}, "old_default": {"block_k": None, "num_warps": 4},
    "k16_w1": {"num_warps": 1}, "k16_w4": {"num_warps": 4}, "k16_s3": {"num_stages": 3},
    "k32": {"block_k": 32}, "k32_w4": {"block_k": 32, "num_warps": 4},
    "k64_w4": {"block_k": 64, "num_warps": 4},
    "k64_w4_s3": {"block_k": 64, "num_warps": 4, "num_stages": 3},
    "k128_w4": {"block_k": 128, "num_warps": 4}, "k16_split4": {"k_splits": 4},
    "default_again": {},
}


def _xla_cache_attention(q, k, v, lengths, scale):
  """The same attention through XLA: softmax over the whole cache, stale positions masked."""
  s = jnp.einsum("bhk,bhsk->bhs", q, k, preferred_element_type=jnp.float32) * scale
  live = jnp.arange(k.shape[2])[None, None, :] < lengths[:, None, None]
  p = jax.nn.softmax(jnp.where(live, s, -jnp.inf), axis=-1)
  return jnp.einsum("bhs,bhsk->bhk", p.astype(v.dtype), v)


def part_attention(bw, log, lens, s=64):
  from jax_ep.kernels import decode_attention

  q, k, v = _rand(10, (T, H, HK)), _rand(11, (T, H, s, HK)), _rand(12, (T, H, s, HK))
  scale = HK ** -0.5
  out = {}
  for n in lens:
    lengths = jnp.full((T,), n, jnp.int32)
    fns = {name: functools.partial(
        lambda q, k, v, l, blocks: decode_attention.cache_attention(
            q, k, v, l, scale, INTERPRET, blocks=blocks)[0], blocks=blocks)
           for name, blocks in ATTENTION_VARIANTS.items()}
    fns["xla"] = lambda q, k, v, l: _xla_cache_attention(q, k, v, l, scale)
    floor = 2 * T * H * n * HK * 2 / bw  # the live keys and values read
    out[f"len{n}"] = _run_variants(fns, (q, k, v, lengths), floor, log, f"attention len {n}")
  return out


def fastest(attention: dict) -> str | None:
  """The attention part's variant of least mean time over its lengths (not XLA's)."""
  times = {}
  for runs in attention.values():
    for name, r in runs.items():
      if name != "xla" and "ms" in r:
        times.setdefault(name, []).append(r["ms"])
  full = [n for n, t in times.items() if len(t) == len(attention)]
  return min(full, key=lambda n: sum(times[n]), default=None)


def part_attention_step(hw, variants, log, configs=("seed",)):
  """Each config's decode step with each variant of decode attention's blocks, in turn
  (each traces and compiles its own step), its weights made once. A config: a model
  preset (seed_swiglu at prompt 128, as the issue's target; others at the bench's 32),
  or "share" (one GPU's share of seed_proposed/1 of MODEL)."""
  from jax_ep.kernels import decode_attention

  default, out = dict(decode_attention.BLOCKS), {}
  try:
    for config in configs:
      p, spec, params, prompts = _step_setup(config, log)
      cache = -(-(spec.prompt_len + plan.new_tokens(spec) - 1) // 16) * 16  # decode.py's
      for name in variants:
        key = _record_key(out, f"{config} {name}")
        change = ATTENTION_VARIANTS[name]
        if not decode_attention.supports(cache, p.cfg.head_dim, {**default, **change},
                                         jnp.dtype(p.cfg.dtype).itemsize):
          out[key] = {"error": f"blocks {change} do not fit a {cache}-position cache: the "
                               "step would run XLA's attention"}
          log(f"attention_step {key}: skipped, {out[key]['error']}")
          continue
        decode_attention.BLOCKS = {**default, **change}
        out[key] = _run_step(p, params, spec, prompts, hw, log, f"attention_step {key}")
      del params
      gc.collect()
  finally:
    decode_attention.BLOCKS = default
  return out


def _step_setup(config, log):
  """(planned run, spec, weights, prompts) of the bench's step for a config: a model
  preset (seed_swiglu at prompt 128, as the issue's target; others at the bench's 32),
  or "share" (one GPU's share of seed_proposed/1 of MODEL)."""
  from jax_ep.engine import Engine
  from jax_ep.presets import load_model

  model = MODEL if config == "share" else config
  spec = plan.platform_defaults(plan.BenchSpec(
      config=model, kinds=() if config == "share" else ("single",), batch=T,
      share="seed_proposed/1" if config == "share" else None,
      prompt_len=128 if config == "seed_swiglu" else None, probes=not INTERPRET),
      "cpu" if INTERPRET else "gpu")
  (p,), _ = plan.plan(load_model(model), spec, 1, log)
  params = Engine(p.cfg, p.dep).init_params(0)
  prompts = np.random.RandomState(0).randint(0, p.cfg.vocab_size, (p.batch, spec.prompt_len))
  return p, spec, params, prompts


def _record_key(out, name):
  """`name`, or `name (i)` where a variant runs again, so each run keeps its record."""
  key, i = name, 2
  while key in out:
    key, i = f"{name} ({i})", i + 1
  return key


def _run_step(p, params, spec, prompts, hw, log, label):
  """The bench's run (runner.run_one) of the step as traced now; its figures."""
  rec, _ = runner.run_one(p, params, spec, prompts, hw, log)
  log(f"{label}: TPOT {rec['tpot_ms']:.3f} ms (synced {rec['tpot_synced_ms']:.3f}), floor "
      f"{rec['floor_ms']:.3f}, {rec['achieved_floor_fraction']:.3f} of floor, imbalance "
      f"{rec['imbalance']:.2f}")
  return {k: rec[k] for k in ("tpot_ms", "tpot_synced_ms", "floor_ms",
                              "achieved_floor_fraction", "floor_ops_ms", "imbalance",
                              "context_len")}


def balanced_top_k_gate(logits_TxE, k):
  """A diagnostic router, not a model's: token t picks experts t, t + E/k, ... (mod E),
  so every expert gets exactly T k / E rows (E a multiple of k, T of E); the weights are
  the softmax of the picked logits, as routing.top_k_gate's."""
  t, e = logits_TxE.shape
  if e % k or t % e:
    raise ValueError(f"balanced_top_k_gate: {t} tokens over {e} experts, {k} a token, cannot "
                     "give every expert the same rows: it needs E a multiple of k and T of E")
  experts_TxK = (jnp.arange(t, dtype=jnp.int32)[:, None]
                 + (e // k) * jnp.arange(k, dtype=jnp.int32)[None, :]) % e
  picked = jnp.take_along_axis(logits_TxE.astype(jnp.float32), experts_TxK, axis=1)
  return jax.nn.softmax(picked, axis=-1), experts_TxK


def balanced_einsum_mlp(x_MxD, group_sizes_G, w_up_GxDxF, w_down_GxFxD, w_gate_GxDxF=None,
                        *, padded=False, **_):
  """grouped_matmul.grouped_mlp for rows that are exactly M / G a group, in order (what
  balanced_top_k_gate gives): XLA's batched einsum over [G, M / G, D] (its hidden in
  float32), a dense alternative a user has on balanced loads, run by whichever GEMM XLA
  picks. Other loads it computes wrongly: a diagnostic only."""
  del group_sizes_G
  g, d, _ = w_up_GxDxF.shape
  x_GxCxD = x_MxD.reshape(g, -1, d)
  h = jnp.einsum("gcd,gdf->gcf", x_GxCxD, w_up_GxDxF, preferred_element_type=jnp.float32)
  if w_gate_GxDxF is None:
    h = jax.nn.gelu(h)
  else:
    h = jax.nn.silu(jnp.einsum("gcd,gdf->gcf", x_GxCxD, w_gate_GxDxF,
                               preferred_element_type=jnp.float32)) * h
  y = jnp.einsum("gcf,gfd->gcd", h.astype(x_MxD.dtype), w_down_GxFxD,
                 preferred_element_type=jnp.float32).astype(x_MxD.dtype).reshape(-1, d)
  return jnp.pad(y, ((0, 128), (0, 0))) if padded else y


ROUTERS = {"default": routing.top_k_gate, "balanced": balanced_top_k_gate,
           "balanced_einsum": balanced_top_k_gate}
EXPERTS = {"balanced_einsum": balanced_einsum_mlp}  # the expert MLP, where not the kernels'


def part_router_step(hw, variants, log, configs=("seed",)):
  """Each config's decode step with the model's router and with balanced_top_k_gate, in
  turn: what the step would take if every expert got the mean rows, the bound on what
  removing the routing skew's cost could give (not a model's function: a diagnostic)."""
  out, kernels_mlp = {}, gm.grouped_mlp
  try:
    for config in configs:
      p, spec, params, prompts = _step_setup(config, log)
      for name in variants:
        routing.top_k_gate = ROUTERS[name]
        gm.grouped_mlp = EXPERTS.get(name, kernels_mlp)
        key = _record_key(out, f"{config} {name}")
        try:
          out[key] = _run_step(p, params, spec, prompts, hw, log, f"router_step {key}")
        except Exception as e:  # e.g. the einsum's float32 hidden out of memory: reported
          out[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
          log(f"router_step {key}: FAILED {out[key]['error'][:300]}")
      del params
      gc.collect()
  finally:
    routing.top_k_gate, gm.grouped_mlp = ROUTERS["default"], kernels_mlp
  return out


def part_calls(hw, per_call, log):
  from jax_ep.presets import load_model

  spec = plan.platform_defaults(
      plan.BenchSpec(config=MODEL, kinds=("single",), share="seed_proposed/1", steps=20,
                      probes=not INTERPRET), "cpu" if INTERPRET else "gpu")
  cfg = load_model(MODEL)
  plans, _ = plan.plan(cfg, spec, 1, log)
  out = {}
  from jax_ep.engine import Engine
  params = Engine(cfg, plans[0].dep).init_params(0)
  prompts = np.random.RandomState(0).randint(0, cfg.vocab_size, (spec.batch, spec.prompt_len))
  for p in plans:
    engine_params = params if p.share_of is None else Engine(p.cfg, p.dep).place_params(
        plan.slice_share(params, cfg, p.cfg))
    for n in per_call:
      # About the same tokens (so the same live context) for every n: 5 synced and 20
      # back-to-back tokens after the fill and one warm-up call.
      q = dataclasses.replace(p, dep=dataclasses.replace(p.dep, tokens_per_call=n))
      spec_n = dataclasses.replace(spec, tokens_per_call=n, synced=max(1, 5 // n),
                                   steps=max(3, spec.steps // n))
      rec, _ = runner.run_one(q, engine_params, spec_n, prompts, hw, log)
      key = f"{p.name}@{n}"
      out[key] = {k: rec[k] for k in ("tpot_ms", "tpot_synced_ms", "floor_ms",
                                      "achieved_floor_fraction", "floor_ops_ms", "imbalance",
                                      "compile_s", "tps", "timed_steps")}
      log(f"calls {key}: TPOT {rec['tpot_ms']:.3f} ms (synced {rec['tpot_synced_ms']:.3f}), "
          f"floor {rec['floor_ms']:.3f}, {rec['achieved_floor_fraction']:.3f} of floor")
    del engine_params
    gc.collect()
  return out


def main():
  global KERNEL_VARIANTS, SWIGLU_UP_VARIANTS, ROWS
  ap = argparse.ArgumentParser()
  ap.add_argument("--parts", default="combine,cache,kernel,calls")
  ap.add_argument("--tokens_per_call", default="1,4")
  ap.add_argument("--out", default="decode_parts.json")
  ap.add_argument("--cpu_check", action="store_true", help="tiny shapes, interpreted kernels")
  ap.add_argument("--kernel_set", default="tiles", choices=sorted(KERNEL_SETS))
  ap.add_argument("--swiglu_set", default="tails", choices=sorted(SWIGLU_SETS))
  ap.add_argument("--attention_lens", default="48,58",
                  help="live cache positions of the attention part (the bench's range)")
  ap.add_argument("--attention_steps", default="old_default,default,old_default,default",
                  help=f"variants of the attention_step part, from {sorted(ATTENTION_VARIANTS)}, "
                       "or best (the attention part's fastest; that part runs first)")
  ap.add_argument("--attention_configs", default="seed",
                  help="the attention_step part's runs: model presets, or share (one GPU's "
                       "share of seed_proposed/1)")
  ap.add_argument("--router_steps", default="default,balanced,default,balanced",
                  help=f"routers of the router_step part, in turn, from {sorted(ROUTERS)}")
  ap.add_argument("--router_configs", default="seed",
                  help="the router_step part's runs: model presets, or share")
  ap.add_argument("--attention_cache", type=int, default=64,
                  help="cache positions of the attention part")
  ap.add_argument("--row_sets", default=",".join(ROWS),
                  help=f"row sets of the kernel and swiglu parts, from {sorted(ROW_SETS)}")
  args = ap.parse_args()
  KERNEL_VARIANTS = KERNEL_SETS[args.kernel_set]
  SWIGLU_UP_VARIANTS = SWIGLU_SETS[args.swiglu_set]
  ROWS = tuple(args.row_sets.split(","))
  if bad := [r for r in ROWS if r not in ROW_SETS]:
    ap.error(f"--row_sets: unknown {bad}; choose from {sorted(ROW_SETS)}")
  if bad := [r for r in args.router_steps.split(",") if r not in ROUTERS]:
    ap.error(f"--router_steps: unknown {bad}; choose from {sorted(ROUTERS)}")
  steps = args.attention_steps.split(",")
  order = args.parts.split(",")
  if "attention_step" in order:
    if "best" in steps and ("attention" not in order
                            or order.index("attention") > order.index("attention_step")):
      ap.error("--attention_steps=best needs the attention part before attention_step")
    if bad := [v for v in steps if v not in ATTENTION_VARIANTS and v != "best"]:
      ap.error(f"--attention_steps: unknown {bad}; choose from {sorted(ATTENTION_VARIANTS)} "
               "or best")
  if args.cpu_check:
    global T, D, E, F, H, HK, INTERPRET, MODEL
    T, D, E, F, H, HK, INTERPRET, MODEL = 16, 64, 4, 128, 8, 8, True, "tiny"
  log = lambda m: print(m, flush=True)
  dev = jax.devices()[0]
  hw, probes = measure_hardware([dev], jnp.float16, not args.cpu_check, log,
                                      64 if args.cpu_check else 4096)
  bw = hw.hbm_bytes_per_s
  result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": runner._git_commit(), "jax": jax.__version__,
            "device": dev.device_kind, "probes": probes}
  parts = args.parts.split(",")
  for part in parts:
    if part == "calls":
      per_call = [int(n) for n in args.tokens_per_call.split(",")]
      result[part] = part_calls(hw, per_call, log)
    elif part == "router_step":
      result[part] = part_router_step(hw, args.router_steps.split(","), log,
                                      args.router_configs.split(","))
    elif part == "attention":
      result[part] = part_attention(bw, log, [int(n) for n in args.attention_lens.split(",")],
                                    args.attention_cache)
    elif part == "attention_step":
      best = fastest(result.get("attention", {}))
      if best is None and "best" in steps:
        log("attention_step: no variant of the attention part ran at every length; no best")
        steps = [v for v in steps if v != "best"]
      result[part] = part_attention_step(hw, [best if v == "best" else v for v in steps], log,
                                         args.attention_configs.split(","))
    else:
      result[part] = {"combine": part_combine, "cache": part_cache,
                      "kernel": part_kernel, "swiglu": part_swiglu,
                      "mgpu": part_mgpu, "pairs": part_pairs}[part](bw, log)
    gc.collect()
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
