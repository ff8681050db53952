"""What one device holds and processes in a decode micro-step (Layout, layout()), the ring's
micro-steps, and the rows the grouped kernel multiplies."""

from __future__ import annotations

import dataclasses
import math

from jax_ep.config import DeploymentConfig, ModelConfig
from jax_ep.kernels.groups import DEFAULT_BLOCKS, cost_rows
from jax_ep.routing import rows_per_destination


@dataclasses.dataclass(frozen=True)
class Layout:
  """Per-device sizes of one decode micro-step, as the code lays them out."""

  layers: int  # L / S: layers of this device's stage
  heads: int  # H / tp
  experts: int  # E / expert_shards: experts of each local layer on this device
  mlp: int  # F, or F / tp when placement = "tp"
  rows: int  # B / expert: sequences this device attends for (replicated over tp, stage)
  groups: int  # G decode groups in flight
  period: int  # max(G, N) for N stages: micro-steps per token of each sequence
  micro_rows: int  # rows / G: one group's rows on this device
  moe_tokens: int  # tokens this device routes per layer and micro-step (/ tp if split)
  ep_size: int  # devices one layer's experts are spread over (the all_to_all group)
  send_rows: int  # W: send-buffer rows per destination
  vocab_shards: int  # expert x tp: the unembedding's columns are split this many ways
  # a group's rows over the stage (micro_rows x expert; x head_gather on a share): the
  # head's rows
  group_rows: int

  @property
  def micro_steps(self) -> int:
    return self.period


def layout(cfg: ModelConfig, dep: DeploymentConfig, batch: int) -> Layout:
  """The per-device sizes; raises ConfigError if the model or batch cannot be laid out."""
  dep.check_model(cfg)
  dep.check_batch(batch)
  rows = batch // dep.expert
  micro_rows = rows // dep.groups
  split_over_tp = dep.placement == "ep" and dep.tp > 1
  moe_tokens = max(-(-micro_rows // dep.tp) if split_over_tp else micro_rows, 1)
  experts = cfg.num_experts // dep.expert_shards
  return Layout(
      layers=cfg.num_layers // dep.stages, heads=cfg.num_heads // dep.tp, experts=experts,
      mlp=cfg.mlp_dim // dep.tp if dep.placement == "tp" else cfg.mlp_dim,
      rows=rows, groups=dep.groups, period=dep.ring_period, micro_rows=micro_rows,
      moe_tokens=moe_tokens, ep_size=dep.expert_shards,
      send_rows=rows_per_destination(moe_tokens, cfg.top_k, experts, dep.expert_shards,
                                     dep.capacity_factor, dep.dropless),
      vocab_shards=dep.expert * dep.tp,
      group_rows=micro_rows * dep.expert * dep.head_gather)


def micro_steps(dep: DeploymentConfig) -> int:
  """Ring micro-steps per token of each sequence (ring.py): max(G, N) for N stages."""
  return dep.ring_period


def bubble_factor(dep: DeploymentConfig) -> float:
  """Micro-steps per token over the stage-busy ones: max(G, N) / G (1 when G >= N)."""
  return dep.ring_period / dep.groups


def expert_rows(cfg: ModelConfig, lay: Layout, imbalance: float = 1.0) -> tuple[float, int]:
  """(real rows, rows the kernel multiplies) on a device per layer and micro-step.

  Balanced, each expert receives moe_tokens x K x P / E rows. `imbalance` (expert load
  max/mean) gives one local expert that many times the mean and the others the rest.
  The kernel rounds each expert's rows up to its tiles (grouped_matmul.cost_rows).
  """
  mean = lay.moe_tokens * cfg.top_k * lay.ep_size / cfg.num_experts
  real = mean * lay.experts
  busiest = min(mean * imbalance, real, lay.moe_tokens * lay.ep_size)
  rest = [(real - busiest) / (lay.experts - 1)] * (lay.experts - 1) if lay.experts > 1 else []
  return real, cost_rows([math.ceil(r) for r in [busiest] + rest], DEFAULT_BLOCKS)




def describe_layout(cfg: ModelConfig, dep: DeploymentConfig, batch: int) -> str:
  """Per-GPU deployment in words, for tables ("4 experts + 1/8 attention per GPU")."""
  lay = layout(cfg, dep, batch)
  experts = lay.layers * lay.experts
  parts = [f"{experts} expert{'s' if experts != 1 else ''}"]
  if dep.placement == "tp" and dep.tp > 1:
    parts[0] += f" (1/{dep.tp} of each MLP)"
  attn = f"{lay.layers}/{cfg.num_layers} layers' attention"
  if dep.tp > 1:
    attn += f" (1/{dep.tp} heads)"
  parts.append(attn)
  mesh = f"S{dep.stages}xE{dep.expert}xTP{dep.tp}, G={dep.groups}"
  return " + ".join(parts) + "; " + mesh
