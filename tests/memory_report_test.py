"""Tests for jax_ep/memory_report.py: every weight held once per replica; the footprint
table against a budget."""

import numpy as np
import pytest

from configs import deployments, load_model
from jax_ep import memory, memory_budget, memory_report

PRESETS = deployments.PRESETS


@pytest.mark.parametrize("name", ["seed_baseline", "seed_proposed", "seed_proposed_tp2"])
def test_holdings_cover_every_weight_once_per_replica(name):
  cfg, dep = load_model("seed"), PRESETS[name]
  rows = memory_report.holdings(cfg, dep, 1024)
  held = np.zeros((cfg.num_layers, cfg.num_experts, cfg.mlp_dim // 512), int)  # 512-col blocks
  vocab = np.zeros((dep.stages, cfg.vocab_size), int)
  for r in rows:
    layers, experts, cols = (slice(*r["layers"]), slice(*r["experts"]),
                             slice(r["mlp_columns"][0] // 512, r["mlp_columns"][1] // 512))
    held[layers, experts, cols] += 1
    vocab[r["stage"], slice(*r["vocab"])] += 1
  assert (held == 1).all()  # every block of every expert on exactly one device
  assert (vocab == 1).all()  # each stage's devices split the vocabulary
  assert {r["sequences"] for r in rows} == {(e * 1024 // dep.expert, (e + 1) * 1024 // dep.expert)
                                           for e in range(dep.expert)}


def test_footprint_table_adds_only_what_is_live_together():
  fp = memory.footprint(load_model("tiny"), PRESETS["single"], 8, 4, 8, platform="cpu")
  rows = fp.rows()[:-1]  # the last is the total
  assert sum(v for _, v, counted in rows if counted) == fp.total
  table = memory_report.format_footprint(fp, memory_budget.Budget(fp.total, "just enough"))
  assert table.count("(not live with the largest of these three; not added)") == sum(
      not counted for *_, counted in rows)
  # The tiny model's table in MiB (in GiB every row would read 0.000).
  assert "| per device | MiB | bytes |" in table
  assert f"| total per device | {fp.total / 2**20:.3f} | {fp.total:,} |" in table
  seed = memory.footprint(load_model("seed"), PRESETS["single"], 8, 4, 8, platform="cpu")
  assert "| per device | GiB | bytes |" in memory_report.format_footprint(seed)
  # The tiny model's total reads in MiB (in GiB it would read 0.00).
  assert table.endswith(f"(just enough); needs {fp.total / 2**20:.2f} MiB per device: fits.")
  assert memory_budget.format_bytes(3 * memory_budget.GiB) == "3.00 GiB"
  # One unit a line; what that unit rounds to nothing but is not reads "<0.01".
  assert memory_budget.format_bytes(5000, scale=2**20) == "<0.01 MiB"
  assert memory_budget.format_bytes(0, scale=2**20) == "0.00 MiB"
  assert memory_budget.format_bytes(6 << 20, scale=memory_budget.GiB) == "0.01 GiB"
  assert memory_budget.format_bytes(5000) == "5,000 bytes"
