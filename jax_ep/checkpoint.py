"""Orbax checkpoints of the canonical parameters, restored into any deployment's shards.

A checkpoint directory is an orbax CheckpointManager's: one subdirectory per step, each
with the items `params` (the model's canonical nnx.State as a pure dict, layers stacked
[L, ...]: the same on every deployment), `meta` (JSON: the ModelConfig, the jax_ep
version, the format, the step, each array's shape, dtype and fingerprint, and whatever
the writer adds, such as training settings) and, for training runs, `opt_state`.

Saves are atomic: orbax writes a step into a temporary directory and renames it when
every file is written, so a save that is killed leaves no step behind and the previous
one intact. Restores read into the target's sharding (jax.ShapeDtypeStruct with a
NamedSharding), so each process reads only the shards its devices hold, and check the
config and the fingerprints (tensorstore does not notice a flipped byte in a data
chunk) before returning anything: a bad checkpoint raises ConfigError and loads nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import jax_ep
from jax_ep import params as param_layouts
from jax_ep import sharding
from jax_ep.config import ConfigError, ModelConfig, count
from jax_ep.kernels import groups
from jax_ep.model import Transformer

FORMAT = 1
# Arrays renamed since format 1 was first written (the head dim's letter K became Dh):
# a checkpoint that holds the old names is read under them and renamed.
RENAMED = {"wq_DxHxK": "wq_DxHxDh", "wk_DxHxK": "wk_DxHxDh", "wv_DxHxK": "wv_DxHxDh",
           "wo_HxKxD": "wo_HxDhxD"}
# SwiGLU's up and gate weights, saved apart before they were stored interleaved as one
# (kernels/groups.interleave_pairs): read apart and interleaved where the target lies.
PAIRED = {"w_up_gate_ExDx2F": ("w_up_ExDxF", "w_gate_ExDxF")}
PARAMS, OPT_STATE, META = "params", "opt_state", "meta"
# Fields that may differ between the saved model and the one restoring it: the KV
# cache's length is the server's choice, not the weights'.
FREE_FIELDS = ("max_seq_len",)
# What orbax names a step directory while it is being written (renamed when complete).
TMP_SUFFIX = ".orbax-checkpoint-tmp"


# --- the canonical form --------------------------------------------------------------------


def abstract_state(cfg: ModelConfig) -> nnx.State:
  """The model's canonical nnx.State, as ShapeDtypeStructs."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[1]


def to_state(cfg: ModelConfig, pure: dict) -> nnx.State:
  """A pure dict of canonical arrays -> the model's nnx.State (what Engine.place_params
  and nnx.merge take)."""
  state = abstract_state(cfg)
  nnx.replace_by_pure_dict(state, pure)
  return state


def pure(tree) -> dict:
  """nnx.State (or a pure dict) -> pure dict of arrays."""
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


# --- fingerprints --------------------------------------------------------------------------


_MIX = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C, 0xFD7046C5)


def _fingerprint(x, xp=jnp):
  """(sum of the bit patterns, sum weighted by a hash of each index), mod 2^32.

  Integer sums do not depend on the order of the reduction, so every sharding of the
  same values gives the same numbers; any one flipped bit changes the first, swapped
  elements the second. xp=np computes the same on the host (arrays an import holds).
  """
  x = xp.asarray(x)
  size = x.dtype.itemsize
  if x.dtype == xp.bool_:
    b = x.astype(xp.uint32)
  elif xp is np:  # as bitcast_convert_type: 8 bytes become a trailing axis of two words
    b = x.view(f"u{size}") if size < 8 else x.reshape(-1).view(np.uint32).reshape(*x.shape, 2)
    b = b.astype(np.uint32)
  else:
    b = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}.get(size, jnp.uint32))
    b = b.astype(jnp.uint32)
  weight = xp.ones(b.shape, xp.uint32)
  for axis in range(b.ndim):
    shape = [1] * b.ndim
    shape[axis] = b.shape[axis]
    iota = xp.arange(b.shape[axis], dtype=xp.uint32).reshape(shape)
    weight = weight + iota * xp.uint32(_MIX[axis % len(_MIX)])
  return [xp.sum(b, dtype=xp.uint32), xp.sum(b * weight, dtype=xp.uint32)]


@jax.jit
def _fingerprints(tree):
  return jax.tree.map(lambda x: jnp.stack(_fingerprint(x)), tree)


def describe(tree) -> dict[str, dict]:
  """Each array's shape, dtype and fingerprint, by path (what meta['arrays'] holds).

  Device arrays are fingerprinted where they are (one jit over the tree, sharded as
  they are), numpy arrays on the host.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  on_host = all(isinstance(leaf, np.ndarray) for _, leaf in leaves)
  if on_host:
    prints = [[int(v) for v in _fingerprint(leaf, np)] for _, leaf in leaves]
  else:
    prints = [[int(v) for v in fp] for fp in jax.tree.leaves(jax.device_get(_fingerprints(
        tree)), is_leaf=lambda a: isinstance(a, np.ndarray))]
  return {_key(path): {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "fingerprint": fp}
          for (path, leaf), fp in zip(leaves, prints, strict=True)}


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


# --- the manager ----------------------------------------------------------------------------


class Checkpointer:
  """One checkpoint directory: save steps, read their meta, restore them.

  `create` opens it for writing (a training run); otherwise it must exist and is only
  read.
  """

  def __init__(self, directory: str, *, create: bool = False, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    if not create and not os.path.isdir(self.directory):
      raise ConfigError(f"no checkpoint directory {self.directory} (--checkpoint takes the "
                        "--workdir that jax-ep train or import-hf wrote).")
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise ConfigError(f"{self.directory} is a file, not a checkpoint directory.")
    # A reader neither creates, deletes nor cleans up (orbax's read_only mode does the
    # same but logs warnings on every open).
    options = ocp.CheckpointManagerOptions(
        create=create, max_to_keep=max_to_keep if create else None,
        cleanup_tmp_directories=create)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def _step(self, step: int | None) -> int:
    steps = self.steps()
    if step is None:
      if not steps:
        partial = glob.glob(os.path.join(self.directory, "*" + TMP_SUFFIX + "*"))
        why = (f" ({count(len(partial), 'unfinished save')}: a run killed while saving leaves "
               "those)"
               if partial else "")
        parent = os.path.dirname(self.directory)
        if os.path.basename(self.directory).isdigit() and _has_steps(parent):
          why += (f"; it is a step of the checkpoint {parent}: pass --checkpoint={parent} (its "
                  "latest step is read)")
        raise ConfigError(f"{self.directory} holds no finished checkpoint{why}.")
      return steps[-1]
    if step not in steps:
      raise ConfigError(f"{self.directory} has no checkpoint of step {step}; it has {steps}.")
    return step

  # --- writing ---

  def save(self, step: int, cfg: ModelConfig, params, *, opt_state=None,
           extra: dict | None = None) -> None:
    """Saves canonical `params` (nnx.State or pure dict, sharded anywhere) at `step`.

    Asynchronous: returns once the arrays are copied off the devices; wait() or close()
    ends the write. A step that already exists is an error.
    """
    if int(step) in self._manager.all_steps():
      raise ConfigError(f"step {int(step)} already exists in {self.directory}; save under "
                        "another step, or into another directory.")
    params = pure(params)
    items = {PARAMS: params} if opt_state is None else {PARAMS: params, OPT_STATE: opt_state}
    arrays = {name: describe(tree) for name, tree in items.items()}
    meta = {"format": FORMAT, "jax_ep_version": jax_ep.__version__, "step": int(step),
            "model": dataclasses.asdict(cfg), "arrays": arrays, **(extra or {})}
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    self._manager.save(int(step), args=ocp.args.Composite(**args, **{META: ocp.args.JsonSave(
        meta)}), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --- reading ---

  def meta(self, step: int | None = None) -> dict:
    """The meta item of `step` (the latest if None), checked for format and model."""
    step = self._step(step)
    where = f"{self.directory} step {step}"
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          **{META: ocp.args.JsonRestore()}))[META]
    except Exception as e:  # orbax raises what its handlers raise
      raise ConfigError(f"{where}: its meta item is missing or unreadable ({_short(e)}); "
                        "the checkpoint is damaged.") from e
    if not isinstance(meta, dict) or "model" not in meta or "arrays" not in meta:
      raise ConfigError(f"{where}: its meta item is not a jax_ep checkpoint's.")
    if meta.get("format", 0) > FORMAT:
      raise ConfigError(f"{where} was written by jax_ep {meta.get('jax_ep_version')} in "
                        f"checkpoint format {meta['format']}; this jax_ep "
                        f"({jax_ep.__version__}) reads format {FORMAT}. Upgrade jax_ep.")
    return meta

  def config(self, step: int | None = None) -> ModelConfig:
    """The saved model's config."""
    model = self.meta(step)["model"]
    try:
      return ModelConfig(**model)
    except (TypeError, ConfigError) as e:
      raise ConfigError(f"{self.directory}: the saved model config {model} is not one this "
                        f"jax_ep can build: {e}") from e

  def restore(self, step: int | None, cfg: ModelConfig, targets: dict[str, Any]) -> dict:
    """Restores items {name: abstract tree of ShapeDtypeStructs (with shardings)}.

    Each process reads only the shards its devices hold. Checks, before returning, that
    the checkpoint is of `cfg`'s model (ConfigError naming the fields that differ) and
    that every array is whole (shape, dtype, fingerprint).
    """
    step = self._step(step)
    meta = self.meta(step)
    where = f"{self.directory} step {step}"
    check_model(meta["model"], cfg, where)
    old_names = {new: old for old, new in RENAMED.items()}
    renamed = {name for name in targets if name in meta["arrays"] and any(
        key.rsplit("/", 1)[-1] in RENAMED for key in meta["arrays"][name])}
    wanted = targets
    targets = {name: _unpair(_rename(t, old_names) if name in renamed else t,
                             set(meta["arrays"].get(name, ()))) for name, t in targets.items()}
    for name, target in targets.items():
      if name not in meta["arrays"]:
        raise ConfigError(f"{where} holds no {name!r} item (it has "
                          f"{sorted(meta['arrays'])}).")
      _check_shapes(meta["arrays"][name], target, f"{where} {name}")
    args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # tensorstore: DATA_LOSS, OUT_OF_RANGE, NOT_FOUND, ...
      others = [s for s in self.steps() if s != step]
      way_out = (f" Its other steps: {others}; move {os.path.join(self.directory, str(step))} "
                 f"aside to read step {others[-1]} (the latest is what is read)."
                 if others else "")
      raise ConfigError(f"{where} is damaged (a file is missing, truncated or corrupt): "
                        f"{_short(e)}.{way_out}") from e
    restored = {name: out[name] for name in targets}
    for name, tree in restored.items():
      bad = [k for k, v in describe(tree).items()
             if v["fingerprint"] != meta["arrays"][name][k]["fingerprint"]]
      if bad:
        raise ConfigError(f"{where} is corrupt: {name} array(s) {', '.join(bad[:4])}"
                          f"{' ...' if len(bad) > 4 else ''} do not hold what was saved "
                          "(fingerprint mismatch).")
    return {name: _pair(_rename(tree, RENAMED) if name in renamed else tree, wanted[name])
            for name, tree in restored.items()}


def _map_children(tree, fn):
  """A namedtuple, tuple or list (an optax state) with fn(key, child) for each child, the
  key as _key names it (a field name or an index); any other leaf as it is."""
  if hasattr(tree, "_fields"):
    return type(tree)(*(fn(k, v) for k, v in zip(tree._fields, tree, strict=True)))
  if isinstance(tree, (tuple, list)):
    return type(tree)(fn(i, v) for i, v in enumerate(tree))
  return tree


def _rename(tree, names: dict[str, str]):
  """`tree` with each dict key in `names` replaced by its value, at any depth."""
  if isinstance(tree, dict):
    return {names.get(k, k): _rename(v, names) for k, v in tree.items()}
  return _map_children(tree, lambda _, v: _rename(v, names))


def _unpair(target, saved: set[str], prefix: str = ""):
  """`target` with each PAIRED leaf that the checkpoint (array keys `saved`) holds as its
  two halves replaced by them: [..., F] each, sharded as the leaf."""
  if not isinstance(target, dict):
    return _map_children(target, lambda k, v: _unpair(v, saved, f"{prefix}{k}/"))
  out = {}
  for k, t in target.items():
    olds = PAIRED.get(k, ())
    if olds and prefix + k not in saved and all(prefix + old in saved for old in olds):
      half = jax.ShapeDtypeStruct((*t.shape[:-1], t.shape[-1] // 2), t.dtype,
                                  sharding=getattr(t, "sharding", None))
      out.update(dict.fromkeys(olds, half))
    else:
      out[k] = _unpair(t, saved, f"{prefix}{k}/")
  return out


def _pair(tree, target):
  """_unpair's inverse on what was restored: each pair interleaved into `target`'s leaf,
  on the devices of its sharding (each holds the columns of its F slice: a local op)."""
  if not isinstance(target, dict):
    return _map_children(tree, lambda k, v: _pair(
        v, getattr(target, k) if isinstance(k, str) else target[k]))
  out = {}
  for k, t in target.items():
    if k in PAIRED and k not in tree:
      up, gate = (tree[old] for old in PAIRED[k])
      out[k] = jax.jit(groups.interleave_pairs,
                       out_shardings=getattr(t, "sharding", None))(up, gate)
    else:
      out[k] = _pair(tree[k], t)
  return out


def _has_steps(directory: str) -> bool:
  with Checkpointer(directory) as ckpt:
    return bool(ckpt.steps())


def _short(e: Exception) -> str:
  """The first line of `e`, without tensorstore's dump of its spec (an object's repr)."""
  text = f"{type(e).__name__}: {e}".splitlines()[0]
  text = text.split(" See full TensorStore details")[0].rstrip(" .:")
  return text[:300] + (" ..." if len(text) > 300 else "")


def check_model(saved: dict, cfg: ModelConfig, where: str, advice: str | None = None) -> None:
  """Raises ConfigError naming each ModelConfig field in which `saved` differs from cfg,
  then `advice` (what to change; by default, the restore's)."""
  want = dataclasses.asdict(cfg)
  diff = [f"{k}={saved.get(k)!r} (the model asked for: {v!r})" for k, v in want.items()
          if k not in FREE_FIELDS and saved.get(k) != v]
  diff += [f"{k}={saved[k]!r} (unknown to this jax_ep)" for k in saved if k not in want]
  if diff:
    raise ConfigError(f"{where} holds another model: {', '.join(diff)}. " + (
        advice or "Restore it into the model it was saved from: --config=<its preset> "
        "(generate and bench read the model from the checkpoint when --config is not given; "
        "train does not)."))


def _check_shapes(saved: dict, target, where: str) -> None:
  want = {_key(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
  for key in sorted(set(want) | set(saved)):
    if key not in saved:
      raise ConfigError(f"{where}: the checkpoint has no array {key}.")
    if key not in want:
      raise ConfigError(f"{where}: the checkpoint has an array {key} the model does not.")
    got, leaf = saved[key], want[key]
    if tuple(got["shape"]) != tuple(leaf.shape) or got["dtype"] != str(jnp.dtype(leaf.dtype)):
      raise ConfigError(f"{where}: {key} is {got['dtype']}{got['shape']} in the checkpoint; "
                        f"the model needs {jnp.dtype(leaf.dtype)}{list(leaf.shape)}.")


# --- deployments -----------------------------------------------------------------------------


def abstract_canonical(cfg: ModelConfig, engine=None) -> dict:
  """Restore target of canonical params: on `engine`'s mesh in its canonical shardings
  (each stage's devices get their layers' shards), or on the default device if None."""
  abstract = nnx.to_pure_dict(abstract_state(cfg)) if engine is None else (
      nnx.to_pure_dict(engine.abstract_canonical))
  if engine is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract)
  specs = sharding.param_specs(abstract, engine.table)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, sharding.named(engine.mesh, specs))


def save(directory: str, engine, params, *, step: int = 0, extra: dict | None = None) -> None:
  """Saves `params` of `engine`'s model (its deployment's layout, or canonical: nnx.State
  or pure dict) as a canonical checkpoint (blocks until written). Each shard is written
  from the devices that hold it. Params of another model are refused (ConfigError)
  before anything is created."""
  if param_layouts.is_layout(params) and param_layouts.same_shapes(params,
                                                                   engine.abstract_params):
    canonical = engine.canonical_params(params)
  else:
    canonical = param_layouts.canonical_of(engine, params)
  with Checkpointer(directory, create=True) as ckpt:
    ckpt.save(step, engine.cfg, canonical, extra=extra)
    ckpt.wait()


def save_canonical(directory: str, cfg: ModelConfig, params, *, step: int = 0,
                   extra: dict | None = None) -> None:
  """Saves canonical params (nnx.State or pure dict) of `cfg`'s model (blocks)."""
  with Checkpointer(directory, create=True) as ckpt:
    ckpt.save(step, cfg, params, extra=extra)
    ckpt.wait()


def restore(directory: str, engine, step: int | None = None):
  """The checkpoint's parameters in `engine`'s deployment layout (the latest step if
  None). Raises ConfigError (and returns nothing) if it is not this engine's model or
  is damaged."""
  with Checkpointer(directory) as ckpt:
    canonical = ckpt.restore(step, engine.cfg,
                             {PARAMS: abstract_canonical(engine.cfg, engine)})[PARAMS]
  return engine.place_params(to_state(engine.cfg, canonical))


def restore_canonical(directory: str, cfg: ModelConfig | None = None,
                      step: int | None = None) -> tuple[ModelConfig, dict, dict]:
  """(config, canonical params as a pure dict on the default device, meta)."""
  with Checkpointer(directory) as ckpt:
    cfg = cfg or ckpt.config(step)
    meta = ckpt.meta(step)
    params = ckpt.restore(step, cfg, {PARAMS: abstract_canonical(cfg)})[PARAMS]
  return cfg, params, meta


def read_meta(directory: str, step: int | None = None) -> dict:
  with Checkpointer(directory) as ckpt:
    return ckpt.meta(step)


def read_config(directory: str, step: int | None = None) -> ModelConfig:
  with Checkpointer(directory) as ckpt:
    return ckpt.config(step)


def as_numpy(tree) -> dict:
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)
