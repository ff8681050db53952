"""Tests for jax_ep/checkpoint.py: a checkpoint saved from one deployment restores into
the shards of any other with the same logits; another model, a damaged file or a missing
directory is a ConfigError; a save killed before it commits leaves the previous step.

One tiny model saved once (module fixture) from proposed_8; each test copies it before
damaging it. The only forward passes compiled: the restored baseline's and one device's.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from configs import deployments, load_model
from jax_ep import checkpoint
from jax_ep.config import ConfigError, DeploymentConfig
from jax_ep.engine import Engine
from tests import reference

PRESETS = deployments.PRESETS
TP2 = DeploymentConfig(kind="proposed", stages=2, expert=4, tp=2, placement="tp")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(directory, source engine, its params): tiny saved from proposed_8 at step 7."""
  directory = str(tmp_path_factory.mktemp("ckpt") / "run")
  engine = Engine(load_model("tiny"), PRESETS["proposed_8"])
  params = engine.init_params(3)
  checkpoint.save(directory, engine, params, step=7, extra={"note": "test"})
  return directory, engine, params


def _copy(saved, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(saved[0], dst)
  return dst


def _equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(
      lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.mark.parametrize("dep", [PRESETS["single"], PRESETS["baseline_8"], TP2,
                                 PRESETS["seed_proposed"]],
                         ids=["single", "baseline_8", "proposed_tp2", "seed_proposed"])
def test_restore_into_another_deployment_holds_its_shards(saved, dep):
  directory, source, params = saved
  engine = Engine(source.cfg, dep)
  got = checkpoint.restore(directory, engine)
  # What placing the live parameters there gives, shard for shard.
  assert _equal(got, engine.place_params(params))
  for leaf, want in zip(jax.tree.leaves(got), jax.tree.leaves(engine.param_shardings),
                        strict=True):
    assert leaf.sharding == want
  w_up = got["layers"][0]["moe"]["w_up_ExDxF"]  # [stages, E, D, F]
  cfg = engine.cfg
  shard = (1, cfg.num_experts // dep.expert_shards, cfg.model_dim,
           cfg.mlp_dim // (dep.tp if dep.placement == "tp" else 1))
  assert {s.data.shape for s in w_up.addressable_shards} == {shard}


def test_restored_baseline_gives_the_saved_models_logits(saved):
  directory, source, params = saved
  engine = Engine(source.cfg, PRESETS["baseline_8"])
  restored = checkpoint.restore(directory, engine)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, source.cfg.vocab_size, (8, 5)),
                       jnp.int32)
  cache = engine.init_cache(8, 8)
  logits, _, _ = engine.logits_program()(
      restored, cache, jax.device_put(tokens, engine.tokens_sharding()), jnp.int32(0))
  # The reference: the saved params as they were, whole on one device.
  canonical = jax.device_get(source.canonical_params(params))
  want, _, _ = reference.Reference(source.cfg).forward(tokens, 8, canonical)
  assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_meta_holds_config_version_step_and_extras(saved):
  meta = checkpoint.read_meta(saved[0])
  assert meta["model"] == dataclasses.asdict(load_model("tiny"))
  assert meta["format"] == checkpoint.FORMAT and meta["jax_ep_version"]
  assert meta["step"] == 7 and meta["note"] == "test"
  assert meta["arrays"]["params"]["embed_VxD"]["shape"] == [256, 64]
  assert checkpoint.read_config(saved[0]) == load_model("tiny")


@pytest.mark.parametrize("change,message", [
    ({"num_layers": 2}, "num_layers=4 (the model asked for: 2)"),
    ({"mlp_dim": 64, "dtype": "bfloat16"}, "mlp_dim=128 (the model asked for: 64), "
                                           "dtype='float32' (the model asked for: 'bfloat16')"),
])
def test_another_model_names_the_fields(saved, change, message):
  other = dataclasses.replace(load_model("tiny"), **change)
  with pytest.raises(ConfigError, match="holds another model") as e:
    checkpoint.restore(saved[0], Engine(other, PRESETS["single"]))
  assert message in str(e.value)


def test_checkpoint_with_the_old_head_dim_names_is_read_and_renamed(tmp_path):
  # Written before K became Dh: the same arrays under wq_DxHxK, ..., wo_HxKxD.
  cfg = load_model("tiny")
  _, params, _ = checkpoint.restore_canonical(_saved_canonical(cfg, tmp_path / "new"))
  old = checkpoint._rename(checkpoint.as_numpy(params),
                           {new: old for old, new in checkpoint.RENAMED.items()})
  assert any(k.endswith("wq_DxHxK") for k in checkpoint.describe(old))
  checkpoint.save_canonical(str(tmp_path / "old"), cfg, old)
  _, got, _ = checkpoint.restore_canonical(str(tmp_path / "old"))
  assert _equal(got, params)
  assert not any(k.rsplit("/", 1)[-1] in checkpoint.RENAMED for k in checkpoint.describe(got))


def _apart(params):
  """SwiGLU canonical params as numpy, with up and gate apart, as saved before 1a38e56."""
  old = checkpoint.as_numpy(params)
  moe = old["layers"]["moe"]
  w = moe.pop("w_up_gate_ExDx2F")
  moe["w_up_ExDxF"], moe["w_gate_ExDxF"] = w[..., 0::2], w[..., 1::2]
  return old


def test_swiglu_checkpoint_with_up_and_gate_apart_is_read_interleaved(tmp_path):
  # Written before SwiGLU's up and gate became one interleaved weight: w_up and w_gate.
  cfg = dataclasses.replace(load_model("tiny"), mlp_kind="swiglu")
  _, params, _ = checkpoint.restore_canonical(_saved_canonical(cfg, tmp_path / "new"))
  old = _apart(params)
  checkpoint.save_canonical(str(tmp_path / "old"), cfg, old)
  _, got, _ = checkpoint.restore_canonical(str(tmp_path / "old"))
  assert _equal(got, params)
  # Into the shards of a deployment that splits each expert's F over tp: the same.
  engine = Engine(cfg, TP2)
  placed = checkpoint.restore(str(tmp_path / "old"), engine)
  assert _equal(placed, engine.place_params(checkpoint.to_state(cfg, params)))
  for leaf, want in zip(jax.tree.leaves(placed), jax.tree.leaves(engine.param_shardings),
                        strict=True):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)


def test_training_state_with_up_and_gate_apart_resumes_interleaved(tmp_path):
  # An old SwiGLU run's optimizer state (optax: tuples of namedtuples of dicts) holds Adam's
  # moments under w_up_ExDxF and w_gate_ExDxF too. Adam is elementwise, so the moments of
  # the interleaved weight are the old moments interleaved.
  cfg = dataclasses.replace(load_model("tiny"), mlp_kind="swiglu")
  _, params, _ = checkpoint.restore_canonical(_saved_canonical(cfg, tmp_path / "new"))
  old = _apart(params)
  tx = optax.adam(1e-2)

  def moments(p):
    p = jax.tree.map(jnp.asarray, p)
    return tx.update(p, tx.init(p), p)[1]  # nonzero mu and nu

  with checkpoint.Checkpointer(str(tmp_path / "old"), create=True) as ckpt:
    ckpt.save(0, cfg, old, opt_state=moments(old))
    ckpt.wait()
  want = {checkpoint.PARAMS: params, checkpoint.OPT_STATE: moments(params)}
  targets = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                         want)
  with checkpoint.Checkpointer(str(tmp_path / "old")) as ckpt:
    got = ckpt.restore(0, cfg, targets)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert _equal(got, want)


def _saved_canonical(cfg, path):
  engine = Engine(cfg, PRESETS["single"])
  checkpoint.save(str(path), engine, engine.init_params(5))
  return str(path)


def test_cache_length_may_differ(saved):
  longer = dataclasses.replace(load_model("tiny"), max_seq_len=128)
  restored = checkpoint.restore(saved[0], Engine(longer, PRESETS["single"]))
  assert restored["embed_VxD"].shape == (256, 64)


def _largest_data_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(directory, "7", "params"))
           for f in fs if "/d/" in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def _flip(path, at=0.5):
  data = bytearray(open(path, "rb").read())
  data[int(len(data) * at)] ^= 0x10
  open(path, "wb").write(bytes(data))


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reads
@pytest.mark.parametrize("damage,message", [
    (lambda d: _truncate(_largest_data_file(d)), "is damaged"),
    (lambda d: os.remove(_largest_data_file(d)), "is damaged"),
    (lambda d: _truncate(os.path.join(d, "7", "meta", "metadata")), "meta item is missing or"),
    (lambda d: shutil.rmtree(os.path.join(d, "7")), "holds no finished checkpoint"),
])
def test_damaged_checkpoint_is_a_clear_error(saved, tmp_path, damage, message):
  directory = _copy(saved, tmp_path)
  damage(directory)
  engine = Engine(saved[1].cfg, PRESETS["single"])
  with pytest.raises(ConfigError, match=message):
    checkpoint.restore(directory, engine)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reads
def test_a_flipped_byte_that_tensorstore_reads_is_caught_by_the_fingerprints(saved, tmp_path):
  # Where a flipped byte lands in the data file decides who notices: tensorstore (a chunk's
  # framing: "is damaged") or nothing but the fingerprints (its values: "is corrupt"). The
  # file's layout varies between saves, so a few places are tried; each is a clear error
  # and at least one gets past tensorstore to the fingerprints.
  engine = Engine(saved[1].cfg, PRESETS["single"])
  caught = []
  for k, at in enumerate((0.5, 0.3, 0.7, 0.4, 0.6, 0.2, 0.8)):
    directory = _copy(saved, tmp_path / str(k))
    _flip(_largest_data_file(directory), at)
    with pytest.raises(ConfigError, match="is corrupt: params array|is damaged") as e:
      checkpoint.restore(directory, engine)
    caught.append(str(e.value))
    if "is corrupt: params array" in caught[-1]:
      break
  assert "is corrupt: params array" in caught[-1], caught


def test_save_takes_canonical_params_and_refuses_another_models(saved, tmp_path):
  directory, engine, params = saved
  canonical = engine.canonical_params(params)
  checkpoint.save(str(tmp_path / "canonical"), engine, canonical, step=7)
  _, restored, _ = checkpoint.restore_canonical(str(tmp_path / "canonical"))
  _, original, _ = checkpoint.restore_canonical(directory)
  assert _equal(restored, original)
  other = Engine(dataclasses.replace(engine.cfg, num_experts=8), PRESETS["proposed_8"])
  for wrong in (params, canonical):  # a layout and canonical params of the 16-expert model
    with pytest.raises(ConfigError, match="params do not match this engine's model"):
      checkpoint.save(str(tmp_path / "other"), other, wrong)
  assert not (tmp_path / "other").exists()  # refused before anything was created


def test_missing_directory(tmp_path):
  with pytest.raises(ConfigError, match="no checkpoint directory"):
    checkpoint.read_meta(str(tmp_path / "nope"))


def test_kill_during_save_leaves_the_previous_checkpoint(saved, tmp_path, monkeypatch):
  """A save dies after writing every file but before orbax renames its temporary
  directory (the commit): what a kill at any moment of a save leaves behind."""
  from orbax.checkpoint._src.path import atomicity

  directory = _copy(saved, tmp_path)
  source, params = saved[1], saved[2]
  other = jax.tree.map(lambda a: a * 2, params)

  class Killed(BaseException):
    pass

  async def killed(self):
    raise Killed("the process died before the rename")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
  with pytest.raises(Killed):
    checkpoint.save(directory, source, other, step=8)
  monkeypatch.undo()
  assert os.path.isdir(os.path.join(directory, "8" + checkpoint.TMP_SUFFIX))
  assert not os.path.exists(os.path.join(directory, "8"))
  with checkpoint.Checkpointer(directory) as ckpt:
    assert ckpt.steps() == [7]
  assert _equal(checkpoint.restore(directory, source), params)
  # The next writer clears the remains and saves.
  checkpoint.save(directory, source, other, step=8)
  assert not os.path.exists(os.path.join(directory, "8" + checkpoint.TMP_SUFFIX))
  assert _equal(checkpoint.restore(directory, source), other)


def test_fingerprints_do_not_depend_on_sharding_or_host():
  x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
  mesh = jax.make_mesh((8,), ("x",), devices=jax.devices()[:8])
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, None, "x")))
  on_host, on_device = checkpoint.describe({"x": x}), checkpoint.describe({"x": sharded})
  assert on_host == on_device
  swapped = x.copy()
  swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]
  fp = checkpoint.describe({"x": swapped})["x"]["fingerprint"]
  assert fp[0] == on_host["x"]["fingerprint"][0] and fp[1] != on_host["x"]["fingerprint"][1]
  for dtype in (jnp.bfloat16, jnp.int32, jnp.bool_):
    y = x.astype(dtype)
    assert_array_equal(checkpoint.describe({"y": y})["y"]["fingerprint"],
                       checkpoint.describe({"y": jnp.asarray(y)})["y"]["fingerprint"])


def test_saving_a_step_that_exists_is_refused(saved, tmp_path):
  directory, engine, params = saved
  copy = _copy(saved, tmp_path)
  with pytest.raises(ConfigError, match="step 7 already exists in"):
    checkpoint.save(copy, engine, params, step=7)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reads
def test_a_damaged_latest_step_names_the_way_to_an_intact_one(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  shutil.copytree(os.path.join(directory, "7"), os.path.join(directory, "3"))
  os.remove(_largest_data_file(directory))
  engine = Engine(saved[1].cfg, PRESETS["single"])
  with pytest.raises(ConfigError) as e:
    checkpoint.restore(directory, engine)
  message = str(e.value)
  assert "step 7 is damaged" in message and "TensorStore details" not in message
  assert "<bound method" not in message
  latest = os.path.join(directory, "7")
  assert f"Its other steps: [3]; move {latest} aside to read step 3" in message
  shutil.move(latest, str(tmp_path / "aside"))  # as the message says: step 3 is read
  checkpoint.restore(directory, engine)


def test_a_step_folder_names_its_checkpoint(saved):
  directory = saved[0]
  engine = Engine(saved[1].cfg, PRESETS["single"])
  with pytest.raises(ConfigError, match=f"it is a step of the checkpoint {directory}: pass "
                                        f"--checkpoint={directory}"):
    checkpoint.restore(os.path.join(directory, "7"), engine)


def _edit_meta(directory, edit):
  path = os.path.join(directory, "7", "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  edit(meta)
  with open(path, "w") as f:
    json.dump(meta, f)


def test_an_array_of_another_dtype_in_the_checkpoint_is_named(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  _edit_meta(directory, lambda m: m["arrays"]["params"]["embed_VxD"].update(dtype="bfloat16"))
  with pytest.raises(ConfigError, match=r"embed_VxD is bfloat16\[256, 64\] in the checkpoint; "
                                        r"the model needs float32\[256, 64\]"):
    checkpoint.restore(directory, Engine(saved[1].cfg, PRESETS["single"]))


def test_swapped_values_with_the_same_sum_are_caught_by_the_fingerprints(saved, tmp_path):
  # The saved values of one array with two of its elements swapped: the same plain sum,
  # so only the fingerprints' position-weighted sum sees it.
  directory, engine, params = saved
  def swap(path, a):
    if "embed_VxD" not in jax.tree_util.keystr(path):
      return a
    x = np.array(a)
    x[0, [0, 1]] = x[0, [1, 0]]
    return jax.device_put(x, a.sharding)

  swapped = jax.tree_util.tree_map_with_path(swap, params)
  other = str(tmp_path / "other")
  checkpoint.save(other, engine, swapped, step=7)
  damaged = _copy(saved, tmp_path)
  shutil.rmtree(os.path.join(damaged, "7", "params"))  # the data of one, the meta of the other
  shutil.copytree(os.path.join(other, "7", "params"), os.path.join(damaged, "7", "params"))
  with pytest.raises(ConfigError, match=r"is corrupt: params array\(s\) embed_VxD do not hold"):
    checkpoint.restore(damaged, Engine(engine.cfg, PRESETS["single"]))


def test_restore_reads_each_devices_shards_only(saved):
  # The targets restore reads into are the engine's shards, not the whole model on every
  # device (and then placed): each device of seed_proposed reads one layer's one expert.
  cfg = saved[1].cfg
  engine = Engine(cfg, PRESETS["seed_proposed"])
  targets = checkpoint.abstract_canonical(cfg, engine)
  w_up = targets["layers"]["moe"]["w_up_ExDxF"]
  assert w_up.shape == (cfg.num_layers, cfg.num_experts, cfg.model_dim, cfg.mlp_dim)
  assert w_up.sharding.shard_shape(w_up.shape) == (1, 1, cfg.model_dim, cfg.mlp_dim)
