"""jax_ep/params.py: the canonical <-> deployment layouts on host arrays (no mesh), the
mismatch message, and placing parameters (canonical or another deployment's) on a mesh
through Engine.place_params (restoring checkpoints into deployments: checkpoint_test)."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from configs import deployments, load_model
from jax_ep import params
from jax_ep.config import ConfigError
from jax_ep.engine import Engine
from tests import reference

PRESETS = deployments.PRESETS


def _canonical(num_layers=6):
  rng = np.random.RandomState(0)

  def rand(*shape):
    return rng.rand(*shape).astype(np.float32)

  return {"embed_VxD": rand(5, 4), "final_norm": rand(4), "unembed_DxV": rand(4, 5),
          "layers": {"w_qkv": rand(num_layers, 4, 3), "norm": rand(num_layers, 4)}}


def test_layout_holds_layer_s_times_local_plus_i_and_round_trips():
  canonical = _canonical()
  layout = params.to_layout(canonical, stages=3, local_layers=2)
  assert len(layout["layers"]) == 2
  for i in range(2):
    for s in range(3):  # layers[i][s] is layer s * L_local + i
      np.testing.assert_array_equal(layout["layers"][i]["w_qkv"][s],
                                    canonical["layers"]["w_qkv"][s * 2 + i])
  back = params.to_canonical_fn(6)(layout)
  for a, b in zip(jax.tree.leaves(dict(back)), jax.tree.leaves(canonical), strict=True):
    np.testing.assert_array_equal(a, b)
  # From another deployment's layout (2 stages x 3 local layers), the same canonical.
  other = params.to_layout(canonical, stages=2, local_layers=3)
  assert params.same_shapes(params.to_canonical_fn(6)(other), back)


def test_first_mismatch_names_the_leaf_and_both_shapes():
  want = jax.eval_shape(lambda: _canonical())
  bad = _canonical()
  bad["layers"]["norm"] = np.zeros((6, 8), np.float32)
  assert not params.same_shapes(bad, want)
  assert params.first_mismatch(bad, want) == (
      "['layers']['norm'] is float32[6, 8], the model needs float32[6, 4]")
  bad = _canonical()
  del bad["unembed_DxV"]
  assert params.first_mismatch(bad, want) == "['unembed_DxV'] is missing"


def test_place_params_round_trip_and_wrong_model():
  canonical = reference.of(load_model("tiny")).params
  single = Engine(load_model("tiny"), deployments.SINGLE)
  engine = Engine(single.cfg, PRESETS["proposed_8"])
  placed = engine.place_params(canonical)
  back = single.place_params(placed)  # from another deployment's layout
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(single.place_params(canonical)),
                  strict=True):
    assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(engine.to_canonical(placed)), jax.tree.leaves(canonical),
                  strict=True):
    assert_array_equal(a, b)
  other = dataclasses.replace(single.cfg, num_experts=8)
  with pytest.raises(ConfigError, match=r"w_down_ExFxD.*float32\[4, 16, 128, 64\].*needs "
                                        r"float32\[4, 8, 128, 64\]"):
    Engine(other, PRESETS["proposed_8"]).place_params(placed)
  with pytest.raises(ConfigError, match="w_up_gate_ExDx2F.*is missing"):
    Engine(load_model("tiny_swiglu"), PRESETS["single"]).place_params(canonical)


def test_place_params_takes_a_pure_dict_and_names_what_it_lacks():
  # checkpoint.restore_canonical returns a pure dict of arrays, not the model's State.
  from flax import nnx

  canonical = reference.of(load_model("tiny")).params
  pure = nnx.to_pure_dict(canonical)
  engine = Engine(load_model("tiny"), PRESETS["proposed_8"])
  for a, b in zip(jax.tree.leaves(engine.place_params(pure)),
                  jax.tree.leaves(engine.place_params(canonical)), strict=True):
    assert_array_equal(a, b)
  with pytest.raises(ConfigError, match=re.escape("['embed_VxD'] is missing")):
    engine.place_params({k: v for k, v in pure.items() if k != "embed_VxD"})
  with pytest.raises(ConfigError, match=re.escape("['extra'] is not in the model")):
    engine.place_params({**pure, "extra": pure["embed_VxD"]})
