"""One table per deployment: which weight and activation axes map to which mesh axes.

Field names carry the dimension letters (README legend); weight fields are apart
from activation fields. Everything else reads its PartitionSpecs from here. A layer
field's leading L is the canonical layout's stack of layers; the deployment layout's
per-local-layer arrays [N, ...] (and the cache's) take the same spec: `stage` splits L
into N blocks.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep.config import DeploymentConfig
from jax_ep.mesh import EXPERT, STAGE, TP


@dataclasses.dataclass(frozen=True)
class ShardingTable:
  # weights
  embed_VxD: P
  unembed_DxV: P
  final_norm_D: P
  norm_LxD: P
  attn_in_LxDxHxDh: P  # wq, wk, wv
  attn_out_LxHxDhxD: P  # wo
  router_LxDxE: P
  expert_in_LxExDxF: P  # w_up (GELU) or w_up_gate (SwiGLU, [L, E, D, 2F])
  expert_out_LxExFxD: P  # w_down
  # activations and state
  tokens_BxT: P
  logits_BxTxV: P
  kv_LxBxHxSxDh: P
  load_LxE: P
  inflight_NxBgxD: P  # the decode ring's activations between stages (ring.DecodeState)


def table_for(dep: DeploymentConfig) -> ShardingTable:
  experts = (EXPERT, TP) if dep.placement == "ep" else EXPERT
  ffn = TP if dep.placement == "tp" else None
  return ShardingTable(
      # The embedding is replicated: a lookup reads only its B rows. The unembedding is
      # split over the vocabulary (ep.best_over_vocab samples across the shards).
      embed_VxD=P(),
      unembed_DxV=P(None, (EXPERT, TP)),
      final_norm_D=P(),
      norm_LxD=P(STAGE),
      attn_in_LxDxHxDh=P(STAGE, None, TP, None),
      attn_out_LxHxDhxD=P(STAGE, TP, None, None),
      router_LxDxE=P(STAGE),
      expert_in_LxExDxF=P(STAGE, experts, None, ffn),
      expert_out_LxExFxD=P(STAGE, experts, ffn, None),
      tokens_BxT=P(EXPERT),
      logits_BxTxV=P(None, None, (EXPERT, TP)),
      kv_LxBxHxSxDh=P(STAGE, EXPERT, TP, None, None),
      load_LxE=P(STAGE),
      inflight_NxBgxD=P(STAGE, EXPERT),
  )


# Parameter name (model.py) -> table field. Names under `layers` carry a leading L.
_PARAM_FIELD = {
    "embed_VxD": "embed_VxD",
    "unembed_DxV": "unembed_DxV",
    "wq_DxHxDh": "attn_in_LxDxHxDh",
    "wk_DxHxDh": "attn_in_LxDxHxDh",
    "wv_DxHxDh": "attn_in_LxDxHxDh",
    "wo_HxDhxD": "attn_out_LxHxDhxD",
    "w_router_DxE": "router_LxDxE",
    "w_up_ExDxF": "expert_in_LxExDxF",
    "w_up_gate_ExDx2F": "expert_in_LxExDxF",  # F's slice over tp: its pairs, whole
    "w_down_ExFxD": "expert_out_LxExFxD",
}


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_specs(state, table: ShardingTable):
  """PartitionSpecs for a model state (nnx.State, abstract or real), same structure."""

  def spec(path, leaf):
    names = _path_names(path)
    name = next(n for n in reversed(names) if n != "value")
    if name == "scale_D":
      return table.norm_LxD if "layers" in names else table.final_norm_D
    if name not in _PARAM_FIELD:
      raise KeyError(f"no sharding rule for parameter {'/'.join(names)}; add it to sharding.py")
    return getattr(table, _PARAM_FIELD[name])

  return jax.tree_util.tree_map_with_path(spec, state)


def named(mesh, specs):
  """PartitionSpecs -> NamedShardings on `mesh` (P is a pytree leaf here)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))
