"""The seed's TPS/TPOT table from one run: deployments side by side, floor probes, model.

One process, the devices present (real GPUs or fake CPU devices): the same weights per
model (initialised once, then placed on each deployment's mesh) and the same prompts.
Compilation and warm-up steps are timed apart from the decode steps, which are reported
as the back-to-back mean (TPOT) and the synced median and p10/p90. Short probes in the
same process measure the device's bandwidth, matmul rate and all_to_all bandwidth; with
them the performance model (jax_ep/perf/) gives each deployment's floor and prediction,
and its efficiency factors are fitted to the run.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import os
import subprocess
import time
from collections.abc import Callable

import jax
import numpy as np

from jax_ep import checkpoint, decode
from jax_ep.config import ConfigError, ModelConfig, count
from jax_ep.engine import Engine
from jax_ep.perf.cost import floor_operations, floor_s, predict
from jax_ep.perf.hardware import H200, IDEAL, Hardware
from jax_ep.perf.per_device import describe_layout, layout
from jax_ep.perf.plan import (
  BenchSpec,
  Plan,
  coexists,
  fit_memory,
  new_tokens,
  plan,
  platform_defaults,
  slice_share,
  span_processes,
)
from jax_ep.perf.probes import measure_hardware
from jax_ep.perf.report import calibration_summary
from jax_ep.presets import load_model


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


def _hw_dict(hw: Hardware) -> dict:
  d = dataclasses.asdict(hw)
  d["measured"] = list(hw.measured)
  return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in d.items()}



def run_one(p: Plan, params, spec: BenchSpec, prompts: np.ndarray, hw: Hardware,
            log) -> tuple[dict, np.ndarray]:
  """Decodes with one deployment; the record of its timings, floor and prediction."""
  engine = Engine(p.cfg, p.dep)
  max_new = new_tokens(spec)
  max_len = spec.prompt_len + max_new - 1
  gen = decode.generate(engine, params, prompts[:p.batch] % p.cfg.vocab_size, max_new,
                        max_len=max_len, seed=spec.seed, synced_steps=spec.warmup + spec.synced,
                        log=lambda m: log("  " + m),
                        check_memory=False)  # run() planned the memory (plan.fit_memory)
  synced_s = np.asarray(gen.step_s[spec.warmup:])
  tpot = gen.tpot_ms / 1e3
  imbalance = gen.imbalance
  # The KV cache the timed steps attend over: live positions at the middle of them.
  live_context = spec.prompt_len + 1 + spec.tokens_per_call * (
      spec.warmup + spec.synced + spec.steps / 2)
  pred = predict(p.cfg, p.dep, p.batch, max_len, hw, IDEAL, imbalance)
  ops = floor_operations(p.cfg, p.dep, p.batch, live_context)
  floor = floor_s(p.cfg, p.dep, p.batch, live_context, hw)
  lay = layout(p.cfg, p.dep, p.batch)
  link = hw.intra_node_bytes_per_s
  comm_bytes = pred.comm_bytes["intra"] + pred.comm_bytes["inter"]
  record = {
      "name": p.name, "method": p.method, "preset": p.preset, "note": p.note,
      "gpus": p.dep.num_devices, "per_gpu": describe_layout(p.cfg, p.dep, p.batch),
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
      # FLOPs) at the best probes, summed (cost.floor_operations).
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


def seed_on_cpu_note(plans: list[Plan], platform: str) -> str | None:
  """A warning where seed-sized models (the seed, its slices) would run on CPU devices."""
  big = sorted({p.model_name for p in plans if p.model_name.startswith("seed")})
  if platform != "cpu" or not big:
    return None
  return (f"note: {', '.join(big)} on CPU devices: the seed's shapes (GBs of weights, large "
          "matmuls) take minutes here and time nothing a GPU would; --config=tiny checks the "
          "mechanics in seconds.")


def _check_length(spec: BenchSpec, cfg: ModelConfig) -> None:
  """Raises ConfigError if the run's prompt and decoded tokens exceed the model's length."""
  decoded = new_tokens(spec) - 1
  if spec.prompt_len + decoded <= cfg.max_seq_len:
    return
  # prompt + 1 + (warmup + synced + steps) x tokens_per_call <= max_seq_len.
  room = (cfg.max_seq_len - spec.prompt_len - 1) // spec.tokens_per_call
  most = room - spec.warmup - spec.synced
  advice = (f"--steps={most} fits" if most >= 1 else
            "lower --prompt_len, --synced, --warmup or --tokens_per_call")
  raise ConfigError(
      f"--prompt_len={spec.prompt_len} + {count(decoded, 'decoded token')} (the ring's fill, "
      f"then {spec.warmup} warm-up, {spec.synced} synced and {spec.steps} back-to-back calls "
      f"of {count(spec.tokens_per_call, 'token')}) exceed max_seq_len {cfg.max_seq_len} of "
      f"{spec.checkpoint or spec.config}: {advice}.")


def run(spec: BenchSpec = BenchSpec(), log: Callable[[str], None] = print) -> dict:  # noqa: B008
  """Runs every planned deployment in this process; the result dict (see write())."""
  devices = jax.devices()
  if spec.num_devices:
    if spec.num_devices > len(devices):
      raise ConfigError(f"--devices={spec.num_devices} but {len(devices)} devices present.")
    devices = devices[:spec.num_devices]
  platform = devices[0].platform
  spec = platform_defaults(spec, platform)
  n = len(devices)
  cfg = checkpoint.read_config(spec.checkpoint) if spec.checkpoint else load_model(spec.config)
  _check_length(spec, cfg)
  log(f"bench: {n} x {devices[0].device_kind} ({platform}), jax {jax.__version__}; model "
      f"{spec.config}, batch {spec.batch}, prompt {spec.prompt_len}; decode: the ring's fill, "
      f"{spec.warmup} warm-up, {spec.synced} synced and {spec.steps} back-to-back calls of "
      f"{count(spec.tokens_per_call, 'token')}"
      + (f"; expert blocks changed: {spec.expert_blocks}" if spec.expert_blocks else ""))
  plans, skipped = plan(cfg, spec, n, log)
  if note := seed_on_cpu_note(plans, platform):
    log(note)
  plans = span_processes(plans, skipped, devices, log, spec.skip_unfit)
  footprints = {}
  if spec.check_memory:
    plans, footprints = fit_memory(plans, skipped, spec, devices, log)
  if skipped and not spec.skip_unfit:
    # --skip_unfit runs what fits; an entry that names nothing (a typo) wants fixing instead.
    rest = (" --skip_unfit runs the rest." if not all(s.get("typo") for s in skipped) else "")
    raise ConfigError("cannot run " + "; ".join(f"{s['name']}: {s['reason'].rstrip('.')}"
                                                for s in skipped) + "." + rest)
  if not plans:
    raise ConfigError("nothing to run: " + "; ".join(s["reason"] for s in skipped))
  if spec.probes:
    hw, probes = measure_hardware(devices, cfg.jnp_dtype, platform != "cpu", log,
                                 spec.probe_mib)
  else:
    hw, probes = H200, {}
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
    log(f"{model_name}: weights {how} on {source.name} "
        f"({count(source.dep.num_devices, 'device')}) in {init_s[model_name]:.1f} s")
    for p in [source] + [p for p in group if p is not source]:
      done += 1
      log(f"[{done}/{len(plans)}] {p.name}: {p.dep.describe()}, batch {p.batch}"
          + (f" -- {p.note}" if p.note else ""))
      engine_params, placed_from = params, source.name
      if p is not source and params is not None and not coexists(p, source, footprints,
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
          f"(achieved/floor {rec['achieved_floor_fraction']:.2f}), model {rec['model_ms']:.3f}"
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
