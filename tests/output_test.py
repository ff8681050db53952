"""Tests for jax_ep/output.py: an output path is refused, naming the flag, before any
work; JSON is written atomically, with the usual file mode, and a failed write leaves
the old file and no temporary behind."""

import json
import os

import pytest

from jax_ep import output
from jax_ep.config import ConfigError


def test_output_path_checks(tmp_path):
  output.check_output_path(None)  # no output asked for
  output.check_output_path(str(tmp_path / "out.json"))
  assert os.listdir(tmp_path) == []  # the probe file is gone
  with pytest.raises(ConfigError, match="--output= is empty"):
    output.check_output_path("  ")
  with pytest.raises(ConfigError, match="--out_dir=.* is a directory"):
    output.check_output_path(str(tmp_path), "--out_dir")
  with pytest.raises(ConfigError, match="missing does not exist; create it first"):
    output.check_output_path(str(tmp_path / "missing" / "out.json"))
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="file is not a directory"):
    output.check_output_path(str(tmp_path / "file" / "out.json"))


def test_output_dir_checks(tmp_path):
  output.check_output_dir(None, "--profile_dir")
  output.check_output_dir(str(tmp_path), "--profile_dir")  # exists
  output.check_output_dir(str(tmp_path / "new" / "deeper"), "--profile_dir")  # made later
  assert os.listdir(tmp_path) == []  # nothing made now, the probe gone
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="--profile_dir=.*file is a file, not a directory"):
    output.check_output_dir(str(tmp_path / "file"), "--profile_dir")
  with pytest.raises(ConfigError, match="file is a file, so the directory cannot be created"):
    output.check_output_dir(str(tmp_path / "file" / "trace"), "--out_dir")
  with pytest.raises(ConfigError, match="--out_dir= is empty"):
    output.check_output_dir("", "--out_dir")


def test_write_json_atomically(tmp_path):
  path = str(tmp_path / "out.json")
  output.write_json(path, {"tokens": [[1, 2]]})
  with open(path) as f:
    assert json.load(f) == {"tokens": [[1, 2]]}
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
  with pytest.raises(TypeError):
    output.write_json(path, {"bad": object()})  # fails halfway through the dump
  with open(path) as f:
    assert json.load(f) == {"tokens": [[1, 2]]}  # the old file stands
  assert os.listdir(tmp_path) == ["out.json"]
