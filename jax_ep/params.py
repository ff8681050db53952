"""Parameter layouts: the canonical one (the model's nnx.State, layers stacked [L, ...];
checkpoints and moves between deployments) and a deployment's (`layers[i]` holds layer
s * L_local + i of every stage s as [stages, ...]; see engine.Engine), and placing either
on a deployment's mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ep import sharding
from jax_ep.config import ConfigError


def to_layout(canonical, stages: int, local_layers: int):
  """Canonical nnx.State (layers [L, ...]) -> the layout of a deployment of `stages`
  stages of `local_layers` layers each."""
  s, n = stages, local_layers

  def take(i):
    return lambda a: a.reshape(s, n, *a.shape[1:])[:, i]

  layers = canonical["layers"]
  return {"embed_VxD": canonical["embed_VxD"], "final_norm": canonical["final_norm"],
          "unembed_DxV": canonical["unembed_DxV"],
          "layers": tuple(jax.tree.map(take(i), layers) for i in range(n))}


def place(engine, params):
  """Lays out parameters, canonical (the model's nnx.State, or the pure dict of arrays
  that checkpoint.restore_canonical returns) or from any deployment, on `engine`'s mesh.

  Raises ConfigError if they are not parameters of the engine's model.
  """
  if is_layout(params) and same_shapes(params, engine.abstract_params):
    return jax.device_put(params, engine.param_shardings)
  params = canonical_of(engine, params)
  # Canonical shards first (the stacked L axis splits over stages in the same blocks),
  # so each device receives only its share; the relayout is then local to each device.
  canonical_specs = sharding.param_specs(engine.abstract_canonical, engine.table)
  params = jax.device_put(params, sharding.named(engine.mesh, canonical_specs))
  return jax.jit(engine.to_layout, out_shardings=engine.param_shardings)(params)


def is_layout(params) -> bool:
  """Whether `params` are in a deployment's layout (layers a tuple of [stages, ...])."""
  return isinstance(params, dict) and isinstance(params.get("layers"), tuple)


def canonical_of(engine, params):
  """`params` (canonical nnx.State, its pure dict, or any deployment's layout) as the
  canonical nnx.State of `engine`'s model, each shard where it is; ConfigError naming the
  first difference if they are another model's."""
  if isinstance(params, dict) and not is_layout(params):
    params = _state_of_pure(engine, params)
  if is_layout(params):
    if engine.cfg.num_layers % len(params["layers"]):
      raise ConfigError(f"params hold {len(params['layers'])} layers per stage, which does "
                        f"not divide this model's {engine.cfg.num_layers} layers.")
    params = jax.jit(to_canonical_fn(engine.cfg.num_layers),
                     out_shardings=canonical_shardings_of(params))(params)
  if not same_shapes(params, engine.abstract_canonical):
    raise _not_the_model(engine.cfg, first_mismatch(params, engine.abstract_canonical))
  return params


def _not_the_model(cfg, what: str) -> ConfigError:
  return ConfigError(
      f"params do not match this engine's model ({cfg.num_layers} layers x "
      f"{cfg.num_experts} {cfg.mlp_kind} experts, D={cfg.model_dim}, F={cfg.mlp_dim}, "
      f"V={cfg.vocab_size}): {what}. Load them into the model config they were made for.")


def _state_of_pure(engine, pure: dict):
  """A pure canonical dict (checkpoint.restore_canonical's) as the model's nnx.State;
  ConfigError naming the first array it lacks or has beyond the model's."""
  want = nnx.to_pure_dict(engine.abstract_canonical)
  keys = lambda tree: {jax.tree_util.keystr(k) for k, _ in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  missing, extra = sorted(keys(want) - keys(pure)), sorted(keys(pure) - keys(want))
  if missing or extra:
    raise _not_the_model(engine.cfg, f"{missing[0]} is missing" if missing
                         else f"{extra[0]} is not in the model")
  state = jax.tree.map(lambda a: a, engine.abstract_canonical)
  nnx.replace_by_pure_dict(state, pure)
  return state


def to_canonical_fn(num_layers: int):
  """Canonical from the layout of any deployment (its stages x local layers = L)."""

  def f(params):
    def stack(*per_local):
      a = jnp.stack(per_local, axis=1)
      return a.reshape(num_layers, *a.shape[2:])

    layers = jax.tree.map(stack, *params["layers"])
    return nnx.State(_raw({"embed_VxD": params["embed_VxD"], "final_norm": params["final_norm"],
                           "layers": layers, "unembed_DxV": params["unembed_DxV"]}))

  return f


def canonical_shardings_of(layout):
  """Where the canonical form of a deployment layout stays on the devices it is on.

  Each canonical layer leaf [L, ...] takes the spec of its [stages, ...] counterpart:
  `stage` then splits L into the same contiguous blocks, so nothing is gathered (the
  seed's weights would not fit on one device twice). None for host arrays.
  """
  try:
    shardings = jax.tree.map(lambda a: a.sharding, layout)
  except AttributeError:
    return None
  return nnx.State(_raw({**{k: v for k, v in shardings.items() if k != "layers"},
                         "layers": shardings["layers"][0]}))


def same_shapes(tree, abstract) -> bool:
  try:
    return all(a.shape == b.shape and a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract), strict=True)
               ) and jax.tree.structure(tree) == jax.tree.structure(abstract)
  except (ValueError, AttributeError):
    return False


def first_mismatch(tree, abstract) -> str:
  got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  for path, want in jax.tree_util.tree_leaves_with_path(abstract):
    key = jax.tree_util.keystr(path)
    if key not in got:
      return f"{key} is missing"
    have = got[key]
    if getattr(have, "shape", None) != want.shape or getattr(have, "dtype", None) != want.dtype:
      return (f"{key} is {getattr(have, 'dtype', '?')}{list(getattr(have, 'shape', []))}, "
              f"the model needs {want.dtype}{list(want.shape)}")
  return "the parameter tree has other entries"


def _raw(tree):
  """Nested States -> nested dicts, the form nnx.split's State holds inside."""
  if isinstance(tree, (dict, nnx.State)):
    return {k: _raw(v) for k, v in tree.items()}
  return tree
