"""What a deployment puts on each device and what its compiled programs contain.

For the notebooks and for anyone checking a layout by hand: read from the arrays'
shardings and the compiled HLO, so they show what jax did, not what the configs intend.
"""

from __future__ import annotations

import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import decode
from jax_ep.engine import Engine

# The collectives jax_ep's programs are made of (jax_ep/ep.py), by their HLO op names.
COLLECTIVES = ("all-to-all", "collective-permute", "all-reduce", "all-gather")
# "%x = f32[2,8]{1,0} all-to-all(" or, for a tuple result, "...) all-gather-start(": the op
# follows the result's type. Async pairs (op-start, op-done) count once, by their start.
_OP = re.compile(r"= (.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Parts of a jax op_name that say where jax put the op, not which phase of jax_ep it is.
_PLUMBING = re.compile(r"^(jit\(.*\)|shard_map|while|body|cond|closed_call|pjit|checkpoint)$")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a compiled program."""

  op: str  # HLO op, one of COLLECTIVES
  result: str  # its result type, e.g. "f32[1,2,64]{2,1,0}" (a tuple for several operands)
  scope: str  # jax_ep's named scopes around it, e.g. "layer0/dispatch" ("" outside any)
  primitive: str  # the jax primitive it came from (all_to_all, psum, ppermute, all_gather)


def collectives(hlo_text: str) -> list[Collective]:
  """The collective instructions of an HLO module's text, in program order.

  An instruction inside a loop body is listed once, however many times the loop runs.
  """
  out = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    name = _OP_NAME.search(line)
    parts = name.group(1).split("/") if name else []
    primitive = parts.pop() if parts else ""
    scope = "/".join(p for p in parts if not _PLUMBING.match(p))
    out.append(Collective(m.group(2), m.group(1), scope, primitive))
  return out


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective instructions in an HLO module's text, by op (each of COLLECTIVES, 0 if absent)."""
  found = collections.Counter(c.op for c in collectives(hlo_text))
  return {op: found[op] for op in COLLECTIVES}


# The same in a lowered (StableHLO) program: op, then its groups' shape, then operand types.
_LOWERED_OP = re.compile(r'"stablehlo\.(all_reduce|all_to_all|collective_permute|all_gather)"')
_GROUPS = re.compile(r"(?:replica_groups|source_target_pairs) = dense<.*?> : "
                     r"tensor<(\d+)x(\d+)xi64>")
_OPERAND = re.compile(r": \(tensor<([0-9x]*)[a-z]+\d*>")


def lowered_collectives(text: str) -> list[tuple[str, int, tuple[int, ...]]]:
  """(op, devices per group, first operand's shape) of each collective of a lowered
  program's StableHLO text (`jitted.lower(...).as_text()`), before XLA rewrites them; ops
  by their jax names (all_to_all, collective_permute, all_reduce, all_gather)."""
  found = []
  for m in _LOWERED_OP.finditer(text):
    rest = text[m.end():]
    groups, operand = _GROUPS.search(rest), _OPERAND.search(rest)
    shape = tuple(int(d) for d in operand.group(1).split("x") if d)
    found.append((m.group(1), int(groups.group(2)), shape))
  return found


def bytes_per_device(tree) -> dict[int, int]:
  """Bytes of each device's shards of a pytree of jax arrays: {device id: bytes} (the
  devices of this process)."""
  out = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] += shard.data.nbytes
  return dict(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class DeviceShare:
  """What one device holds of a model laid out by an Engine."""

  device: int  # jax device id
  stage: int  # its position in the (stage, expert, tp) mesh
  expert: int
  tp: int
  layers: tuple[int, ...]  # the layers whose attention and experts it holds
  experts: range  # expert ids of each of those layers
  mlp: range  # columns of each expert's MLP hidden (all F unless placement="tp")
  heads: range  # attention heads
  vocab: range  # unembedding columns (vocabulary ids) it scores
  param_bytes: int


def _span(index: tuple[slice, ...], dim: int, size: int) -> range:
  return range(*index[dim].indices(size)[:2])


def _mlp_span(index: tuple[slice, ...], size: int, pairs: bool) -> range:
  """The MLP features F a device's up weight holds (with pairs, 2F columns: 2 a feature)."""
  span = _span(index, 3, size)
  return range(span.start // 2, span.stop // 2) if pairs else span


def _leaf(params, *path):
  node = params
  for key in path:
    node = node[key]
  (array,) = jax.tree.leaves(node)  # an nnx Variable holds one array
  return array


def device_shares(engine: Engine, params) -> list[DeviceShare]:
  """One DeviceShare per device of engine's mesh, read from `params`' shardings.

  `params` are in the engine's layout (Engine.init_params or Engine.place_params).
  """
  coords = {d.id: tuple(int(i) for i in idx) for idx, d in np.ndenumerate(engine.mesh.devices)}
  moe = params["layers"][0]["moe"]
  pairs = "w_up_gate_ExDx2F" in moe  # SwiGLU: [stages, E, D, 2F], F's pairs interleaved
  up = _leaf(moe, "w_up_gate_ExDx2F" if pairs else "w_up_ExDxF")  # [stages, E, D, F or 2F]
  wq = _leaf(params, "layers", 0, "attn", "wq_DxHxDh")  # [stages, D, H, Dh]
  unembed = _leaf(params, "unembed_DxV")
  nbytes = bytes_per_device(params)
  maps = [a.sharding.devices_indices_map(a.shape) for a in (up, wq, unembed)]
  local = engine.local_layers
  rows = []
  for device in sorted(maps[0], key=lambda d: d.id):
    up_i, wq_i, un_i = (m[device] for m in maps)
    stage = _span(up_i, 0, up.shape[0]).start
    rows.append(DeviceShare(
        device=device.id, stage=coords[device.id][0], expert=coords[device.id][1],
        tp=coords[device.id][2], layers=tuple(range(stage * local, (stage + 1) * local)),
        experts=_span(up_i, 1, up.shape[1]), mlp=_mlp_span(up_i, up.shape[3], pairs),
        heads=_span(wq_i, 2, wq.shape[2]), vocab=_span(un_i, 1, unembed.shape[1]),
        param_bytes=nbytes.get(device.id, 0)))
  return rows


def _ids(r: range, size: int) -> str:
  if len(r) == size:
    return f"all {size}"
  return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"


def format_shares(engine: Engine, shares: list[DeviceShare]) -> str:
  """A markdown table of device_shares(): one row per device."""
  cfg = engine.cfg
  lines = ["| device | stage, expert, tp | layers | experts of each | MLP columns | heads | "
           "vocabulary | parameter KiB |", "| ---: | --- | --- | --- | --- | --- | --- | ---: |"]
  for s in shares:
    layers = ", ".join(map(str, s.layers)) if len(s.layers) < cfg.num_layers else "all"
    lines.append(
        f"| {s.device} | {s.stage}, {s.expert}, {s.tp} | {layers} | "
        f"{_ids(s.experts, cfg.num_experts)} | {_ids(s.mlp, cfg.mlp_dim)} | "
        f"{_ids(s.heads, cfg.num_heads)} | {_ids(s.vocab, cfg.vocab_size)} | "
        f"{s.param_bytes / 1024:,.0f} |")
  return "\n".join(lines)


def compile_entry_points(engine: Engine, params, batch: int, prompt_len: int, max_len: int,
                         temperature: float = 0.0) -> dict[str, jax.stages.Compiled]:
  """The prefill and the steady decode program of decode.generate, compiled for these shapes.

  "prefill": the whole prompt [batch, prompt_len] in one chunk, sampling the first new
  token; "decode": one decode call, a ring period of micro-steps (one token for every
  sequence). Both on a cache of decode.cache_len(max_len) positions. jax keeps what it
  compiled, so a later decode.generate with these shapes and temperature reuses them; it
  compiles only its first decode call, which also fills the ring.
  """
  cache = engine.abstract_cache(batch, decode.cache_len(max_len))
  tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32,
                                sharding=engine.tokens_sharding())
  key = jax.random.key(0)
  state = engine.abstract_decode_state(batch, decode.cache_len(max_len))
  return {
      "prefill": engine.prefill_program(temperature, sample=True).lower(
          params, cache, tokens, jnp.int32(0), key).compile(),
      "decode": engine.decode_program(batch, engine.dep.ring_period, temperature).lower(
          params, state, key).compile(),
  }
