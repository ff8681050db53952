"""jax_ep/perf/tables.py: the seed's table predicted (golden numbers), the scaling curves'
deployments, the report and its plot."""

import math

import pytest

from configs import deployments, load_model
from jax_ep.perf import hardware, tables

SEED = load_model("seed")


def test_seed_table_golden():
  # Golden numbers of the uncalibrated model (H100 datasheet, batch 1024, context 128).
  # Update them only with a deliberate change to a term of the model, and say which.
  # (Last: the decode ring, worst-case exchange buffers, the grouped kernel's rows and the
  # vocabulary-sharded head.)
  rows = {r["method"]: r["prediction"] for r in tables.seed_rows(hardware.H100_SXM, what_if=False)}
  assert rows["Baseline (TP=8, PP=2), one group"].tpot_ms == pytest.approx(5.97, abs=0.01)
  assert rows["Proposed cross-node EP, one group"].tpot_ms == pytest.approx(5.77, abs=0.01)
  assert rows["Proposed, ring of 4 groups of 256"].tpot_ms == pytest.approx(3.33, abs=0.01)
  ring = rows["Proposed, ring of 4 groups of 1024"]
  assert ring.tpot_ms == pytest.approx(5.77, abs=0.01) and ring.batch == 4096


def test_scaling_families_are_valid_deployments():
  curves = tables.scaling_curve(SEED, hardware.H100_SXM)
  for label, pts in curves.items():
    assert [p["gpus"] for p in pts] == [1, 2, 4, 8, 16, 32, 64, 128, 256], label
  assert tables.ep_deployment(SEED, 64) == deployments.SEED_PROPOSED
  assert tables.ep_deployment(SEED, 16, order="experts_first").mesh_shape == (1, 16, 1)
  assert tables.ep_deployment(SEED, 256).mesh_shape == (4, 16, 4)
  assert math.isfinite(curves["experts first, G = S"][4]["tps"])


def test_report_writes_plot(tmp_path):
  out = tables.report("h100", plot=str(tmp_path / "scaling.png"))
  assert "120,000" in out and "450,000" in out and "Proposed cross-node EP" in out
  assert (tmp_path / "scaling.png").stat().st_size > 0


def test_rows_at_another_batch_name_their_groups_and_drop_the_seeds_figures():
  rows = tables.seed_rows(hardware.H100_SXM, batch=256)
  names = [r["method"] for r in rows]
  assert "Proposed, ring of 4 groups of 64" in names
  assert "Proposed, ring of 4 groups of 256" in names
  assert "  what if: proposed, 8 groups of 256" in names
  # The seed measured batch 1024: its figures are not set beside another batch's.
  assert all(r["seed_tps"] is None for r in rows)
  assert {r["method"]: r["prediction"].batch for r in rows}[
      "Proposed, ring of 4 groups of 64"] == 256


def test_a_batch_some_row_cannot_split_names_the_row_and_what_every_row_takes():
  from jax_ep.config import ConfigError

  with pytest.raises(ConfigError, match=r"row 'Baseline \(TP=8, PP=2\), one group'; every row "
                                        r"of the table takes a --batch that is a multiple of 64"):
    tables.seed_rows(batch=3)
  assert len(tables.seed_rows(batch=64)) > 4  # the least it names: every row runs
  with pytest.raises(ConfigError, match="multiple of 64"):
    tables.seed_rows(batch=32)
