"""Tests for benchmarks/clock_windows.py: the phases' windows from stamped bench lines."""

import pytest

from benchmarks import clock_windows as cw

LOG = """2026/12/02 10:00:00.000 compiling prefill and decode ...
2026/12/02 10:00:10.000   decode call 35/142
2026/12/02 10:00:12.000   decode call 70/142
2026/12/02 10:00:12.100   decode call 105/142
2026/12/02 10:00:12.200   decode call 140/142
2026/12/02 10:00:15.000   single: TPOT 42.0 ms back to back
not a stamped line""".splitlines()


def _row(second, mhz, watts, capped):
  return (f"2026/12/02 10:00:{second:06.3f}, {mhz} MHz, {watts} W, 100 %, "
          f"{'Active' if capped else 'Not Active'}")


def test_windows_split_the_samples_by_phase():
  csv = ["timestamp, clocks.current.sm [MHz], ...",  # a header: left out
         _row(5, 1980, 100, False),  # compiling: in no window
         _row(11, 1900, 500, False), _row(11.5, 1700, 600, True),  # synced
         _row(13, 1400, 690, True), _row(14, 1300, 700, True),  # back to back
         "2026/12/02 10:00:14.500, [N/A], 700 W, 100 %, Active"]  # unreadable: left out
  got = cw.windows(cw.stamped_lines(LOG), cw.samples(csv), synced=81)
  assert got["synced"]["samples"] == 2 and got["back_to_back"]["samples"] == 2
  assert got["synced"]["sm_mhz"] == pytest.approx(1800)
  assert got["synced"]["power_capped"] == pytest.approx(0.5)
  assert got["back_to_back"]["watts"] == pytest.approx(695)
  # The back-to-back window ends at the line printed after the decode, not at call 140's
  # dispatch.
  assert got["back_to_back"]["end"] - got["back_to_back"]["start"] == pytest.approx(2.9)


def test_a_phase_without_bounding_stamps_has_no_window():
  got = cw.windows(cw.stamped_lines(LOG[:2] + LOG[4:]), [], synced=81)
  assert got["synced"] is None  # one synced stamp bounds nothing
  assert got["back_to_back"]["samples"] == 0
  assert cw.windows(cw.stamped_lines(LOG[:3]), [], synced=81)["back_to_back"] is None
