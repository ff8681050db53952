"""Efficiency factors fitted to measured decode steps (calibrate), and predicted against
measured TPOT (validate)."""

from __future__ import annotations

import itertools
import json
import math

from jax_ep.config import DeploymentConfig, ModelConfig
from jax_ep.perf.cost import predict
from jax_ep.perf.hardware import HARDWARE, IDEAL, Efficiency, Hardware


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
  """Non-negative least squares by trying every active set (a handful of columns)."""
  import numpy as np

  a, b = np.asarray(rows, float), np.asarray(y, float)
  best, best_err = np.zeros(a.shape[1]), float(np.sum(b * b))
  for k in range(1, a.shape[1] + 1):
    for cols in itertools.combinations(range(a.shape[1]), k):
      x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
      if np.any(x <= 0):
        continue
      err = float(np.sum((a[:, cols] @ x - b) ** 2))
      if err < best_err:
        best, best_err = np.zeros(a.shape[1]), err
        best[list(cols)] = x
  return best.tolist()


def _configs_of(record: dict):
  cfg = ModelConfig(**record["model"])
  dep = DeploymentConfig(**record["deployment"])
  hw = record.get("hardware", "h200")
  if isinstance(hw, dict):  # from JSON: an unmeasured link (one device) is stored as null
    hw = Hardware(**{k: math.inf if v is None else v for k, v in hw.items()
                     if k != "measured"}, measured=tuple(hw.get("measured", ())))
  elif not isinstance(hw, Hardware):
    hw = HARDWARE[str(hw)]
  return cfg, dep, hw


def calibrate(records, overlap: float = 1.0) -> Efficiency:
  """Fits Efficiency to measured decode steps.

  tpot = sum over phases of max(bytes / (bw x memory), flops / (rate x compute))
         + comm / comm_eff + layer_steps x overhead.

  Args:
    records: measurements, each a dict with model and deployment (the dataclass fields),
      batch, context_len, imbalance (optional), hardware (a Hardware dict or a HARDWARE
      key) and tpot_ms, as perf/runner.py writes under "runs". A JSON path or a bench result
      dict ({"runs": [...]}) is accepted too.
    overlap: kept as given (a few runs cannot separate it from the other factors).

  Least squares on relative error: memory and compute on a log grid, refined around
  the best point; comm and the overhead solved non-negative at each point. With fewer
  runs than factors the later ones in (roofline, overhead, split memory/compute, comm)
  stay ideal; a
  factor no run depends on stays ideal; memory and compute are tied (one roofline
  factor) unless three runs or more include both memory-bound and compute-bound phases
  (over 10% of their roofline time each way).
  """
  import numpy as np

  records = load_records(records)
  if not records:
    raise ValueError("calibrate() needs at least one measured run.")
  setups = [_configs_of(r) for r in records]
  y = np.array([r["tpot_ms"] / 1e3 for r in records])

  def predictions(memory, compute):
    eff = Efficiency(memory=memory, compute=compute, overlap=overlap)
    return [predict(c, d, r["batch"], r["context_len"], hw, eff, r.get("imbalance", 1.0))
            for (c, d, hw), r in zip(setups, records, strict=True)]

  base = predictions(1.0, 1.0)
  comm = np.array([p.components["comm_s"] for p in base])
  steps = np.array([p.components["layer_steps"] for p in base], float)
  linear = []  # (name, column) solved by least squares at each grid point
  if len(records) >= 2 and steps.any():  # fixed per-layer cost dominates small shares
    linear.append(("layer_steps", steps))
  if len(records) >= 4 and comm.any():
    linear.append(("comm", comm))
  share = [(p.components["memory_bound_s"] / p.components["roofline_s"],
            p.components["compute_bound_s"] / p.components["roofline_s"]) for p in base]
  tied = (len(records) < 3 or not any(m > 0.1 for m, _ in share)
          or not any(c > 0.1 for _, c in share))

  def fit(memory, compute):
    roof = np.array([p.components["roofline_s"] for p in predictions(memory, compute)])
    rest, coef = y - roof, np.zeros(len(linear))
    if linear:
      cols = np.stack([col for _, col in linear], axis=1)
      coef = np.asarray(_nnls((cols / y[:, None]).tolist(), (rest / y).tolist()))
      rest = rest - cols @ coef
    return float(np.sum((rest / y) ** 2)), coef

  # A coarse log grid, then finer grids around the few best points of the last: the
  # error has long valleys (memory efficiency against per-layer overhead), so refining
  # around one grid point can settle in the wrong part of a valley.
  centers, span, points, found = [(0.2, 0.2)], math.log(20.0), 41, []
  for _ in range(4):
    offsets = np.exp(np.linspace(-span, span, points))
    found = []
    for cm, cc in centers:
      pairs = ([(cm * o, cm * o) for o in offsets] if tied else
               [(cm * om, cc * oc) for om in offsets for oc in offsets])
      found += [(*fit(m, c), m, c) for m, c in pairs]
    found.sort(key=lambda t: t[0])
    centers = [(m, c) for _, _, m, c in found[:4]]
    span, points = 2 * span / (points - 1), 21
  err, coef, memory, compute = found[0]
  memory, compute = _polish(base, linear, y, memory, compute, tied)
  best = (fit(memory, compute)[0], memory, compute, fit(memory, compute)[1])
  _, memory, compute, coef = best
  if memory > 1 or compute > 1:
    # No kernel beats the probed ceilings: with too few runs to separate the factors the
    # fit can wander past them; hold them at 1 and refit the rest.
    memory, compute = min(memory, 1.0), min(compute, 1.0)
    _, coef = fit(memory, compute)
  values = dict(zip([n for n, _ in linear], coef, strict=True))
  comm_coef = values.get("comm", 0.0)
  return Efficiency(memory=float(memory), compute=float(compute),
                    comm=float(1.0 / comm_coef) if comm_coef > 0 else 1.0, overlap=overlap,
                    layer_overhead_s=float(values.get("layer_steps", 0.0)))


def _polish(base, linear, y, memory, compute, tied, rounds: int = 20):
  """Refines (memory, compute) from a grid point: with each phase's bound side (bytes or
  FLOPs) fixed, a step's time is linear in 1/memory, 1/compute and the linear terms, so
  non-negative least squares solves it; repeat until the sides stop changing."""
  import numpy as np

  extra = np.stack([col for _, col in linear], axis=1) if linear else np.zeros((len(y), 0))
  for _ in range(rounds):
    rows = []
    for p in base:
      mem = sum(k * t_b for k, t_b, t_f in p.components["phases"]
                if t_b / memory >= t_f / compute)
      cmp = sum(k * t_f for k, t_b, t_f in p.components["phases"]
                if t_b / memory < t_f / compute)
      rows.append([mem + cmp] if tied else [mem, cmp])
    a = np.concatenate([np.asarray(rows), extra], axis=1) / y[:, None]
    x = np.asarray(_nnls(a.tolist(), (y / y).tolist()))
    if not (x[:1 if tied else 2] > 0).all():
      return memory, compute
    new = (1 / x[0], 1 / x[0]) if tied else (1 / x[0], 1 / x[1])
    if np.allclose(new, (memory, compute), rtol=1e-9):
      break
    memory, compute = new
  return memory, compute


def validate(records, eff: Efficiency = IDEAL) -> list[dict]:
  """Predicted vs measured TPOT for each record (same format as calibrate())."""
  out = []
  for r in load_records(records):
    cfg, dep, hw = _configs_of(r)
    p = predict(cfg, dep, r["batch"], r["context_len"], hw, eff, r.get("imbalance", 1.0))
    out.append({"name": r.get("name", dep.kind), "measured_ms": r["tpot_ms"],
                "predicted_ms": p.tpot_ms, "ratio": p.tpot_ms / r["tpot_ms"]})
  return out


def format_validation(rows: list[dict]) -> str:
  lines = ["| run | measured ms | predicted ms | predicted / measured |",
           "| --- | ---: | ---: | ---: |"]
  lines += [f"| {r['name']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | "
            f"{r['ratio']:.2f} |" for r in rows]
  return "\n".join(lines)


def load_records(source) -> list[dict]:
  """Measurement records from a list, a bench result dict, or a JSON file path."""
  if isinstance(source, str):
    with open(source) as f:
      source = json.load(f)
  if isinstance(source, dict):
    source = source.get("runs", [])
  return [r for r in source if r.get("tpot_ms")]
