"""The GPU's clocks and power in a bench run's synced and back-to-back decode windows.

`h200_x4.sh clocks` runs `jax-ep bench` with each output line stamped with the local
wall time as nvidia-smi writes it (`YYYY/MM/DD HH:MM:SS.mmm line`) beside `nvidia-smi
--query-gpu=timestamp,clocks.sm,power.draw,utilization.gpu,
clocks_event_reasons.sw_power_cap --format=csv,noheader -lms 100`. generate logs
"decode call c/N" four times. Calls 2..S+1 (S: warm-up plus synced steps) are each
synced before the next, so two of their stamps bound a synced window; later calls are
dispatched ahead of the GPU, so the back-to-back window runs from the first of their
stamps (the GPU is past the synced phase by then) to the next line after the decode,
which generate prints once the last step is done. This reads both files and reports
each window's samples: mean SM clock (MHz), power (W), utilization, and the share of
samples with the software power cap active.

  python3 benchmarks/clock_windows.py LOG CSV S
"""

from __future__ import annotations

import datetime
import json
import re
import sys

_CALL = re.compile(r"decode call (\d+)/(\d+)")
_FORMAT = "%Y/%m/%d %H:%M:%S.%f"


def _time(text: str) -> float:
  return datetime.datetime.strptime(text.strip(), _FORMAT).timestamp()


def stamped_lines(log_lines: list[str]) -> list[tuple[float, int | None, str]]:
  """(time, decode call c or None, text) of each stamped line; others left out."""
  out = []
  for line in log_lines:
    day, clock, text = (line.split(" ", 2) + ["", ""])[:3]
    try:
      t = _time(f"{day} {clock}")
    except ValueError:
      continue
    m = _CALL.search(text)
    out.append((t, int(m.group(1)) if m else None, text))
  return out


def samples(csv_lines: list[str]) -> list[tuple[float, float, float, float, bool]]:
  """(time, SM MHz, W, utilization %, power cap active) of nvidia-smi's rows; rows it
  could not read (a header, "[N/A]") are left out."""
  out = []
  for line in csv_lines:
    parts = [p.strip() for p in line.split(",")]
    if len(parts) < 5:
      continue
    try:
      t = _time(parts[0])
      mhz, watts, util = (float(p.split()[0]) for p in parts[1:4])
    except (ValueError, IndexError):
      continue
    out.append((t, mhz, watts, util, parts[4] == "Active"))
  return out


def windows(lines, rows, synced: int) -> dict[str, dict | None]:
  """The synced and back-to-back windows (see the module docstring) and the means of
  the samples in each; None for a phase whose stamps do not bound one."""
  calls = [(t, c) for t, c, _ in lines if c is not None]
  in_synced = [t for t, c in calls if 2 <= c <= synced + 1]
  first_b2b = next((t for t, c in calls if c >= synced + 2), None)
  after = None
  if first_b2b is not None:
    last_call = max(t for t, _ in calls)
    after = next((t for t, c, _ in lines if c is None and t >= last_call), None)
  bounds = {"synced": (in_synced[0], in_synced[-1]) if len(in_synced) >= 2 else None,
            "back_to_back": (first_b2b, after) if after is not None else None}
  out = {}
  for name, span in bounds.items():
    if span is None:
      out[name] = None
      continue
    picked = [r for r in rows if span[0] <= r[0] <= span[1]]
    n = len(picked)
    out[name] = {"start": span[0], "end": span[1], "samples": n, **({} if not n else {
        "sm_mhz": sum(r[1] for r in picked) / n, "watts": sum(r[2] for r in picked) / n,
        "util": sum(r[3] for r in picked) / n,
        "power_capped": sum(r[4] for r in picked) / n})}
  return out


def main(log_path: str, csv_path: str, synced: int) -> None:
  with open(log_path) as f, open(csv_path) as g:
    result = windows(stamped_lines(f.read().splitlines()), samples(g.read().splitlines()),
                     synced)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
