"""Tests for jax_ep/sharding.py: the table of each deployment, applied by
Engine.place_params, leaves each device exactly the shards the deployment promises (the
seed's layouts included, abstractly), and a parameter without a rule is named."""

import jax
import numpy as np
import pytest

from configs import deployments, load_model, seed
from jax_ep import sharding
from jax_ep.config import DeploymentConfig
from jax_ep.engine import Engine
from tests import reference

PRESETS = deployments.PRESETS
MAX_LEN = 8  # KV cache length


def _placed(dep, model="tiny"):
  ref = reference.of(load_model(model))
  engine = Engine(ref.cfg, dep)
  return engine, engine.place_params(ref.params)


def _coords(mesh):
  """Device id -> (stage, expert, tp) position in the mesh."""
  return {d.id: tuple(int(i) for i in idx) for idx, d in np.ndenumerate(mesh.devices)}


def _starts(shard):
  return tuple(s.start or 0 for s in shard.index)


def test_seed_proposed_one_expert_per_device():
  engine, params = _placed(PRESETS["seed_proposed"])  # 4 stages x 16 experts
  cfg, coords = engine.cfg, _coords(engine.mesh)
  d, f, h, k = cfg.model_dim, cfg.mlp_dim, cfg.num_heads, cfg.head_dim
  (layer,) = params["layers"]  # one layer per stage: [stages, ...] arrays
  moe, attn = layer["moe"], layer["attn"]
  for name in ("w_up_ExDxF", "w_down_ExFxD"):
    shards = moe[name][...].addressable_shards
    assert len(shards) == 64
    for shard in shards:
      want = (1, 1, d, f) if name == "w_up_ExDxF" else (1, 1, f, d)
      assert shard.data.shape == want
      stage, expert, _ = coords[shard.device.id]
      assert _starts(shard)[:2] == (stage, expert)  # layer `stage`, expert `expert`
  for shard in attn["wq_DxHxDh"][...].addressable_shards:
    assert shard.data.shape == (1, d, h, k)  # every head of its stage's layer: no tp
  for shard in moe["w_router_DxE"][...].addressable_shards:
    assert shard.data.shape == (1, d, cfg.num_experts)
  (cache_k,) = engine.cache_shardings.k
  assert cache_k.shard_shape((4, 64, h, MAX_LEN, k)) == (1, 4, h, MAX_LEN, k)
  # The unembedding: 256 / 16 vocabulary columns on each device of a stage.
  for shard in params["unembed_DxV"][...].addressable_shards:
    stage, expert, _ = coords[shard.device.id]
    assert shard.data.shape == (d, cfg.vocab_size // 16)
    assert _starts(shard)[1] == expert * cfg.vocab_size // 16


def test_seed_baseline_four_experts_and_an_eighth_of_the_heads_per_device():
  engine, params = _placed(PRESETS["seed_baseline"])  # 2 stages x tp 8
  cfg, coords = engine.cfg, _coords(engine.mesh)
  d, f, k = cfg.model_dim, cfg.mlp_dim, cfg.head_dim
  heads = cfg.num_heads // 8
  # Two local layers per stage (layer 2 * stage + i in params["layers"][i]), each
  # P(stage, (expert, tp), ...) on (2, 1, 8): 2 layers x 2 experts = 4 experts per device.
  assert len(params["layers"]) == 2
  for layer in params["layers"]:
    shards = layer["moe"]["w_up_ExDxF"][...].addressable_shards
    assert len(shards) == 16
    for shard in shards:
      assert shard.data.shape == (1, 2, d, f)
      stage, _, tp = coords[shard.device.id]
      assert _starts(shard)[:2] == (stage, 2 * tp)
    for name, shape in (("wq_DxHxDh", (1, d, heads, k)), ("wo_HxDhxD", (1, heads, k, d))):
      for shard in layer["attn"][name][...].addressable_shards:
        assert shard.data.shape == shape
        stage, _, tp = coords[shard.device.id]
        head_axis = 2 if name == "wq_DxHxDh" else 1
        assert _starts(shard)[0] == stage and _starts(shard)[head_axis] == heads * tp
  for cache_k in engine.cache_shardings.k:
    assert cache_k.shard_shape((2, 8, 8, MAX_LEN, k)) == (1, 8, 1, MAX_LEN, k)
  for shard in params["unembed_DxV"][...].addressable_shards:  # vocabulary over tp
    assert shard.data.shape == (d, cfg.vocab_size // 8)


def test_seed_proposed_e64_every_layer_one_expert_of_each():
  engine, params = _placed(PRESETS["seed_proposed_e64"], "tiny_e64")
  cfg = engine.cfg
  assert len(params["layers"]) == 4  # one stage: every layer on every device
  for layer in params["layers"]:
    for shard in layer["moe"]["w_up_ExDxF"][...].addressable_shards:
      assert shard.data.shape == (1, 1, cfg.model_dim, cfg.mlp_dim)


def test_tp_placement_splits_each_expert_mlp():
  engine, params = _placed(DeploymentConfig(kind="proposed", stages=2, expert=4, tp=2,
                                            placement="tp", microbatches=2))
  cfg, coords = engine.cfg, _coords(engine.mesh)
  d, f = cfg.model_dim, cfg.mlp_dim
  for name, shape, f_axis in (("w_up_ExDxF", (1, 4, d, f // 2), 3),
                              ("w_down_ExFxD", (1, 4, f // 2, d), 2)):
    for layer in params["layers"]:  # two local layers per stage
      for shard in layer["moe"][name][...].addressable_shards:
        assert shard.data.shape == shape
        stage, expert, tp = coords[shard.device.id]
        starts = _starts(shard)
        assert (starts[0], starts[1], starts[f_axis]) == (stage, 4 * expert, f // 2 * tp)


def test_seed_model_on_seed_meshes_without_allocating():
  # The Engine builds its shardings from jax.eval_shape: nothing of the 72 GB is allocated.
  cfg = seed.get_config()
  for dep, expert_bytes in ((PRESETS["seed_proposed"], 2 * 8192 * 32768 * 2),
                            (PRESETS["seed_baseline"], 4 * 2 * 8192 * 32768 * 2)):
    engine = Engine(cfg, dep)
    per_device = 0
    leaves = jax.tree_util.tree_leaves_with_path(engine.abstract_params)
    shardings = jax.tree.leaves(engine.param_shardings)
    for (path, leaf), named in zip(leaves, shardings, strict=True):
      if "w_up" in jax.tree_util.keystr(path) or "w_down" in jax.tree_util.keystr(path):
        per_device += np.prod(named.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    assert per_device == expert_bytes  # 1 expert = 1.07 GB; the baseline's 4 = 4.3 GB


def test_a_parameter_without_a_rule_is_named():
  table = sharding.table_for(PRESETS["proposed_8"])
  state = {"layers": {"attn": {"wq_DxHxDh": jax.ShapeDtypeStruct((4, 2, 2, 2), np.float32),
                               "bias_D": jax.ShapeDtypeStruct((4, 2), np.float32)}}}
  with pytest.raises(KeyError, match="no sharding rule for parameter layers/attn/bias_D"):
    sharding.param_specs(state, table)
  del state["layers"]["attn"]["bias_D"]
  assert sharding.param_specs(state, table)["layers"]["attn"]["wq_DxHxDh"] == \
      table.attn_in_LxDxHxDh
