"""Tests for jax_ep/config.py, the presets in configs/ and the mesh check in mesh.py."""

import dataclasses
import re

import jax
import pytest

from configs import deployments, load_model, model_names, seed, seed_e64, tiny, tiny_e64
from jax_ep import mesh
from jax_ep.config import ConfigError, DeploymentConfig, ModelConfig

TINY = tiny.get_config()


def _raises(field_value: str):
  """pytest.raises(ConfigError) whose message names `field=value` (or similar)."""
  return pytest.raises(ConfigError, match=re.escape(field_value))


# --- ModelConfig --------------------------------------------------------------------------


def test_seed_model_is_valid_and_matches_the_paper():
  cfg = seed.get_config()
  assert (cfg.num_layers, cfg.num_experts, cfg.top_k) == (4, 16, 2)
  assert (cfg.num_heads, cfg.head_dim, cfg.model_dim, cfg.mlp_dim) == (16, 512, 8192, 32768)
  assert (cfg.mlp_kind, cfg.dtype, cfg.bytes_per_param, cfg.expert_mats) == ("gelu", "float16",
                                                                           2, 2)


def test_model_dim_must_equal_heads_times_head_dim():
  with _raises("model_dim=100") as err:
    dataclasses.replace(TINY, model_dim=100)
  assert "8 x 8 = 64" in str(err.value)


def test_top_k_larger_than_num_experts():
  with _raises("top_k=17"):
    dataclasses.replace(TINY, top_k=17)
  assert dataclasses.replace(TINY, top_k=16).top_k == 16  # the boundary is allowed


def test_unknown_dtype():
  with _raises("dtype='float64'") as err:
    dataclasses.replace(TINY, dtype="float64")
  assert "bfloat16" in str(err.value)  # says what to use instead


def test_unknown_mlp_kind():
  with _raises("mlp_kind='relu'") as err:
    dataclasses.replace(TINY, mlp_kind="relu")
  assert "swiglu" in str(err.value)


@pytest.mark.parametrize("field,value", [("num_layers", 0), ("num_experts", -1), ("top_k", 0),
                                         ("vocab_size", 2.5), ("max_seq_len", True)])
def test_sizes_must_be_positive_integers(field, value):
  with _raises(f"{field}={value!r}"):
    dataclasses.replace(TINY, **{field: value})


def test_odd_head_dim_is_rejected_for_rope():
  with _raises("head_dim=7"):
    ModelConfig(num_heads=8, head_dim=7, model_dim=56)


def test_swiglu_has_three_matrices_per_expert():
  assert dataclasses.replace(TINY, mlp_kind="swiglu").expert_mats == 3
  assert dataclasses.replace(TINY, dtype="bfloat16").bytes_per_param == 2
  assert TINY.bytes_per_param == 4


def test_configs_are_frozen_and_hashable():
  with pytest.raises(dataclasses.FrozenInstanceError):
    TINY.num_layers = 8  # type: ignore[misc]
  assert hash(TINY) == hash(tiny.get_config())  # usable as a static jit argument
  assert hash(deployments.SEED_PROPOSED) == hash(DeploymentConfig("proposed", 4, 16,
                                                                   microbatches=4))
  # A name is for messages: the same layout under another name is the same deployment.
  named = dataclasses.replace(deployments.SEED_PROPOSED, name="seed_proposed --tp=1")
  assert named == deployments.SEED_PROPOSED and hash(named) == hash(deployments.SEED_PROPOSED)
  assert named.describe().startswith(
      "seed_proposed --tp=1 (pipeline x expert parallel): stage 4 x expert 16")
  assert deployments.SEED_PROPOSED.describe().startswith(
      "proposed (pipeline x expert parallel): stage 4")
  # The words follow the shape, whatever the kind's family.
  assert deployments.mesh("mesh:1x1x8").describe().startswith("proposed (tensor parallel)")
  assert deployments.mesh("mesh:2x1x4").describe().startswith(
      "proposed (pipeline x tensor parallel)")
  assert deployments.SINGLE.describe().startswith("single (one device)")


# --- DeploymentConfig ---------------------------------------------------------------------


def test_unknown_kind_and_placement():
  with _raises("kind='hybrid'"):
    DeploymentConfig(kind="hybrid")
  with _raises("placement='dp'"):
    DeploymentConfig(kind="proposed", placement="dp")


@pytest.mark.parametrize("field", ["stages", "expert", "tp", "microbatches"])
def test_mesh_sizes_must_be_positive(field):
  with _raises(f"{field}=0"):
    DeploymentConfig(**{field: 0})


def test_decode_groups_prefill_chunk_and_kernels():
  assert DeploymentConfig(stages=4).groups == 4  # 0: one group per stage
  assert DeploymentConfig(stages=4, decode_groups=1).ring_period == 4
  assert DeploymentConfig(stages=2, decode_groups=6).ring_period == 6
  for field in ("decode_groups", "prefill_chunk"):
    with _raises(f"{field}=-1"):
      DeploymentConfig(**{field: -1})
  with _raises("kernels='cuda'"):
    DeploymentConfig(kernels="cuda")


def test_head_gather_is_for_a_one_device_share_only():
  assert DeploymentConfig(head_gather=16).head_gather == 16
  with _raises("head_gather=0 must be a positive integer"):
    DeploymentConfig(head_gather=0)
  with _raises("mesh of 4 devices gathers its rows for the head itself"):
    DeploymentConfig(kind="proposed", expert=4, head_gather=4)


def test_expert_blocks_are_checked_at_construction_and_against_the_model():
  with _raises("expert_blocks='up.tail=16': 'up.tail=16': 'tail' is not a Blocks field"):
    DeploymentConfig(expert_blocks="up.tail=16")
  with _raises("expert_blocks=16 must be a string"):
    DeploymentConfig(expert_blocks=16)
  dep = DeploymentConfig(expert_blocks="block_m=16,up.tail_m=16")  # parses; cannot tile
  with _raises("the up product's tail_m=16 must be 0 or a power of two below block_m=16"):
    dep.check_model(TINY)
  DeploymentConfig(expert_blocks="block_m=32,tail_m=16").check_model(TINY)
  with _raises("the down product's tail_m=64 (its default) must be 0 or a power of two below "
               "block_m=32"):  # a default that no longer fits is named as one
    DeploymentConfig(expert_blocks="block_m=32,up.tail_m=16").check_model(TINY)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan"), "2"])
def test_capacity_factor_must_be_positive_and_finite(value):
  with _raises(f"capacity_factor={value!r}"):
    DeploymentConfig(capacity_factor=value)


def test_dropless_must_be_a_bool():
  with _raises("dropless='no'"):
    DeploymentConfig(dropless="no")


@pytest.mark.parametrize("field,value", [("rope_theta", 0.0), ("rope_theta", float("inf")),
                                         ("norm_eps", -1e-6)])
def test_rope_theta_and_norm_eps(field, value):
  with _raises(f"{field}={value}"):
    dataclasses.replace(TINY, **{field: value})


def test_layers_not_divisible_by_stages():
  with _raises("num_layers=4 is not divisible by stages=3"):
    DeploymentConfig(kind="proposed", stages=3).check_model(TINY)


def test_experts_not_divisible_by_expert_shards():
  # placement "ep" spreads experts over expert x tp: 16 over 3 x 2 = 6 devices.
  with _raises("num_experts=16") as err:
    DeploymentConfig(kind="baseline", expert=3, tp=2).check_model(TINY)
  assert "(6 devices)" in str(err.value) and "expert x tp" in str(err.value)
  # placement "tp" would spread them over expert=3 alone: no better, so not offered.
  assert str(err.value).endswith("so that expert x tp divides 16 (1, 2, 4, 8 or 16).")
  with _raises("expert x tp axes (32 devices)") as err:
    heads_16 = dataclasses.replace(TINY, num_heads=16, head_dim=4)
    DeploymentConfig(kind="proposed", expert=2, tp=16).check_model(heads_16)
  assert "or DeploymentConfig.placement=tp to split each expert's MLP over tp" in str(err.value)
  # placement "tp" spreads them over expert only: 16 over 32.
  with _raises("num_experts=16") as err:
    DeploymentConfig(kind="proposed", expert=32, tp=2, placement="tp").check_model(TINY)
  assert "(32 devices)" in str(err.value)
  # The same experts fit 8 x 2 with placement "tp" but not with "ep" (16 | 16 but 16 / 32).
  DeploymentConfig(kind="proposed", expert=16, tp=2, placement="tp").check_model(TINY)
  with _raises("num_experts=16"):
    DeploymentConfig(kind="proposed", expert=16, tp=2, placement="ep").check_model(TINY)


def test_heads_not_divisible_by_tp():
  cfg = dataclasses.replace(TINY, num_heads=4, head_dim=16)
  with _raises("num_heads=4 is not divisible by tp=8"):
    DeploymentConfig(kind="baseline", tp=8, placement="tp").check_model(cfg)
  # tp's own constraint comes first: 16 experts over 2 x 3 would not divide either.
  with _raises("num_heads=8 is not divisible by tp=3"):
    DeploymentConfig(kind="proposed", expert=2, tp=3).check_model(TINY)


def test_mlp_dim_not_divisible_by_tp_with_tp_placement():
  cfg = dataclasses.replace(TINY, mlp_dim=100)
  with _raises("mlp_dim=100"):
    DeploymentConfig(kind="proposed", tp=8, placement="tp").check_model(cfg)
  DeploymentConfig(kind="baseline", tp=8, placement="ep").check_model(cfg)  # F is not split
  with _raises("vocab_size=250 is not divisible by expert x tp = 8"):
    DeploymentConfig(kind="proposed", expert=4, tp=2).check_model(
        dataclasses.replace(TINY, vocab_size=250))


def test_check_batch():
  dep = DeploymentConfig(kind="proposed", stages=2, expert=4, microbatches=2)
  dep.check_batch(8)
  dep.check_batch(16)
  with _raises("batch=0"):
    dep.check_batch(0)
  with _raises("batch=12 is not divisible by expert axis x microbatches = 4 x 2 = 8"):
    dep.check_batch(12)
  with _raises("batch=8 is not divisible by expert axis x decode groups = 4 x 4 = 16; each "
               "device's share of each decode group must be whole. Use a batch that is a "
               "multiple of 16"):
    dataclasses.replace(dep, decode_groups=4).check_batch(8)
  with _raises("batch=4"):
    dep.check_batch(4)
  # 3 groups and 2 micro-batches: the hint names their least common multiple, 4 x 6.
  with _raises("multiple of 24"):
    dataclasses.replace(dep, decode_groups=3).check_batch(8)
  with _raises("batch=8.0"):
    dep.check_batch(8.0)


def test_derived_sizes():
  dep = DeploymentConfig(kind="proposed", stages=2, expert=4, tp=2, placement="tp")
  assert (dep.num_devices, dep.mesh_shape, dep.expert_shards) == (16, (2, 4, 2), 4)
  assert dataclasses.replace(dep, placement="ep").expert_shards == 8
  assert "16 devices" in dep.describe()


# --- mesh ---------------------------------------------------------------------------------


def test_mesh_needing_more_devices_than_exist():
  dep = DeploymentConfig(kind="proposed", stages=4, expert=16, tp=2, placement="tp")
  with _raises("needs 128 devices but 64 are available"):
    mesh.make_mesh(dep)
  with _raises("needs 8 devices but 4 are available"):
    mesh.make_mesh(DeploymentConfig(kind="proposed", stages=2, expert=4), jax.devices()[:4])


def test_mesh_axes_tp_fastest():
  m = mesh.make_mesh(DeploymentConfig(kind="proposed", stages=2, expert=4, tp=2,
                                      placement="tp"))
  assert dict(m.shape) == {"stage": 2, "expert": 4, "tp": 2}
  ids = [[[d.id for d in row] for row in stage] for stage in m.devices]
  assert ids[0][0] == [0, 1] and ids[0][1] == [2, 3] and ids[1][0] == [8, 9]


# --- presets ------------------------------------------------------------------------------


def test_model_presets_resolve():
  assert set(model_names()) >= {"seed", "seed_e64", "tiny", "tiny_e64"}
  assert load_model("tiny") == TINY
  assert seed_e64.get_config().num_experts == 64
  assert tiny_e64.get_config() == dataclasses.replace(TINY, num_experts=64)
  assert TINY.dtype == "float32"
  with _raises("--config='huge'"):
    load_model("huge")


@pytest.mark.parametrize("name,devices,shape", [
    ("proposed", 64, (4, 16, 1)), ("proposed", 8, (4, 2, 1)), ("proposed", 16, (4, 4, 1)),
    ("proposed", 128, (4, 16, 2)), ("baseline", 16, (2, 1, 8)), ("baseline", 2, (2, 1, 1)),
    ("baseline", 8, (2, 1, 4)),
])
def test_resolve_by_kind_and_device_count(name, devices, shape):
  dep = deployments.resolve(name, devices)
  assert dep.kind == name and dep.mesh_shape == shape and dep.num_devices == devices


def test_resolve_by_preset_name():
  assert deployments.resolve("seed_proposed", 1) is deployments.SEED_PROPOSED
  assert deployments.resolve("single", 64) == DeploymentConfig()
  assert deployments.resolve("seed_proposed_e64", 0).mesh_shape == (1, 64, 1)


def test_resolve_mesh_shape():
  dep = deployments.resolve("mesh:2x4x2/3", 16)
  assert dep.mesh_shape == (2, 4, 2) and dep.placement == "tp" and dep.groups == 3
  assert deployments.resolve("mesh:1x1x4", 4).placement == "ep"  # tp over whole experts
  for bad in ("mesh:2x2", "mesh:1x0x1", "mesh:axbxc"):
    with _raises("write mesh:SxExT with whole numbers"):
      deployments.resolve(bad, 8)


def test_resolve_unknown():
  with _raises("no proposed preset for 32 devices") as err:
    deployments.resolve("proposed", 32)
  assert re.search(r"presets exist for \[.*2, 4, 8, 16, 64, 128\]", str(err.value))
  with _raises("no baseline preset for 3 devices"):
    deployments.resolve("baseline", 3)
  with _raises("--deployment='hybrid'"):
    deployments.resolve("hybrid", 8)


def test_seed_presets_fit_the_seed_models():
  for name in ("seed_baseline", "seed_proposed", "seed_proposed_tp2"):
    deployments.PRESETS[name].check_model(seed.get_config())
  deployments.SEED_PROPOSED_E64.check_model(seed_e64.get_config())
  # Every preset fits the tiny model, so every one of them can be tested on CPU.
  for name, dep in deployments.PRESETS.items():
    if name != "seed_proposed_e64":
      dep.check_model(TINY)
  deployments.SEED_PROPOSED_E64.check_model(tiny_e64.get_config())
  with _raises("num_experts=16"):  # 16 experts cannot give each of 64 devices one
    deployments.SEED_PROPOSED_E64.check_model(TINY)


def test_did_you_mean_names_the_nearest_choice_only_when_one_is_near():
  from jax_ep.config import did_you_mean, natural_sort

  assert did_you_mean("propsed", ["single", "proposed", "baseline"]) == " Did you mean 'proposed'?"
  assert did_you_mean("nothing_like_it", ["single", "proposed"]) == ""
  assert natural_sort(["baseline_16", "baseline_2", "single", "baseline_1"]) == [
      "baseline_1", "baseline_2", "baseline_16", "single"]
