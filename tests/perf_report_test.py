"""jax_ep/perf/report.py on a committed GPU result (benchmarks/results/): its markdown, the
efficiency fitted to its runs and the predictions made with it, its plot."""

import json
import os

from jax_ep.perf import report

RESULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "results", "h200x1_ef47331", "seed_table.json")


def _result():
  with open(RESULT) as f:
    return json.load(f)


def test_markdown_and_calibration_of_a_committed_result(tmp_path):
  result = _result()
  md = report.markdown(result)
  assert md.startswith("# jax_ep decode benchmark, 2026-12-01")
  assert "| Method | GPUs | Per-GPU deployment | batch | TPS | TPOT ms" in md
  assert "| Single device | 1 |" in md and "30.447" in md  # the measured TPOT
  summary = report.calibration_summary(result["runs"])
  assert set(summary) == {"efficiency", "validation", "seed_table", "extrapolated"}
  assert 0 < summary["efficiency"]["memory"] <= 1
  assert len(summary["validation"]) == len(result["runs"])
  assert set(summary["seed_table"]) == {"h100", "h200"}
  assert report.plot(result, str(tmp_path / "table.png"))
  assert (tmp_path / "table.png").stat().st_size > 0
