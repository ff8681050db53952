"""The seed's TPS/TPOT table from one run: deployments side by side, floor probes, model.

One process, the devices present (real GPUs or fake CPU devices): the same weights per
model (initialised once, then placed on each deployment's mesh) and the same prompts.
Compilation and warm-up steps are timed apart from the decode steps, which are reported
as the back-to-back mean (TPOT) and the synced median and p10/p90. Short probes in the
same process measure the device's bandwidth, matmul rate and all_to_all bandwidth; with
them the performance model (perf_model.py) gives each deployment's floor and prediction,
and its efficiency factors are fitted to the run.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import json
import os
import subprocess
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import deployments, load_model
from jax_ep import checkpoint, decode, perf_model
from jax_ep.config import KINDS, ConfigError, DeploymentConfig, ModelConfig
from jax_ep.engine import Engine

SEED_PRESET = {"baseline": "seed_baseline", "proposed": "seed_proposed"}


@dataclasses.dataclass(frozen=True)
class BenchSpec:
  """What to run. None means the platform's default (GPU: the seed; CPU: small)."""

  config: str | None = None  # model preset (configs/): GPU "seed", CPU "tiny"
  kinds: tuple[str, ...] = KINDS
  share: str | None = None  # "proposed" (= seed_proposed) or a preset: one device's share
  batch: int = 1024  # sequences in flight (slice presets set their own)
  prompt_len: int | None = None  # GPU 32, CPU 8
  steps: int | None = None  # decode steps timed back to back: GPU 20, CPU 4
  synced: int = 5  # decode steps before those, each timed with a sync (median, p10-p90)
  warmup: int = 1  # decode steps after the ring's fill, not timed
  num_devices: int | None = None  # use the first N devices (default: all)
  seed: int = 0
  probes: bool = True
  probe_mib: int | None = None  # copy probe size (GPU 4096, CPU 64); all_to_all 1/64 of it
  tokens_per_call: int = 1  # tokens per sequence per decode call (DeploymentConfig)
  skip_unfit: bool = False  # skip deployments that cannot run here instead of failing
  check_memory: bool = True  # refuse (or skip) deployments that overflow a device (memory.py)
  checkpoint: str | None = None  # the model and its weights from this checkpoint, not random


def _platform_defaults(spec: BenchSpec, platform: str) -> BenchSpec:
  gpu = platform != "cpu"
  return dataclasses.replace(
      spec, config=spec.config or ("seed" if gpu else "tiny"),
      prompt_len=spec.prompt_len or (32 if gpu else 8), steps=spec.steps or (20 if gpu else 4))


# --- probes: the hardware floor, measured in this process --------------------------------


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


def probe_bandwidth(device, nbytes: int) -> dict[str, float]:
  """Device memory bandwidth by three methods, bytes per second (best is the ceiling).

  "scale" (x * 1.0001) and "negate" count read + write bytes of `nbytes` of random fp16;
  "weights_64_rows" streams an [8192, N] weight of `nbytes` through a 64-row matmul (the
  way decode reads weights) and counts the weight's bytes. Random data, never zeros
  (shared/GPU.md).
  """
  n = nbytes // 2
  x = jax.device_put(jax.random.normal(jax.random.key(1), (n,), jnp.float16), device)
  out = {"scale": 2 * 2 * n / time_call(jax.jit(lambda a: a * jnp.float16(1.0001)), x),
         "negate": 2 * 2 * n / time_call(jax.jit(jnp.negative), x)}
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
                     probe_mib: int | None = None) -> tuple[perf_model.Hardware, dict]:
  """Probes the first device (and the collective over all): a Hardware and the raw numbers.

  The ceilings are the best method of each probe; every method's figure is kept.
  """
  copy_bytes = (probe_mib << 20) if probe_mib else ((4 << 30) if gpu else (64 << 20))
  sizes = (4096, 8192) if gpu else (256, 512)
  a2a_big = copy_bytes // 64
  a2a_small = min(64 << 10, a2a_big // 4)
  raw = {"copy_bytes": copy_bytes, "matmul_sizes": list(sizes),
         "matmul_dtype": jnp.dtype(dtype).name}
  raw["bandwidth_methods"] = probe_bandwidth(devices[0], copy_bytes)
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
  hw = perf_model.Hardware(
      name=f"{devices[0].device_kind} (measured)", hbm_bytes_per_s=raw["hbm_bytes_per_s"],
      matmul_flops=raw["matmul_flops"], intra_node_bytes_per_s=raw["link_bytes_per_s"],
      inter_node_bytes_per_s=raw["link_bytes_per_s"], gpus_per_node=max(g, 1),
      collective_latency_s=raw["collective_latency_s"],
      measured=("hbm_bytes_per_s", "matmul_flops", "intra_node_bytes_per_s",
                "inter_node_bytes_per_s", "collective_latency_s"),
      note="probed in the benchmark process; one host")
  gc.collect()
  return hw, raw


# --- what to run -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  name: str  # "single", "baseline", "proposed", "share:seed_proposed", "slice_2x2/1"
  method: str  # the table's words
  cfg: ModelConfig
  dep: DeploymentConfig
  batch: int
  preset: str
  note: str = ""
  share_of: DeploymentConfig | None = None  # the deployment whose one device this is
  model_name: str = ""  # the configs/ preset of cfg (weights are made once per model)


def _preset_for(kind: str, num_devices: int) -> tuple[str, str]:
  """The seed's preset if it fits the devices present, else the largest scaled one that does."""
  seed_name = SEED_PRESET[kind]
  need = deployments.PRESETS[seed_name].num_devices
  if num_devices >= need:
    return seed_name, ""
  sizes = sorted(int(k.split("_")[1]) for k in deployments.PRESETS
                 if k.startswith(kind + "_") and k.split("_")[1].isdigit())
  fit = [s for s in sizes if s <= num_devices]
  if not fit:
    raise ConfigError(f"no {kind} preset fits {num_devices} devices")
  name = f"{kind}_{fit[-1]}"
  if deployments.PRESETS[name].num_devices == 1:
    raise ConfigError(f"on 1 device the {kind} preset is the single-device run; "
                      "--share=proposed runs one device's share of seed_proposed instead")
  return name, (f"the seed's {kind} needs {need} GPUs, {num_devices} present: scaled preset "
                f"{name} ({deployments.PRESETS[name].describe()})")


def parse_mesh(kind: str) -> DeploymentConfig:
  """"mesh:SxExT" or "mesh:SxExT/G": a proposed-style deployment of any shape.

  Whole experts over expert (and tp, as the baseline's placement) when T = 1 or the
  expert axis is 1; each expert's MLP over tp otherwise. G: decode groups in flight
  (default: one per stage).
  """
  try:
    shape, _, g = kind.removeprefix("mesh:").partition("/")
    s, e, t = (int(v) for v in shape.split("x"))
    g = int(g) if g else 0
  except ValueError:
    raise ConfigError(f"--kinds entry {kind!r}: write mesh:SxExT or mesh:SxExT/G, "
                      "e.g. mesh:1x2x1 for expert parallelism over 2 devices.") from None
  placement = "tp" if t > 1 and e > 1 else "ep"
  return DeploymentConfig(kind="proposed", stages=s, expert=e, tp=t, placement=placement,
                          microbatches=s, decode_groups=g)


def share_config(cfg: ModelConfig, dep: DeploymentConfig, batch: int):
  """One device's share of `dep` as a one-device model: (ModelConfig, batch).

  Its stage's layers, its experts of each (top-k capped at their number), the rows it
  attends for; the embedding, unembedding and whole attention as the device holds them.
  The share runs one group's rows once: the ring's micro-steps and the collectives are
  what perf_model adds to turn it into the deployment's step. With top-k capped, the
  share's experts see fewer rows than the deployment's (64, not ~128, for seed_proposed:
  the seed slices give the exact per-GPU work).
  """
  if dep.tp > 1:
    raise ConfigError(f"a share of {dep.describe()} splits attention heads over tp={dep.tp}, "
                      "which a ModelConfig cannot express (heads x head_dim = model_dim); "
                      "use a tp=1 deployment such as seed_proposed.")
  lay = perf_model.layout(cfg, dep, batch)
  share = dataclasses.replace(cfg, num_layers=lay.layers, num_experts=lay.experts,
                              top_k=min(cfg.top_k, lay.experts))
  return share, lay.rows


def plan(cfg: ModelConfig, spec: BenchSpec, num_devices: int, log) -> tuple[list[Plan], list]:
  """The deployments to run on `num_devices`, and notes on those that cannot.

  A kind is single, baseline or proposed (the seed's preset, or the largest scaled one
  that fits), a preset name, mesh:SxExT, or a seed slice (slice_1x4, ...: its own model
  and batch, configs/deployments.py); "/G" after any of them sets the decode groups.
  """
  plans, skipped = [], []
  for kind in spec.kinds:
    try:
      note, model_cfg, model_name, batch = "", cfg, spec.config, spec.batch
      base, groups = deployments.with_groups(kind)
      if base in SEED_PRESET:
        name, note = _preset_for(base, num_devices)
        dep = deployments.PRESETS[name]
      elif base.startswith("mesh:"):
        name, dep = base, parse_mesh(base)
      else:
        name, dep = base, deployments.resolve(base, num_devices)
      if groups is not None:
        dep = dataclasses.replace(dep, decode_groups=groups)
      dep = dataclasses.replace(dep, tokens_per_call=spec.tokens_per_call)
      if base in deployments.SLICES:
        model_name = deployments.SLICES[base][0]
        model_cfg = load_model(model_name)
        batch = deployments.slice_batch(dep)
        note = (f"seed slice: each GPU does seed_proposed's per-GPU work ({model_name}, "
                f"{deployments.ROWS_PER_GPU} sequences per GPU per group, {dep.groups} "
                f"group(s) in flight)")
      if dep.num_devices > num_devices:
        raise ConfigError(f"{name} needs {dep.num_devices} devices, {num_devices} present")
      dep.check_model(model_cfg)
      dep.check_batch(batch)
      label = {"single": "Single device", "baseline": "Baseline (TP x PP)",
               "proposed": "Proposed cross-node EP"}.get(base, base)
      if dep.stages > 1 or groups is not None:
        label += f", {dep.groups} group{'s' if dep.groups > 1 else ''} in flight"
      plans.append(Plan(kind, label, model_cfg, dep, batch, name, note, model_name=model_name))
    except ConfigError as e:
      skipped.append({"name": kind, "reason": str(e)})
      log(f"skip {kind}: {e}")
  if spec.share:
    name = SEED_PRESET.get(spec.share, spec.share)
    try:
      full = deployments.resolve(name, num_devices)
      # One group on one device of `full` (the ring's micro-step on one device).
      share_cfg, rows = share_config(cfg, dataclasses.replace(full, decode_groups=1,
                                                              microbatches=1),
                                     spec.batch // full.groups)
      plans.append(Plan(f"share:{name}", f"One GPU's share of {name}", share_cfg,
                        dataclasses.replace(deployments.SINGLE,
                                            tokens_per_call=spec.tokens_per_call), rows, name,
                        f"one device of {name} ({full.num_devices} GPUs) for one group of "
                        f"{spec.batch // full.groups}: {share_cfg.num_layers} layer(s) x "
                        f"{share_cfg.num_experts} expert(s), top-{share_cfg.top_k}, {rows} "
                        "sequences", share_of=full, model_name=spec.config))
    except ConfigError as e:
      skipped.append({"name": f"share:{name}", "reason": str(e)})
      log(f"skip share {name}: {e}")
  return plans, skipped


def slice_share(params, cfg: ModelConfig, share: ModelConfig):
  """The share's parameters cut from a deployment layout (engine.py): stage 0's first
  `share.num_layers` local layers, experts 0..E_local-1. Slices only what the share
  keeps, so the full model is never copied (it may fill the device)."""

  def cut(path, leaf):
    name = next(n for n in reversed([str(getattr(k, "key", getattr(k, "name", k)))
                                     for k in path]) if n != "value")
    if name.startswith(("w_up_", "w_gate_", "w_down_")):  # [S, E, ...]
      return leaf[:1, :share.num_experts]
    if name == "w_router_DxE":  # [S, D, E]
      return leaf[:1, :, :share.num_experts]
    return leaf[:1]

  layers = tuple(jax.tree_util.tree_map_with_path(cut, params["layers"][i])
                 for i in range(share.num_layers))
  return {**params, "layers": layers}


# --- running -----------------------------------------------------------------------------


def _git_commit() -> str:
  """HEAD, or $JAX_EP_COMMIT where the tree was copied without .git (the GPU machine)."""
  if os.environ.get("JAX_EP_COMMIT"):
    return os.environ["JAX_EP_COMMIT"]
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _hw_dict(hw: perf_model.Hardware) -> dict:
  d = dataclasses.asdict(hw)
  d["measured"] = list(hw.measured)
  return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}


def _decode_calls(spec: BenchSpec) -> int:
  """Decode calls of a run: the ring's fill, warm-up, synced and back-to-back calls."""
  return 1 + spec.warmup + spec.synced + spec.steps


def _new_tokens(spec: BenchSpec) -> int:
  """Tokens per sequence of a run: prefill's, the fill's, then tokens_per_call a call."""
  return 2 + (_decode_calls(spec) - 1) * spec.tokens_per_call


def run_one(p: Plan, params, spec: BenchSpec, prompts: np.ndarray, hw: perf_model.Hardware,
            log) -> tuple[dict, np.ndarray]:
  """Decodes with one deployment; the record of its timings, floor and prediction."""
  engine = Engine(p.cfg, p.dep)
  max_new = _new_tokens(spec)
  max_len = spec.prompt_len + max_new - 1
  gen = decode.generate(engine, params, prompts[:p.batch] % p.cfg.vocab_size, max_new,
                        max_len=max_len, seed=spec.seed, synced_steps=spec.warmup + spec.synced,
                        log=lambda m: log("  " + m))
  synced_s = np.asarray(gen.step_s[spec.warmup:])
  tpot = gen.tpot_ms / 1e3
  imbalance = gen.imbalance
  # The KV cache the timed steps attend over: live positions at the middle of them.
  live_context = spec.prompt_len + 1 + spec.tokens_per_call * (
      spec.warmup + spec.synced + spec.steps / 2)
  pred = perf_model.predict(p.cfg, p.dep, p.batch, max_len, hw, perf_model.IDEAL, imbalance)
  ops = perf_model.floor_operations(p.cfg, p.dep, p.batch, live_context)
  floor = perf_model.floor_s(p.cfg, p.dep, p.batch, live_context, hw)
  lay = perf_model.layout(p.cfg, p.dep, p.batch)
  link = hw.intra_node_bytes_per_s
  comm_bytes = pred.comm_bytes["intra"] + pred.comm_bytes["inter"]
  record = {
      "name": p.name, "method": p.method, "preset": p.preset, "note": p.note,
      "gpus": p.dep.num_devices, "per_gpu": perf_model.describe_layout(p.cfg, p.dep, p.batch),
      "model_name": p.model_name, "model": dataclasses.asdict(p.cfg),
      "deployment": dataclasses.asdict(p.dep),
      "share_of": dataclasses.asdict(p.share_of) if p.share_of else None,
      "batch": p.batch, "groups": p.dep.groups, "micro_steps_per_token": p.dep.ring_period,
      "prompt_len": spec.prompt_len, "context_len": max_len, "live_context": live_context,
      "warmup_steps": spec.warmup, "synced_steps": int(synced_s.size),
      "timed_steps": gen.decode_steps, "compile_s": gen.compile_s, "prefill_s": gen.prefill_s,
      "synced_step_ms": (1e3 * synced_s).tolist(),
      "tpot_ms": 1e3 * tpot, "tpot_synced_ms": 1e3 * float(np.median(synced_s)),
      "tpot_p10_ms": 1e3 * float(np.percentile(synced_s, 10)),
      "tpot_p90_ms": 1e3 * float(np.percentile(synced_s, 90)),
      "micro_step_ms": 1e3 * tpot / p.dep.ring_period, "tps": p.batch / tpot,
      "imbalance": imbalance, "dropped": gen.dropped,
      "load_LxE": np.asarray(gen.load_LxE).tolist(),
      "hbm_bytes": pred.hbm_bytes, "flops": pred.flops, "comm_bytes": pred.comm_bytes,
      "resident_bytes": pred.resident_bytes, "send_rows": lay.send_rows,
      # floor: what any implementation of the layout must spend per token step, each
      # operation at its roofline (bytes of weights and the live KV cache, or unpadded
      # FLOPs) at the best probes, summed (perf_model.floor_operations).
      "floor_ops_ms": {name: 1e3 * k * max(b / hw.hbm_bytes_per_s, f / hw.matmul_flops)
                       for name, k, b, f in ops},
      "floor_ms": 1e3 * floor, "achieved_floor_fraction": floor / tpot,
      "exchange_ms": 1e3 * comm_bytes / link if comm_bytes else 0.0,
      "work_ms": 1e3 * pred.work_s,
      "model_ms": pred.tpot_ms, "model_terms_ms": {k: 1e3 * v for k, v in pred.terms_s.items()},
      "hardware": _hw_dict(hw),
  }
  return record, gen.tokens


def _weights(engine: Engine, spec: BenchSpec, cfg: ModelConfig):
  """The engine's weights, from the checkpoint when its model is the checkpoint's, else
  random from the seed; and which of the two ("restored" or "initialised")."""
  if spec.checkpoint and engine.cfg == cfg:
    return checkpoint.restore(spec.checkpoint, engine), "restored"
  return engine.init_params(spec.seed), "initialised"


def run(spec: BenchSpec = BenchSpec(), log: Callable[[str], None] = print) -> dict:
  """Runs every planned deployment in this process; the result dict (see write())."""
  devices = jax.devices()
  if spec.num_devices:
    if spec.num_devices > len(devices):
      raise ConfigError(f"num_devices={spec.num_devices} but {len(devices)} devices present.")
    devices = devices[:spec.num_devices]
  platform = devices[0].platform
  spec = _platform_defaults(spec, platform)
  n = len(devices)
  cfg = checkpoint.read_config(spec.checkpoint) if spec.checkpoint else load_model(spec.config)
  if spec.prompt_len + _new_tokens(spec) - 1 > cfg.max_seq_len:
    raise ConfigError(f"prompt_len {spec.prompt_len} + {_new_tokens(spec) - 1} decode steps "
                      f"exceed max_seq_len {cfg.max_seq_len} of {spec.config}.")
  log(f"bench: {n} x {devices[0].device_kind} ({platform}), jax {jax.__version__}; model "
      f"{spec.config}, batch {spec.batch}, prompt {spec.prompt_len}; decode: the ring's fill, "
      f"{spec.warmup} warm-up, {spec.synced} synced and {spec.steps} back-to-back calls of "
      f"{spec.tokens_per_call} token(s)")
  plans, skipped = plan(cfg, spec, n, log)
  footprints = {}
  if spec.check_memory:
    plans, footprints = _fit_memory(plans, skipped, spec, devices, log)
  if skipped and not spec.skip_unfit:
    raise ConfigError("cannot run " + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped)
                      + ". --skip_unfit runs the rest.")
  if not plans:
    raise ConfigError("nothing to run: " + "; ".join(s["reason"] for s in skipped))
  if spec.probes:
    hw, probes = measure_hardware(devices, cfg.jnp_dtype, platform != "cpu", log,
                                 spec.probe_mib)
  else:
    hw, probes = perf_model.H200, {}
  prompts = np.random.RandomState(spec.seed).randint(
      0, cfg.vocab_size, (max(p.batch for p in plans), spec.prompt_len))

  # One set of weights per model: created by its deployment with the most devices (so no
  # device holds more than the layouts need), laid out on each of the others, freed
  # before the next model's.
  records, first_tokens, init_s = {}, {}, {}
  by_model: dict[str, list[Plan]] = {}
  for p in plans:
    by_model.setdefault(p.model_name, []).append(p)
  done = 0
  for model_name, group in by_model.items():
    full = [p for p in group if p.share_of is None]
    source = max(full or group, key=lambda p: p.dep.num_devices)
    t0 = time.perf_counter()
    params, how = _weights(Engine(source.cfg, source.dep), spec, cfg)
    jax.block_until_ready(params)
    init_s[model_name] = time.perf_counter() - t0
    log(f"{model_name}: weights {how} on {source.name} ({source.dep.num_devices} "
        f"devices) in {init_s[model_name]:.1f} s")
    for p in [source] + [p for p in group if p is not source]:
      done += 1
      log(f"[{done}/{len(plans)}] {p.name}: {p.dep.describe()}, batch {p.batch}"
          + (f" -- {p.note}" if p.note else ""))
      engine_params, placed_from = params, source.name
      if p is not source and params is not None and not _coexists(p, source, footprints,
                                                                  devices):
        # This deployment and the source's weights do not fit together: free those, and
        # make this deployment's own (same seed: the same weights, jax's random numbers
        # do not depend on the sharding; tokens_agree_with_first checks it).
        log(f"  {p.name} and {source.name}'s weights do not fit together: freeing those")
        _free(params)
        params = engine_params = None
      if p is not source:
        t0 = time.perf_counter()
        if params is None:
          engine_params, placed_from = _weights(Engine(p.cfg, p.dep), spec, cfg)
        else:
          src = slice_share(params, source.cfg, p.cfg) if p.share_of else params
          engine_params = Engine(p.cfg, p.dep).place_params(src)
        jax.block_until_ready(engine_params)
        log(f"  weights {placed_from if params is None else 'placed'} in "
            f"{time.perf_counter() - t0:.1f} s")
      rec, tokens = run_one(p, engine_params, spec, prompts, hw, log)
      rec["placement_source"] = placed_from
      if p.share_of is None:
        ref = first_tokens.setdefault((model_name, p.batch), tokens)
        rec["tokens_agree_with_first"] = float(np.mean(tokens == ref))
      records[p.name] = rec
      log(f"  {p.name}: TPOT {rec['tpot_ms']:.3f} ms back to back (synced median "
          f"{rec['tpot_synced_ms']:.3f}), TPS {rec['tps']:,.0f}, floor {rec['floor_ms']:.3f} ms "
          f"({100 * rec['achieved_floor_fraction']:.0f}% of floor), model {rec['model_ms']:.3f}"
          f" ms, compile {rec['compile_s']:.1f} s")
      _free(engine_params, keep=params)  # place_params may hand back the source's arrays
      del engine_params
      gc.collect()
    if params is not None:
      _free(params)
    del params
    gc.collect()

  runs = [records[p.name] for p in plans]
  result = {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "git_commit": _git_commit(), "jax_version": jax.__version__,
      "jaxlib_version": _version("jaxlib"), "flax_version": _version("flax"),
      "platform": platform, "device_kind": devices[0].device_kind, "num_devices": n,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "spec": dataclasses.asdict(spec), "model_name": spec.config, "init_s": init_s,
      "probes": probes, "hardware": _hw_dict(hw), "runs": runs, "skipped": skipped,
  }
  result["calibration"] = calibration_summary(runs, cfg, spec.batch, hw if spec.probes else None)
  return result


# --- memory: the whole sweep planned before anything is allocated (memory.py) ---------------


def _footprint(p: Plan, spec: BenchSpec, platform: str):
  from jax_ep import memory

  # run_one's cache: prompt + the decode calls (+1 token from prefill, -1 already cached).
  return memory.footprint(p.cfg, p.dep, p.batch, spec.prompt_len,
                          spec.prompt_len + _new_tokens(spec) - 1, platform)


def _fit_memory(plans: list[Plan], skipped: list, spec: BenchSpec, devices, log):
  """Drops (into `skipped`) the plans that overflow a device on their own; the kept plans
  and their footprints."""
  from jax_ep import memory

  kept, footprints = [], {}
  for p in plans:
    fp = _footprint(p, spec, devices[0].platform)
    budget = memory.budget_for_devices(devices[:p.dep.num_devices])
    try:
      memory.check(fp, budget, platform=devices[0].platform, what=f"bench {p.name}")
    except ConfigError as e:
      skipped.append({"name": p.name, "reason": str(e)})
      log(f"skip {p.name}: {e}")
      continue
    kept.append(p)
    footprints[p.name] = fp
  return kept, footprints


def _coexists(p: Plan, source: Plan, footprints: dict, devices) -> bool:
  """Whether `p` can be placed and run while the source's weights stay on the devices
  (device 0 holds a shard of both). Placing holds p's weights twice for a moment (the
  canonical copy and its layout, Engine.place_params)."""
  from jax_ep import memory

  if p.name not in footprints or source.name not in footprints:
    return True  # memory not checked
  fp = footprints[p.name]
  held = footprints[source.name].weight_total
  budget = memory.budget_for_devices(devices[:p.dep.num_devices])
  placing = dataclasses.replace(fp, kv_cache=0, state=0, temporaries=0,
                                work=memory.WorkingSet(0, 0, 0, 0, 0))
  return memory.fits(fp, budget, held=held) and memory.fits(placing, budget,
                                                            held=held + fp.weight_total)


def _free(tree, keep=None) -> None:
  """Deletes the device buffers of `tree` now (not when the last reference goes), except
  the arrays that are also leaves of `keep`."""
  kept = {id(a) for a in jax.tree.leaves(keep)}
  for a in jax.tree.leaves(tree):
    if isinstance(a, jax.Array) and id(a) not in kept and not a.is_deleted():
      a.delete()


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def calibration_summary(runs: list[dict], cfg: ModelConfig | None = None, batch: int = 1024,
                        hw: perf_model.Hardware | None = None) -> dict:
  """Efficiency factors fitted to this run, and predictions made with them.

  seed_table: the seed's two deployments on H100 and H200 (presets), batch 1024,
  context 128. extrapolated: for each share run, the whole deployment it is a share
  of, on this device's measured HBM and matmul rates with the network of the
  measured probe (several devices) or else of the H200 preset (shared/GPU.md).
  """
  eff = perf_model.calibrate(runs)
  out = {"efficiency": dataclasses.asdict(eff),
         "validation": perf_model.validate(runs, eff), "seed_table": {}, "extrapolated": []}
  for hw_name, preset in perf_model.HARDWARE.items():
    rows = perf_model.seed_rows(preset, 1024, 128, eff, what_if=False)
    out["seed_table"][hw_name] = [
        {"method": r["method"], "gpus": r["gpus"], "batch": r["prediction"].batch,
         "tps": r["prediction"].tps,
         "tpot_ms": r["prediction"].tpot_ms, "seed_tps": r["seed_tps"],
         "seed_tpot_ms": r["seed_tpot_ms"]} for r in rows]
  if cfg is None or hw is None:
    return out
  net = hw if hw.collective_latency_s > 0 else perf_model.H200
  target = dataclasses.replace(
      perf_model.H200, name=f"{hw.name} rates, {net.name} network",
      hbm_bytes_per_s=hw.hbm_bytes_per_s, matmul_flops=hw.matmul_flops,
      intra_node_bytes_per_s=net.intra_node_bytes_per_s,
      inter_node_bytes_per_s=net.inter_node_bytes_per_s,
      collective_latency_s=net.collective_latency_s)
  for r in runs:
    if not r.get("share_of"):
      continue
    dep = DeploymentConfig(**r["share_of"])
    p = perf_model.predict(cfg, dep, batch, r["context_len"], target, eff, r["imbalance"])
    out["extrapolated"].append({
        "from": r["name"], "deployment": r["preset"], "gpus": dep.num_devices,
        "hardware": target.name, "tpot_ms": p.tpot_ms, "tps": p.tps,
        "terms_ms": {k: 1e3 * v for k, v in p.terms_s.items()}})
  return out


# --- output ------------------------------------------------------------------------------


def markdown(result: dict) -> str:
  """The results as a markdown report: the table, notes, probes and the calibrated model."""
  spec = result["spec"]
  lines = [f"# jax_ep decode benchmark, {result['date']}", "",
           f"{result['num_devices']} x {result['device_kind']} ({result['platform']}), jax "
           f"{result['jax_version']}, commit {result['git_commit'][:12]}; model "
           f"{result['model_name']}, prompt {spec['prompt_len']}; decode: the ring's fill, "
           f"{spec['warmup']} warm-up, {spec['synced']} synced and {spec['steps']} "
           "back-to-back steps.", "",
           "| Method | GPUs | Per-GPU deployment | batch | TPS | TPOT ms | synced median "
           "(p10-p90) ms | floor ms | achieved/floor | model ms | compile s |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  notes = []
  for r in result["runs"]:
    mark = ""
    if r["note"]:
      notes.append(r["note"])
      mark = f" [{len(notes)}]"
    lines.append(
        f"| {r['method']}{mark} | {r['gpus']} | {r['per_gpu']} | {r['batch']} | "
        f"{r['tps']:,.0f} | {r['tpot_ms']:.3f} | {r['tpot_synced_ms']:.3f} "
        f"({r['tpot_p10_ms']:.3f}-{r['tpot_p90_ms']:.3f}) | "
        f"{r['floor_ms']:.3f} | {r['achieved_floor_fraction']:.2f} | {r['model_ms']:.3f} | "
        f"{r['compile_s']:.1f} |")
  lines.append("")
  lines += [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
  lines += [f"Skipped {s['name']}: {s['reason']}" for s in result["skipped"]]
  lines += ["", "TPOT: time per output token of each sequence (one decode call: a ring "
            "period of micro-steps), the mean of the back-to-back steps with one sync at the "
            "end; the synced median times each step with a sync. floor: what any "
            "implementation of the layout must spend per token step at the best probes, each "
            "operation at its roofline (its weights and the live KV cache over the bandwidth, "
            "or its unpadded FLOPs over the matmul rate), summed (perf_model.floor_operations; "
            "per operation in the JSON's floor_ops_ms); achieved/floor = floor / TPOT. "
            "model: perf_model.predict with the measured hardware and ideal efficiency.", ""]
  if result["probes"]:
    p = result["probes"]
    lines += ["## Probes (this process, random data)", ""]
    lines += [f"- bandwidth, {name}, {p['copy_bytes'] / 2**20:.0f} MiB: {v / 1e12:.3f} TB/s"
              for name, v in p["bandwidth_methods"].items()]
    lines += [f"- matmul {name} {p['matmul_dtype']}: {v / 1e12:.1f} TFLOP/s"
              for name, v in p["matmul_methods"].items()]
    if "all_to_all_s" in p:
      lines.append(f"- all_to_all over {result['num_devices']} devices: "
                   f"{p['all_to_all_bytes'] / 2**20:.0f} MiB/device in "
                   f"{p['all_to_all_s'] * 1e6:.0f} us, {p['all_to_all_small_bytes'] >> 10} KiB in "
                   f"{p['all_to_all_small_s'] * 1e6:.0f} us -> "
                   f"{p['link_bytes_per_s'] / 1e9:.1f} GB/s")
    lines.append("")
  cal = result["calibration"]
  eff = cal["efficiency"]
  lines += ["## Performance model calibrated on this run", "",
            f"Efficiency: {perf_model.Efficiency(**eff).describe()}", "",
            perf_model.format_validation(cal["validation"]), ""]
  if result["platform"] == "cpu":
    lines += ["(Fitted on CPU devices: these factors say nothing about a GPU; the tables below "
              "only show the mechanics.)", ""]
  for x in cal.get("extrapolated", []):
    lines += [f"From the measured share ({x['from']}): {x['deployment']} on {x['gpus']} GPUs "
              f"({x['hardware']}) predicted at TPOT {x['tpot_ms']:.3f} ms, TPS {x['tps']:,.0f}.",
              ""]
  for hw_name, rows in cal["seed_table"].items():
    hw = perf_model.HARDWARE[hw_name]
    lines += [f"Seed table predicted on {hw.name} (batch 1024, context 128):", "",
              "| Method | GPUs | TPS (model) | TPOT ms (model) | TPS (seed) | TPOT ms (seed) |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['gpus']} | {r['tps']:,.0f} | {r['tpot_ms']:.2f} | "
              f"{'' if r['seed_tps'] is None else format(r['seed_tps'], ',')} | "
              f"{r['seed_tpot_ms'] or ''} |" for r in rows]
    lines.append("")
  return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
  """Measured TPOT (p10-p90 bars) beside the floor and the model, per deployment."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot written.")
    return False
  runs = result["runs"]
  x = np.arange(len(runs))
  med = np.array([r["tpot_ms"] for r in runs])
  err = np.array([[max(r["tpot_ms"] - r["tpot_p10_ms"], 0) for r in runs],
                  [max(r["tpot_p90_ms"] - r["tpot_ms"], 0) for r in runs]])
  fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(runs)), 4.5))
  ax.bar(x - 0.27, med, 0.27, yerr=err, capsize=4, label="measured (mean; synced p10-p90)")
  ax.bar(x, [r["model_ms"] for r in runs], 0.27, label="model (measured hw)")
  ax.bar(x + 0.27, [r["floor_ms"] for r in runs], 0.27, label="floor")
  ax.set_xticks(x, [f"{r['name']}\n{r['gpus']} dev" for r in runs], fontsize=8)
  ax.set_ylabel("TPOT (ms per decode step)")
  ax.set_yscale("log")
  ax.set_title(f"{result['model_name']}, "
               f"{result['num_devices']} x {result['device_kind']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write(result: dict, out_dir: str, stem: str = "seed_table") -> list[str]:
  """results JSON, markdown and PNG under out_dir (process 0 only); the paths written."""
  if jax.process_index() != 0:
    return []
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")]
  with open(paths[0], "w") as f:
    json.dump(result, f, indent=1, default=float)
  with open(paths[1], "w") as f:
    f.write(markdown(result) + "\n")
  if not plot(result, paths[2]):
    paths.pop()
  return paths


def main_from_flags() -> int:
  """`jax-ep bench`: the side-by-side run with the CLI's flags (jax_ep/__main__.py).

  --config, --batch (default 1024), --prompt_len, --max_new_tokens (the ring's fill, 1
  warm-up and 5 synced steps, the rest timed back to back) and --seed as for generate;
  unset, the platform's defaults apply (BenchSpec). --checkpoint: the model and weights
  of a checkpoint (jax_ep/checkpoint.py) instead of the --config preset's random ones.
  --output names the JSON (markdown and PNG are written beside). Mesh flags are
  ignored, with a warning.
  """
  from absl import flags

  f = flags.FLAGS
  ignored = [n for n in ("deployment", "stages", "expert_axis", "tp", "placement",
                         "microbatches", "decode_groups", "prefill_chunk", "kernels",
                         "capacity_factor", "dropless", "temperature", "profile_dir",
                         "check_numerics")
             if f[n].present]
  if ignored:
    print(f"jax-ep bench ignores {', '.join('--' + n for n in ignored)}: it runs the single, "
          "baseline and proposed presets for the devices present; for other meshes use "
          "benchmarks/seed_table.py --kinds=mesh:SxExT/G.", flush=True)
  spec = BenchSpec()
  fixed = 2 + spec.warmup + spec.synced  # prefill's token, the fill, warm-up, synced
  steps = max(1, f.max_new_tokens - fixed) if f["max_new_tokens"].present else None
  batch = 1024 if f.batch is None else f.batch
  prompt_len = f.prompt_len if f["prompt_len"].present else None
  spec = BenchSpec(config=f"checkpoint:{f.checkpoint}" if f.checkpoint else f.config,
                   batch=batch, prompt_len=prompt_len, steps=steps, seed=f.seed,
                   checkpoint=f.checkpoint, tokens_per_call=f.tokens_per_call or 1,
                   skip_unfit=f.skip_unfit, check_memory=f.check_memory)
  result = run(spec, log=lambda m: print(m, flush=True))
  print(markdown(result))
  if f.output:
    stem = os.path.splitext(os.path.basename(f.output))[0]
    for path in write(result, os.path.dirname(os.path.abspath(f.output)), stem):
      print(f"wrote {path}")
  return 0
