"""Tests for jax_ep/numerics.py: non-finite weights and token ids are clear errors, and the
layer watch (--check_numerics) names the first layer whose output is not finite, on a
mesh, without changing what the programs compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from configs import deployments, load_model
from jax_ep import decode, numerics
from jax_ep.config import ConfigError
from jax_ep.engine import Engine

DEP = deployments.PRESETS["proposed_8"]  # 4 stages x 2 experts: layer l on stage l
PROMPT, NEW = 3, 3


def _set_layer(params, layer, name, fn):
  """params (deployment layout) with fn applied to `name` of global layer `layer`."""
  stage, local = divmod(layer, len(params["layers"]))

  def edit(path, leaf):
    keys = jax.tree_util.keystr(path)
    if keys.startswith(f"['layers'][{local}]") and name in keys:
      return leaf.at[stage].set(fn(leaf[stage]))
    return leaf

  return jax.tree_util.tree_map_with_path(edit, params)


@functools.cache
def _params():
  return Engine(load_model("tiny"), DEP).init_params(0)


def test_finite_weights_pass_and_a_nan_is_named_on_its_shards():
  params = _params()
  numerics.check_finite(params)
  bad = _set_layer(params, 2, "w_up_ExDxF", lambda w: w.at[1, 3, 5].set(jnp.nan))
  assert bad["layers"][0]["moe"]["w_up_ExDxF"].sharding == \
      params["layers"][0]["moe"]["w_up_ExDxF"].sharding  # checked where it lies
  # Stage 2 holds layer 2 (one layer per stage): index (stage, expert, d, f).
  with pytest.raises(numerics.NumericsError,
                     match=r"layers/0/moe/w_up_ExDxF holds 1 NaN .*first at \(2, 1, 3, 5\)"):
    numerics.check_finite(bad, "weights")
  inf = _set_layer(params, 1, "w_down_ExFxD", lambda w: w.at[0].set(jnp.inf))
  assert numerics.nonfinite_leaves(inf) == [("layers/0/moe/w_down_ExFxD", 128 * 64,
                                             (1, 0, 0, 0))]


@pytest.mark.parametrize("tokens,message", [
    (np.array([[1.0, np.nan, 3.0]]), "not an integer id"),
    (np.array([[1.0, np.inf, 3.0]]), "not an integer id"),
    (np.array([[1.5, 2.0, 3.0]]), "not an integer id"),
    (np.array([[1, 256, 3]]), "outside the vocabulary"),
    (np.array([["a", "b", "c"]]), "must be integer ids"),
])
def test_bad_token_ids_are_refused(tokens, message):
  with pytest.raises(ConfigError, match=message):
    numerics.check_token_ids(tokens, 256)
  assert numerics.check_token_ids(np.array([[1.0, 2.0]]), 256).dtype == np.int32


def test_watch_names_the_first_layer_whose_output_overflows():
  """Finite weights, but layer 2's experts overflow float32: the watch names layer 2 (not
  layer 3, which the infinity flows into). The same engine (one compile) with sound
  weights reports nothing and decodes what an engine without the watch decodes."""
  cfg = load_model("tiny")
  prompts = np.random.default_rng(3).integers(0, cfg.vocab_size, (8, PROMPT))
  huge = _set_layer(_params(), 2, "w_down_ExFxD", lambda w: w * 3e38)
  numerics.check_finite(huge)  # the weights themselves are finite
  watch = numerics.LayerWatch()
  watched = Engine(cfg, DEP, watch=watch)
  decode.generate(watched, huge, prompts, NEW, max_len=PROMPT + NEW)
  with pytest.raises(numerics.NumericsError, match="layer 2 produced") as e:
    watch.check()
  assert "non-finite layers: [2, 3]" in str(e.value)
  watch.reset()
  gen = decode.generate(watched, _params(), prompts, NEW, max_len=PROMPT + NEW)
  watch.check()
  assert watch.calls > 0 and watch.first() is None
  want = decode.generate(Engine(cfg, deployments.SINGLE),
                         Engine(cfg, deployments.SINGLE).place_params(_params()), prompts, NEW,
                         max_len=PROMPT + NEW)
  assert_array_equal(gen.tokens, want.tokens)
