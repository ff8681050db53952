"""The collectives of a decode step: which devices each spans, their bytes per device
within and across nodes, and their time."""

from __future__ import annotations

import itertools

from jax_ep.config import DeploymentConfig, ModelConfig
from jax_ep.perf.hardware import Hardware
from jax_ep.perf.per_device import Layout


def _device_id(dep: DeploymentConfig, stage: int, expert: int, tp: int) -> int:
  """Flat device index of a mesh coordinate (mesh.py: tp fastest, then expert, then stage)."""
  return (stage * dep.expert + expert) * dep.tp + tp


def group_peers(dep: DeploymentConfig, axes: tuple[str, ...], gpus_per_node: int):
  """(intra-node peers, inter-node peers) of the worst-placed member of device 0's group.

  The group is the devices that differ from device 0 along `axes` only.
  """
  sizes = {"stage": dep.stages, "expert": dep.expert, "tp": dep.tp}
  ranges = [range(sizes[a]) if a in axes else range(1) for a in ("stage", "expert", "tp")]
  members = [_device_id(dep, *c) for c in itertools.product(*ranges)]
  worst = (0, 0)
  for me in members:
    inter = sum(1 for p in members if p // gpus_per_node != me // gpus_per_node)
    if inter >= worst[1]:
      worst = (len(members) - 1 - inter, inter)
  return worst


def collective_time(intra_bytes: float, inter_bytes: float, hw: Hardware,
                    latency: bool = True) -> float:
  """One collective call: latency + the slower of its NVLink and network shares."""
  if intra_bytes <= 0 and inter_bytes <= 0 and not latency:
    return 0.0
  t = max(intra_bytes / hw.intra_node_bytes_per_s, inter_bytes / hw.inter_node_bytes_per_s)
  return t + (hw.collective_latency_s if latency else 0.0)


def all_to_all_bytes(cfg: ModelConfig, dep: DeploymentConfig, lay: Layout,
                     gpus_per_node: int) -> tuple[float, float]:
  """(intra, inter) bytes one device sends in ONE all_to_all (dispatch; return is the same).

  The buffer is [P, W, D]; block p goes to device p (its own block stays).
  """
  if lay.ep_size == 1:
    return 0.0, 0.0
  axes = ("expert", "tp") if dep.placement == "ep" else ("expert",)
  intra, inter = group_peers(dep, axes, gpus_per_node)
  per_peer = lay.send_rows * cfg.model_dim * cfg.bytes_per_param
  return intra * per_peer, inter * per_peer


def _ring_bytes(size_bytes: float, group: int) -> float:
  """Bytes one device sends in a ring all-reduce of `size_bytes` over `group` devices."""
  return 2 * (group - 1) / group * size_bytes


def _gather_bytes(size_bytes: float, group: int) -> float:
  """Bytes one device receives in an all-gather of `size_bytes` shards over `group`."""
  return (group - 1) * size_bytes


def split_by_link(dep: DeploymentConfig, axes, nbytes: float, gpus_per_node: int):
  """Puts a collective's bytes on the network when its group crosses a node."""
  _, inter = group_peers(dep, axes, gpus_per_node)
  return (0.0, nbytes) if inter else (nbytes, 0.0)


def tp_allreduce_bytes(cfg: ModelConfig, dep: DeploymentConfig, lay: Layout) -> float:
  """Attention output [b, D] all-reduced over tp, once per layer and micro-step."""
  if dep.tp == 1:
    return 0.0
  return _ring_bytes(lay.micro_rows * cfg.model_dim * cfg.bytes_per_param, dep.tp)


def expert_tp_psum_bytes(cfg: ModelConfig, dep: DeploymentConfig, lay: Layout) -> float:
  """placement="tp": partial expert outputs [P x W, D] all-reduced over tp, per layer."""
  if dep.placement != "tp" or dep.tp == 1:
    return 0.0
  return _ring_bytes(lay.ep_size * lay.send_rows * cfg.model_dim * cfg.bytes_per_param, dep.tp)


def tp_allgather_bytes(cfg: ModelConfig, dep: DeploymentConfig, lay: Layout) -> float:
  """placement="ep" with tp > 1: each tp rank's MoE outputs gathered back, once per layer."""
  if dep.placement != "ep" or dep.tp == 1:
    return 0.0
  return (dep.tp - 1) * lay.moe_tokens * cfg.model_dim * cfg.bytes_per_param


def pipeline_bytes(cfg: ModelConfig, dep: DeploymentConfig, lay: Layout) -> float:
  """A group's activations [b, D] sent to the next stage (ppermute), once per micro-step."""
  if dep.stages == 1:
    return 0.0
  return lay.micro_rows * cfg.model_dim * cfg.bytes_per_param


def head_gather_bytes(cfg: ModelConfig, dep: DeploymentConfig, lay: Layout) -> float:
  """The group's rows [Bg, D] gathered over the expert axis for the head, per micro-step."""
  if dep.expert == 1:
    return 0.0
  return _gather_bytes(lay.micro_rows * cfg.model_dim * cfg.bytes_per_param, dep.expert)
