"""Where a decode step's device time goes: a jax.profiler trace of back-to-back steps,
summed per named scope (gate, dispatch, experts, combine, head, ...) and per kernel.

  PYTHONPATH=. python3 benchmarks/profile_decode.py --config=seed --deployment=single \\
      --batch=1024 --out=$OUT/profile_single.json

Also checks the compiled decode program for conditionals and while loops (trip counts).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile

SCOPES = ("gate", "dispatch", "experts", "combine", "head", "embed", "to_next_stage",
          "scatter")


def scopes_of(hlo: str) -> dict[str, str]:
  """Kernel name -> named scope, from the compiled HLO's op_name metadata (the trace
  names kernels after HLO instructions, "fusion.3" as "fusion_3"; under CUDA graphs
  its events carry no scope of their own)."""
  out = {}
  for m in re.finditer(r"%([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]+)\"", hlo):
    name, op = m.group(1).replace(".", "_"), m.group(2)
    out[name] = next((s for s in SCOPES if f"/{s}/" in op or op.endswith(f"/{s}")),
                     "attention" if "attn" in op else "other")
  return out


def summarize(trace_dir: str, steps: int, scopes: dict[str, str]) -> dict:
  """Device kernel time per scope and per kernel name, ms per decode step."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "/device:GPU" in e.get("args", {}).get("name", "")}
  by_scope, by_kernel = collections.Counter(), collections.Counter()
  total = 0.0
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in devices:
      continue
    dur = e.get("dur", 0) / 1e3  # ms
    name = e.get("name", "?")
    scope = scopes.get(name) or ("experts" if name.startswith("grouped_matmul")
                                 else "attention" if name.startswith("mha") else "other")
    by_scope[scope] += dur
    by_kernel[e.get("name", "?")[:90]] += dur
    total += dur
  per = max(steps, 1) * max(len(devices), 1)
  sample = [e.get("args", {}) for e in events if e.get("ph") == "X" and e.get("pid") in devices][:5]
  return {"trace": path, "device_ms_per_step": total / per, "sample_args": sample,
          "scopes_ms": {k: v / per for k, v in by_scope.most_common()},
          "kernels_ms": {k: v / per for k, v in by_kernel.most_common(40)},
          **idle(events, devices, per)}


def idle(events, devices, per: float) -> dict:
  """Device idle time: the gaps between the union of kernel intervals (all streams) of
  each device, ms per step, with the largest gaps and the kernels on either side."""
  gaps, span_ms, idle_ms = [], 0.0, 0.0
  for pid in devices:
    iv = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in events
                if e.get("ph") == "X" and e.get("pid") == pid)
    if not iv:
      continue
    end, prev = iv[0][1], iv[0][2]
    span_ms += (max(b for _, b, _ in iv) - iv[0][0]) / 1e3
    for a, b, name in iv[1:]:
      if a > end:
        gaps.append(((a - end) / 1e3, prev[:60], name[:60]))
        idle_ms += (a - end) / 1e3
      if b > end:
        end, prev = b, name
  by_pair = collections.Counter()
  for ms, before, after in gaps:
    by_pair[f"{before} -> {after}"] += ms
  return {"traced_span_ms_per_step": span_ms / per, "idle_ms_per_step": idle_ms / per,
          "idle_gaps_per_step": len(gaps) / per,
          "idle_by_neighbours_ms": {k: v / per for k, v in by_pair.most_common(25)}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="seed")
  ap.add_argument("--deployment", default="single")
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--tokens_per_call", type=int, default=1)
  ap.add_argument("--share", default=None,
                  help="profile one device's share of this deployment (as jax-ep bench "
                  "--share: its layers and experts as a one-device model, one group's "
                  "rows) instead of --deployment at --batch")
  ap.add_argument("--router", default="model", choices=("model", "balanced"),
                  help="balanced: every expert gets the mean rows each step "
                  "(decode_parts.balanced_top_k_gate; a diagnostic, not the model's function)")
  ap.add_argument("--out", default="profile.json")
  args = ap.parse_args()
  if args.router == "balanced":
    from benchmarks.decode_parts import balanced_top_k_gate
    from jax_ep import routing

    routing.top_k_gate = balanced_top_k_gate

  import jax
  import numpy as np

  from jax_ep import decode
  from jax_ep.engine import Engine
  from jax_ep.presets import deployments, load_model

  cfg = load_model(args.config)
  dep = deployments.resolve(args.deployment, len(jax.devices()))
  if args.share:
    from jax_ep.perf import plan

    full = deployments.resolve(plan.share_preset(args.share), len(jax.devices()))
    cfg, dep, args.batch = plan.share_config(
        cfg, dataclasses.replace(full, decode_groups=1, microbatches=1),
        args.batch // full.groups)
  dep = dataclasses.replace(dep, tokens_per_call=args.tokens_per_call)
  engine = Engine(cfg, dep)
  params = engine.init_params(0)
  prompts = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.prompt_len))
  trace_dir = tempfile.mkdtemp()
  new = 1 + 1 + 2 + args.steps
  gen = decode.generate(engine, params, prompts, new, max_len=args.prompt_len + new,
                        synced_steps=2, profile_dir=trace_dir)
  # The compiled decode call, as generate compiled it (the same cache length): no
  # conditional; while loops and their known trip counts; the scopes of its kernels.
  fn = engine.decode_program(args.batch, dep.ring_period * dep.tokens_per_call)
  state = engine.abstract_decode_state(args.batch, decode.cache_len(args.prompt_len + new))
  hlo = fn.lower(params, state, jax.random.key(0)).compile().as_text()
  out = {"config": args.config, "share": args.share, "router": args.router,
         "deployment": dep.describe(),
         "batch": args.batch,
         "tpot_ms": gen.tpot_ms, "tpot_synced_ms": gen.tpot_synced_ms,
         "imbalance": gen.imbalance, **summarize(trace_dir, gen.decode_steps, scopes_of(hlo))}
  out["hlo_conditionals"] = hlo.count(" conditional(")
  out["hlo_whiles"] = len(re.findall(r" while\(", hlo))
  out["hlo_known_trip_counts"] = re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)
  out["hlo_copies"] = len(re.findall(r" copy\(", hlo))
  with gzip.open(args.out.replace(".json", "_hlo.txt.gz"), "wt") as f:
    f.write(hlo)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps({k: v for k, v in out.items() if k not in ("kernels_ms", "sample_args")},
                   indent=1))
  print("idle between kernels (ms per step), by neighbours:")
  for k, v in list(out["idle_by_neighbours_ms"].items())[:12]:
    print(f"  {v:8.3f}  {k}")
  print("top kernels (ms per step):")
  for k, v in list(out["kernels_ms"].items())[:25]:
    print(f"  {v:8.3f}  {k}")


if __name__ == "__main__":
  main()
