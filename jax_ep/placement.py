"""Which process and device holds which layers, experts, heads, vocabulary columns and rows.

Computed from the configs, the sharding table and the mesh's ordering rule alone: no
arrays, no compiling, and any devices will do (real ones, or `virtual_devices` to lay
out 8 hosts of 8 on a laptop). `jax-ep generate --dry_run` prints it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from jax.sharding import PartitionSpec as P

from jax_ep import mesh as mesh_lib
from jax_ep import sharding
from jax_ep.config import DeploymentConfig, ModelConfig, count
from jax_ep.mesh import AXES


class VirtualDevice(NamedTuple):
  """Stands for a device of a job that is not running (what device_grid needs)."""

  id: int
  process_index: int
  platform: str = "virtual"


def virtual_devices(num_processes: int, devices_per_process: int) -> list[VirtualDevice]:
  """Devices of `num_processes` hosts of `devices_per_process` each, numbered as JAX does."""
  return [VirtualDevice(p * devices_per_process + i, p)
          for p in range(num_processes) for i in range(devices_per_process)]


@dataclasses.dataclass(frozen=True)
class Row:
  """One device's share. Ranges index the model's global axes (layers [L], experts [E]
  of each of those layers, expert MLP columns [F], heads [H], vocabulary [V], batch [B])."""

  process: int
  device: int
  stage: int
  expert: int
  tp: int
  layers: range
  experts: range
  mlp_cols: range
  heads: range
  vocab: range
  batch_rows: range | None  # None when no batch was given


def shard_range(spec: P, dim: int, size: int, coords: dict[str, int],
                axis_sizes: dict[str, int]) -> range:
  """The block of a `size`-long dimension `dim` that the device at `coords` holds under
  `spec`: mesh axes of one entry split it major to minor, as NamedSharding does."""
  entry = spec[dim] if dim < len(spec) else None
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  shards, index = 1, 0
  for a in axes:
    shards *= axis_sizes[a]
    index = index * axis_sizes[a] + coords[a]
  block = size // shards
  return range(index * block, (index + 1) * block)


def rows(cfg: ModelConfig, dep: DeploymentConfig, devices, batch: int | None = None) -> list[Row]:
  """One Row per device of `dep`'s mesh over `devices`, in mesh order.

  Raises ConfigError (from the configs or the mesh) if the layout cannot exist.
  """
  dep.check_model(cfg)
  if batch is not None:
    dep.check_batch(batch)
  grid = mesh_lib.device_grid(dep, devices)
  table = sharding.table_for(dep)
  sizes = dict(zip(AXES, dep.mesh_shape, strict=True))
  out = []
  for s in range(dep.stages):
    for e in range(dep.expert):
      for t in range(dep.tp):
        at = dict(zip(AXES, (s, e, t), strict=True))

        def block(spec, dim, size, at=at):
          return shard_range(spec, dim, size, at, sizes)

        d = grid[s, e, t]
        out.append(Row(
            process=d.process_index, device=d.id, stage=s, expert=e, tp=t,
            layers=block(table.norm_LxD, 0, cfg.num_layers),
            experts=block(table.expert_in_LxExDxF, 1, cfg.num_experts),
            mlp_cols=block(table.expert_in_LxExDxF, 3, cfg.mlp_dim),
            heads=block(table.attn_in_LxDxHxDh, 2, cfg.num_heads),
            vocab=block(table.unembed_DxV, 1, cfg.vocab_size),
            batch_rows=None if batch is None else block(table.tokens_BxT, 0, batch)))
  return out


def _span(r: range, size: int) -> str:
  if len(r) == size:
    return "all"
  return str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def format_table(cfg: ModelConfig, dep: DeploymentConfig, table: list[Row]) -> str:
  """`rows` as text: a header, one line per device, and how the groups sit on processes."""
  header = ["process", "device", "stage", "expert", "tp", f"layers/{cfg.num_layers}",
            f"experts/{cfg.num_experts}", f"mlp cols/{cfg.mlp_dim}", f"heads/{cfg.num_heads}",
            f"vocab/{cfg.vocab_size}"]
  batch = max((r.batch_rows.stop for r in table if r.batch_rows is not None), default=None)
  if batch is not None:
    header.append(f"batch rows/{batch}")
  lines = [header]
  for r in table:
    lines.append([str(v) for v in (r.process, r.device, r.stage, r.expert, r.tp)] + [
        _span(r.layers, cfg.num_layers), _span(r.experts, cfg.num_experts),
        _span(r.mlp_cols, cfg.mlp_dim), _span(r.heads, cfg.num_heads),
        _span(r.vocab, cfg.vocab_size)] + ([] if batch is None else [_span(r.batch_rows, batch)]))
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
          for line in lines]
  return "\n".join(text + [summary(dep, table)])


def summary(dep: DeploymentConfig, table: list[Row]) -> str:
  """How many processes a tp group and a stage span at most (mesh.py's ordering rule)."""
  def most(key):
    groups: dict = {}
    for r in table:
      groups.setdefault(key(r), set()).add(r.process)
    return max(len(g) for g in groups.values())

  return (f"{count(len(table), 'device')} on {count(most(lambda r: 0), 'process')}; a tp "
          f"group ({count(dep.tp, 'device')}) spans at most "
          f"{count(most(lambda r: (r.stage, r.expert)), 'process')}, a stage "
          f"({count(dep.expert * dep.tp, 'device')}: its layers' experts) at most "
          f"{most(lambda r: r.stage)}.")
