"""jax_ep/params.py: the canonical <-> deployment layouts on host arrays (no mesh), and
the mismatch message; Engine.place_params on meshes is in engine_test and checkpoint_test."""

import jax
import numpy as np

from jax_ep import params


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
