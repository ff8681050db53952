"""jax_ep/perf/calibrate.py: the efficiency fitted to steps predicted with known factors
is those factors; no jax."""

import dataclasses

import pytest

from configs import deployments, load_model
from jax_ep.perf import calibrate, cost, hardware, plan

TINY = load_model("tiny")  # L4 E16 K2, H8 x 8 = D64, F128, V256, float32 (4 bytes), gelu
SEED = load_model("seed")


def _records(truth, cases, context=64):
  out = []
  for dep, cfg, batch in cases:
    p = cost.predict(cfg, dep, batch, context, hardware.H200, truth)
    out.append({"model": dataclasses.asdict(cfg), "deployment": dataclasses.asdict(dep),
                "batch": batch, "context_len": context, "hardware": "h200",
                "tpot_ms": p.tpot_ms})
  return out


def test_calibrate_recovers_known_efficiency():
  truth = hardware.Efficiency(memory=0.8, compute=0.5, comm=0.4, overlap=1.0,
                              layer_overhead_s=30e-6)
  one_group = dataclasses.replace(deployments.SEED_PROPOSED, decode_groups=1)
  records = _records(truth, [(deployments.SINGLE, SEED, 1024),
                             (deployments.SINGLE, SEED, 8192),  # compute-bound experts
                             (deployments.SEED_BASELINE, SEED, 1024),
                             (deployments.SEED_PROPOSED, SEED, 1024),  # memory-bound
                             (one_group, SEED, 1024),
                             (deployments.PRESETS["proposed_8"], TINY, 8)])
  eff = calibrate.calibrate(records)
  assert eff.memory == pytest.approx(0.8, rel=2e-3)
  assert eff.compute == pytest.approx(0.5, rel=2e-3)
  assert eff.comm == pytest.approx(0.4, rel=2e-2)
  assert eff.layer_overhead_s == pytest.approx(30e-6, rel=2e-2)
  assert all(r["ratio"] == pytest.approx(1.0, rel=1e-2) for r in calibrate.validate(records, eff))


def test_calibrate_one_gpu_runs():
  # What one H200 gives: the whole model and one device's share of seed_proposed. Two
  # runs fit one roofline factor and the fixed per-layer cost (which dominates the share).

  truth = hardware.Efficiency(memory=0.85, compute=0.85, layer_overhead_s=400e-6)
  share, one, rows = plan.share_config(SEED, deployments.SEED_PROPOSED, 1024 // 4)
  records = _records(truth, [(deployments.SINGLE, SEED, 1024), (one, share, rows)])
  eff = calibrate.calibrate(records)
  assert eff.memory == pytest.approx(0.85, rel=2e-3)
  assert eff.compute == eff.memory
  assert eff.layer_overhead_s == pytest.approx(400e-6, rel=1e-2)
  assert eff.comm == 1.0
  # One run: one roofline factor.
  eff = calibrate.calibrate(records[:1])
  assert eff.memory == eff.compute and eff.comm == 1.0 and eff.layer_overhead_s == 0.0
