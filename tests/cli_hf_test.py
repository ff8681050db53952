"""Tests for jax_ep/cli/hf.py: `jax-ep import-hf` then `jax-ep export-hf`, as a user runs
them, give back the Mixtral directory's tensors; a missing source is a clear error."""

import os

import numpy as np

from tests import cli_runner
from tests.hf_test import CONFIG, _hf_tensors, _read, _write


def test_import_then_export_round_trips_the_tensors(tmp_path):
  tensors = _hf_tensors(CONFIG)
  src = _write(str(tmp_path / "hf"), CONFIG, tensors, shards=2)
  ckpt, dst = str(tmp_path / "ckpt"), str(tmp_path / "out")
  imported, exported, missing, *orphans = cli_runner.run_cases([
      ["import-hf", f"--src={src}", f"--workdir={ckpt}"],
      ["export-hf", f"--checkpoint={ckpt}", f"--dst={dst}"],
      ["import-hf", f"--src={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'c2'}"],
      # A missing parent directory is a typo more often than a wish: refused by both.
      ["export-hf", f"--checkpoint={ckpt}", f"--dst={tmp_path / 'typo' / 'out'}"],
      ["import-hf", f"--src={src}", f"--workdir={tmp_path / 'typo' / 'ckpt'}"]])
  for r, flag in zip(orphans, ["--dst", "--workdir"], strict=True):
    assert r["rc"] == 2, r["stderr"][-2000:]
    assert f"{flag}={tmp_path / 'typo'}" in r["stderr"]
    assert f"its directory {tmp_path / 'typo'} does not exist" in r["stderr"]
  assert not os.path.exists(tmp_path / "typo")
  assert imported["rc"] == 0, imported["stderr"][-2000:]
  assert "2 layers x 4 experts (top-2)" in imported["stdout"]
  assert exported["rc"] == 0, exported["stderr"][-2000:]
  assert "wrote" in exported["stdout"]
  got = _read(dst)
  assert sorted(got) == sorted(tensors)
  for name, want in tensors.items():
    np.testing.assert_array_equal(got[name], want)
  assert missing["rc"] != 0 and "nowhere" in missing["stderr"]
  assert not os.path.exists(tmp_path / "c2")
