"""Tests for jax_ep/presets.py: jax_ep's presets are `configs` in a checkout, and a
`configs` package of a user's own, first on the path, neither hides them nor is replaced."""

import dataclasses
import os
import subprocess
import sys

import configs
from jax_ep import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_in_a_checkout_the_presets_are_configs():
  assert presets.DISPLACED is None
  assert presets.deployments is configs.deployments
  assert presets.load_model("tiny") == configs.load_model("tiny")
  assert presets.model_names() == configs.model_names()


def test_a_users_own_configs_package_stays_theirs(tmp_path):
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "__init__.py").write_text("THEIRS = True\n")
  script = ("import configs\n"
            "from jax_ep.perf import plan\n"  # imports the presets
            "from jax_ep import presets\n"
            "assert configs.THEIRS and not hasattr(configs, 'load_model')\n"
            "assert presets.load_model('seed_swiglu').num_layers == 4\n"  # from . import seed
            "assert 'seed_proposed' in presets.deployments.PRESETS\n"
            "print(presets.DISPLACED)\n")
  env = {**os.environ, "PYTHONPATH": ROOT}  # jax_ep from this checkout; the cwd comes first
  proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == str(tmp_path / "configs" / "__init__.py")


def test_names_of_finds_the_presets_of_a_config():
  swiglu = presets.load_model("tiny_swiglu")
  assert presets.names_of(swiglu) == ["tiny_swiglu"]
  assert presets.names_of(dataclasses.replace(swiglu, vocab_size=swiglu.vocab_size + 1)) == []
  # A checkpoint does not fix the KV cache's length: still the preset's model.
  assert presets.names_of(dataclasses.replace(swiglu, max_seq_len=swiglu.max_seq_len * 2)) == [
      "tiny_swiglu"]


def test_an_install_holds_every_package_and_the_presets_under_their_own_name():
  # pyproject.toml lists the packages (setuptools finds none of them itself): every one of
  # jax_ep's, and configs/ as jax_ep_presets, not as a top-level `configs` of its own.
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    setup = tomllib.load(f)["tool"]["setuptools"]
  found = sorted(os.path.relpath(d, ROOT).replace(os.sep, ".")
                 for d, _, files in os.walk(os.path.join(ROOT, "jax_ep")) if "__init__.py" in files)
  assert sorted(setup["packages"]) == sorted([*found, presets.PRIVATE_NAME])
  assert setup["package-dir"] == {presets.PRIVATE_NAME: "configs"}
