"""A benchmark result as a report: the efficiency fitted to it, markdown, a plot, and the
files written (JSON, markdown, PNG)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import numpy as np

from jax_ep import output
from jax_ep.config import DeploymentConfig, ModelConfig
from jax_ep.perf.calibrate import calibrate, format_validation, validate
from jax_ep.perf.cost import predict
from jax_ep.perf.hardware import H200, HARDWARE, Efficiency, Hardware
from jax_ep.perf.tables import seed_rows


def calibration_summary(runs: list[dict], cfg: ModelConfig | None = None, batch: int = 1024,
                        hw: Hardware | None = None) -> dict:
  """Efficiency factors fitted to this run, and predictions made with them.

  seed_table: the seed's two deployments on H100 and H200 (presets), batch 1024,
  context 128. extrapolated: for each share run, the whole deployment it is a share
  of, on this device's measured HBM and matmul rates with the network of the
  measured probe (several devices) or else of the H200 preset (shared/GPU.md).
  """
  eff = calibrate(runs)
  out = {"efficiency": dataclasses.asdict(eff),
         "validation": validate(runs, eff), "seed_table": {}, "extrapolated": []}
  for hw_name, preset in HARDWARE.items():
    rows = seed_rows(preset, 1024, 128, eff, what_if=False)
    out["seed_table"][hw_name] = [
        {"method": r["method"], "gpus": r["gpus"], "batch": r["prediction"].batch,
         "tps": r["prediction"].tps,
         "tpot_ms": r["prediction"].tpot_ms, "seed_tps": r["seed_tps"],
         "seed_tpot_ms": r["seed_tpot_ms"]} for r in rows]
  if cfg is None or hw is None:
    return out
  net = hw if hw.collective_latency_s > 0 else H200
  target = dataclasses.replace(
      H200, name=f"{hw.name} rates, {net.name} network",
      hbm_bytes_per_s=hw.hbm_bytes_per_s, matmul_flops=hw.matmul_flops,
      intra_node_bytes_per_s=net.intra_node_bytes_per_s,
      inter_node_bytes_per_s=net.inter_node_bytes_per_s,
      collective_latency_s=net.collective_latency_s)
  for r in runs:
    if not r.get("share_of"):
      continue
    dep = DeploymentConfig(**r["share_of"])
    p = predict(cfg, dep, batch, r["context_len"], target, eff, r["imbalance"])
    out["extrapolated"].append({
        "from": r["name"], "deployment": r["preset"], "gpus": dep.num_devices,
        "hardware": target.name, "tpot_ms": p.tpot_ms, "tps": p.tps,
        "terms_ms": {k: 1e3 * v for k, v in p.terms_s.items()}})
  return out




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
            "or its unpadded FLOPs over the matmul rate), summed (perf.cost.floor_operations; "
            "per operation in the JSON's floor_ops_ms); achieved/floor = floor / TPOT. "
            "model: perf.cost.predict with the measured hardware and ideal efficiency.", ""]
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
            f"Efficiency: {Efficiency(**eff).describe()}", "",
            format_validation(cal["validation"]), ""]
  if result["platform"] == "cpu":
    lines += ["(Fitted on CPU devices: these factors say nothing about a GPU; the tables below "
              "only show the mechanics.)", ""]
  for x in cal.get("extrapolated", []):
    lines += [f"From the measured share ({x['from']}): {x['deployment']} on {x['gpus']} GPUs "
              f"({x['hardware']}) predicted at TPOT {x['tpot_ms']:.3f} ms, TPS {x['tps']:,.0f}.",
              ""]
  for hw_name, rows in cal["seed_table"].items():
    hw = HARDWARE[hw_name]
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
  fig.savefig(path, dpi=110, format="png")
  plt.close(fig)
  return True


def write(result: dict, out_dir: str, stem: str = "seed_table",
          json_path: str | None = None) -> list[str]:
  """The results JSON (at `json_path` if given), its markdown and PNG as out_dir/stem.md
  and .png, each written atomically (process 0 only); the paths written."""
  if jax.process_index() != 0:
    return []
  os.makedirs(out_dir, exist_ok=True)
  paths = [json_path or os.path.join(out_dir, f"{stem}.json"),
           *(os.path.join(out_dir, f"{stem}.{ext}") for ext in ("md", "png"))]
  output.write_json(paths[0], result, default=float)
  output.write_text(paths[1], markdown(result) + "\n")
  if importlib.util.find_spec("matplotlib") is None:
    print("matplotlib is not installed: no plot written.")
    return paths[:2]
  with output.replacing(paths[2]) as tmp:
    plot(result, tmp)
  return paths
