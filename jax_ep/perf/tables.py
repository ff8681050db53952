"""The seed's table and scaling curves predicted by the cost model; `jax-ep predict`'s
report (the table, the term-by-term breakdown, the scaling plot)."""

from __future__ import annotations

import math

from jax_ep.config import ConfigError, DeploymentConfig, ModelConfig
from jax_ep.perf.calibrate import calibrate, format_validation, validate
from jax_ep.perf.cost import predict
from jax_ep.perf.hardware import H100_SXM, HARDWARE, IDEAL, Efficiency, Hardware
from jax_ep.perf.per_device import bubble_factor, describe_layout


def ep_deployment(cfg: ModelConfig, n: int, order: str = "stages_first",
                  groups: int | None = None) -> DeploymentConfig | None:
  """A proposed-style deployment of `cfg` on n GPUs, or None if n does not factor.

  order="stages_first": as configs/deployments.py's presets (stages up to L, then
  experts, then tp on each expert's MLP); "experts_first": experts up to E, then
  stages, then tp. groups (decode groups in flight) defaults to 0: one per stage.
  """
  first, second = ("stages", "expert") if order == "stages_first" else ("expert", "stages")
  limit = {"stages": cfg.num_layers, "expert": cfg.num_experts}
  sizes = {}
  rest = n
  for axis in (first, second):
    sizes[axis] = math.gcd(rest, limit[axis])
    rest //= sizes[axis]
  tp = rest
  if tp > 1 and cfg.mlp_dim % tp:
    return None
  return DeploymentConfig(kind="proposed", stages=sizes["stages"], expert=sizes["expert"],
                          tp=tp, placement="tp" if tp > 1 else "ep",
                          microbatches=sizes["stages"], decode_groups=groups or 0)




# The seed paper's reported figures (16 and 64 H100, batch 1024).
SEED_FIGURES = {"seed_baseline": (120_000, 8.3), "seed_proposed": (450_000, 2.2)}


def seed_rows(hw: Hardware = H100_SXM, batch: int = 1024, context_len: int = 128,
              eff: Efficiency = IDEAL, what_if: bool = True) -> list[dict]:
  """Predictions for the seed's two deployments (and a few variants) of the seed model."""
  import dataclasses as dc

  from jax_ep.presets import deployments, load_model

  cfg = load_model("seed")
  one = dict(decode_groups=1)
  groups = deployments.SEED_PROPOSED.groups
  cases = [("Baseline (TP=8, PP=2), one group", dc.replace(deployments.SEED_BASELINE, **one),
            "seed_baseline", batch),
           ("Baseline, ring of 2 groups", deployments.SEED_BASELINE, None, batch),
           ("Proposed cross-node EP, one group", dc.replace(deployments.SEED_PROPOSED, **one),
            "seed_proposed", batch),
           (f"Proposed, ring of {groups} groups of {batch // groups}",
            deployments.SEED_PROPOSED, "seed_proposed", batch),
           (f"Proposed, ring of {groups} groups of {batch}", deployments.SEED_PROPOSED, None,
            groups * batch)]
  if what_if:
    cases += [
        (f"  what if: proposed, 8 groups of {batch}", dc.replace(deployments.SEED_PROPOSED,
                                                                decode_groups=8), None, 8 * batch),
        ("  what if: one GPU", deployments.SINGLE, None, batch),
    ]
  for name, dep, _, b in cases:  # before any row: say which row, and what all rows take
    try:
      dep.check_batch(b)
    except ConfigError as e:
      # A row's batch is --batch times its own factor (1, or its groups of --batch).
      least = math.lcm(*(d.min_batch // math.gcd(d.min_batch, n // batch)
                         for _, d, _, n in cases))
      raise ConfigError(f"{e} (the table's row {name.strip()!r}; every row of the table "
                        f"takes a --batch that is a multiple of {least}.)") from None
  rows = []
  for name, dep, key, b in cases:
    p = predict(cfg, dep, b, context_len, hw, eff)
    # The seed's figures are for its batch of 1024 only.
    tps, tpot = SEED_FIGURES.get(key, (None, None)) if batch == 1024 else (None, None)
    rows.append({"method": name, "gpus": dep.num_devices,
                 "per_gpu": describe_layout(cfg, dep, b), "prediction": p,
                 "bubble": bubble_factor(dep), "groups": dep.groups,
                 "seed_tps": tps, "seed_tpot_ms": tpot})
  return rows


def format_seed_table(rows: list[dict], hw: Hardware) -> str:
  lines = [f"Seed model, batch {rows[0]['prediction'].batch}, on {hw.name}:",
           "| Method | GPUs | Per-GPU deployment | TPS (model) | TPOT ms (model) | "
           "TPS (seed) | TPOT ms (seed) | work ms | ideal ms | bubble x | fits |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for r in rows:
    p = r["prediction"]
    seed_tps = f"{r['seed_tps']:,}" if r["seed_tps"] else ""
    seed_tpot = f"{r['seed_tpot_ms']}" if r["seed_tpot_ms"] else ""
    lines.append(f"| {r['method']} | {r['gpus']} | {r['per_gpu']} | {p.tps:,.0f} | "
                 f"{p.tpot_ms:.2f} | {seed_tps} | {seed_tpot} | {1e3 * p.work_s:.2f} | "
                 f"{1e3 * p.ideal_s:.2f} | "
                 f"{r['bubble']:.2f} | {'yes' if p.fits else 'NO'} |")
  lines += ["", "model: this implementation's step at the hardware rates with the efficiency "
            "factors; work: the same work at the ceilings with communication overlapped and "
            "no latency; ideal: floor_s, each operation of a token step at its roofline "
            "(any implementation of the layout); bubble: L / G, micro-steps per token over "
            "the busy ones."]
  return "\n".join(lines)


def format_breakdown(rows: list[dict]) -> str:
  """Where each predicted step goes: the named terms in ms, and the per-device volumes."""
  names = list(rows[0]["prediction"].terms_s)
  lines = ["| Method | " + " | ".join(names) + " | HBM GB read | TFLOP | intra GB | inter GB |",
           "| --- |" + " ---: |" * (len(names) + 4)]
  for r in rows:
    p = r["prediction"]
    terms = " | ".join(f"{1e3 * p.terms_s[n]:.3f}" for n in names)
    lines.append(f"| {r['method'].strip()} | {terms} | {p.hbm_bytes / 1e9:.2f} | "
                 f"{p.flops / 1e12:.2f} | {p.comm_bytes['intra'] / 1e9:.3f} | "
                 f"{p.comm_bytes['inter'] / 1e9:.3f} |")
  return "\n".join(lines)


def scaling_curve(cfg: ModelConfig, hw: Hardware, batch: int = 1024, context_len: int = 128,
                  eff: Efficiency = IDEAL, gpus=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> dict:
  """Predicted TPS and TPOT against the GPU count for three families of EP deployments."""
  families = {
      "stages first, ring of G = S groups (jax_ep presets)": dict(order="stages_first"),
      "stages first, one group": dict(order="stages_first", groups=1),
      "experts first, G = S": dict(order="experts_first"),
  }
  curves = {}
  for label, kw in families.items():
    points = []
    for n in gpus:
      dep = ep_deployment(cfg, n, **kw)
      if dep is None:
        continue
      try:
        p = predict(cfg, dep, batch, context_len, hw, eff)
      except ValueError:  # ConfigError: this batch or model does not split on it
        continue
      points.append({"gpus": n, "tps": p.tps, "tpot_ms": p.tpot_ms, "fits": p.fits,
                     "mesh": f"S{dep.stages}xE{dep.expert}xTP{dep.tp}"})
    curves[label] = points
  return curves


def plot_scaling(curves: dict, path: str, title: str, seed_points: bool = True) -> bool:
  """Writes the scaling curves as a PNG; False (and a message) without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot written.")
    return False
  fig, (ax_tps, ax_tpot) = plt.subplots(1, 2, figsize=(12, 4.5))
  for label, pts in curves.items():
    x = [p["gpus"] for p in pts]
    line, = ax_tps.plot(x, [p["tps"] for p in pts], marker="o", label=label)
    ax_tpot.plot(x, [p["tpot_ms"] for p in pts], marker="o", color=line.get_color(), label=label)
    for ax, key in ((ax_tps, "tps"), (ax_tpot, "tpot_ms")):  # hollow: does not fit in HBM
      bad = [p for p in pts if not p["fits"]]
      ax.scatter([p["gpus"] for p in bad], [p[key] for p in bad], s=120, facecolors="none",
                 edgecolors="red", zorder=3)
  if seed_points:
    for key, (tps, tpot) in SEED_FIGURES.items():
      n = 16 if key == "seed_baseline" else 64
      ax_tps.scatter([n], [tps], marker="*", s=200, color="k", zorder=4)
      ax_tpot.scatter([n], [tpot], marker="*", s=200, color="k", zorder=4)
      ax_tps.annotate(f"seed {key.split('_')[1]}", (n, tps), textcoords="offset points",
                      xytext=(5, 5))
  for ax, ylabel in ((ax_tps, "TPS (tokens/s)"), (ax_tpot, "TPOT (ms)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
  ax_tps.legend(fontsize=8)
  fig.suptitle(title + "  (red ring: does not fit in HBM; star: the seed's figure)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True




def report(hardware: str = "h100", batch: int = 1024, context_len: int = 128,
           calibration: str | None = None, plot: str | None = None) -> str:
  """The seed's table, the term-by-term breakdown and (optionally) the scaling plot."""
  hw = HARDWARE[hardware]
  eff, out = IDEAL, []
  if calibration:
    eff = calibrate(calibration)
    out += [f"calibrated from {calibration}: {eff.describe()}",
            format_validation(validate(calibration, eff)), ""]
  out += [hw.describe(), f"  ({hw.note})", f"efficiency: {eff.describe()}"]
  rows = seed_rows(hw, batch, context_len, eff)
  out += [format_seed_table(rows, hw), "",
          "Predicted step, term by term (ms per decode step, per device):",
          format_breakdown(rows)]
  if plot:
    from jax_ep.presets import load_model

    curves = scaling_curve(load_model("seed"), hw, batch, context_len, eff)
    out += ["", "Scaling (GPUs: TPS):"]
    out += [f"  {label}: " + ", ".join(f"{p['gpus']}:{p['tps']:,.0f}" for p in pts)
            for label, pts in curves.items()]
    title = f"seed model, batch {batch}, context {context_len}, {hw.name}"
    if plot_scaling(curves, plot, title):
      out.append(f"wrote {plot}")
  return "\n".join(out)
