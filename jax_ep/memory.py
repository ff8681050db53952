"""Bytes per device of a deployment before anything is allocated: the memory planner.

Pure arithmetic over the configs; no device is touched, so `jax-ep plan` runs anywhere.

  * weights and the KV cache are exact: the sharding table (sharding.py) applied to the
    abstract parameters (jax.eval_shape of the model) and to the abstract cache, each
    leaf's shard shape from its PartitionSpec and the mesh (tests compare them with the
    shards Engine allocates and with XLA's argument bytes);
  * the ring state and prompt tokens are exact too;
  * activations, the exchange buffers and the expert kernel's buffers are counted from
    the shapes the code builds in the larger of a prefill chunk and a decode micro-step
    (one layer's working set: XLA frees a layer's buffers before the next);
  * compile-time temporaries are what XLA's buffer assignment holds beyond those: copies
    of loop carries, fusion outputs, layout changes. They are estimated as
    TEMPORARIES_FACTOR x the counted working set, a factor calibrated against
    `compiled.memory_analysis().temp_size_in_bytes` of the real prefill and decode
    programs on CPU (tests/memory_test.py keeps the estimate above XLA's figure and
    within a small multiple of it). `jax-ep plan --compile` prints XLA's own figures.

Every device of a deployment holds the same shapes (check_model makes every split even),
so one column of bytes holds for all. Whether it fits a device: memory_budget.py; which
device holds what, and XLA's own figures: memory_report.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jax_ep import sharding
from jax_ep.config import ConfigError, DeploymentConfig, ModelConfig, count
from jax_ep.kernels import grouped_matmul
from jax_ep.mesh import AXES
from jax_ep.perf import per_device
from jax_ep.routing import rows_per_destination

# XLA's temporaries beyond the working set counted here, as a multiple of it (see the
# module docstring; tests/memory_test.py checks it against memory_analysis on CPU).
TEMPORARIES_FACTOR = 0.6

PREFILL_ROWS_PER_DEVICE = 32768  # as decode.PREFILL_ROWS_PER_DEVICE (that module imports jax
# programs; this one must not need them), checked equal in tests/memory_test.py


# --- exact: shards of the parameters and the cache ---------------------------------------


def _axis_sizes(dep: DeploymentConfig) -> dict[str, int]:
  return dict(zip(AXES, dep.mesh_shape, strict=True))


def shard_shape(shape, spec, dep: DeploymentConfig) -> tuple[int, ...]:
  """The shape one device holds of an array of `shape` laid out by PartitionSpec `spec`."""
  sizes = _axis_sizes(dep)
  out = []
  for i, n in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    split = math.prod(sizes[a] for a in axes)
    if n % split:
      raise ConfigError(f"dimension {i} of {tuple(shape)} does not split over {axes} ({split})")
    out.append(n // split)
  return tuple(out)


def abstract_params(cfg: ModelConfig):
  """The model's canonical parameters (nnx.State, layers stacked [L, ...]) as shapes."""
  from flax import nnx

  from jax_ep.model import Transformer

  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[1]


def _group(name: str) -> str:
  if name.startswith(("w_up", "w_down")):  # w_up_ExDxF, w_up_gate_ExDx2F, w_down_ExFxD
    return "experts"
  if name.startswith("w_router"):
    return "router"
  if name.startswith(("wq", "wk", "wv", "wo")):
    return "attention"
  return {"embed_VxD": "embedding", "unembed_DxV": "unembedding"}.get(name, "norms")


def weight_bytes(cfg: ModelConfig, dep: DeploymentConfig) -> dict[str, int]:
  """Bytes of parameters one device holds, by group (experts, attention, router, ...).

  The canonical layout's shards: stage splits the stacked L axis in the same blocks as
  the deployment layout's [stages, ...] arrays (Engine.to_layout), so the bytes agree.
  """
  return dict(_weight_bytes(cfg, dep))


@functools.lru_cache(maxsize=64)  # searches for a batch or deployment that fits ask often
def _weight_bytes(cfg: ModelConfig, dep: DeploymentConfig) -> tuple[tuple[str, int], ...]:
  state = abstract_params(cfg)
  specs = sharding.param_specs(state, sharding.table_for(dep))
  out: dict[str, int] = {}
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(state), spec_leaves,
                                strict=True):
    name = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    name = next(n for n in reversed(name) if n != "value")
    shape = shard_shape(leaf.shape, spec, dep)
    key = _group(name)
    out[key] = out.get(key, 0) + math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return tuple(out.items())


def cache_len(max_len: int) -> int:
  """The allocated cache length: as decode.cache_len (max_len rounded up to 16)."""
  return -(-max_len // 16) * 16


def kv_cache_bytes(cfg: ModelConfig, dep: DeploymentConfig, batch: int, length: int) -> int:
  """Keys and values one device holds: its layers x its rows x its heads x `length`."""
  shape = (dep.stages, batch, cfg.num_heads, length, cfg.head_dim)
  local = shard_shape(shape, sharding.table_for(dep).kv_LxBxHxSxDh, dep)
  return 2 * (cfg.num_layers // dep.stages) * math.prod(local) * cfg.bytes_per_param


def state_bytes(cfg: ModelConfig, dep: DeploymentConfig, batch: int, prompt_len: int) -> int:
  """Prompt tokens (split over expert) and the ring's state: tokens and positions
  (replicated), the in-flight activations [S, B/G, D] over (stage, expert)."""
  tokens = batch // dep.expert * prompt_len * 4
  inflight = batch // dep.groups // dep.expert * cfg.model_dim * cfg.bytes_per_param
  return tokens + 2 * batch * 4 + inflight


# --- counted: the working set of a prefill chunk and of a decode micro-step ----------------


@dataclasses.dataclass(frozen=True)
class WorkingSet:
  """One layer's buffers at the busiest phase on one device. Attention's and the MoE's
  transients are not live at the same time (XLA frees each phase's buffers), so the
  peak is the carries plus the larger of the two (or of the head)."""

  carries: int  # prefill's pipeline carries [M, b, T, D] and the layer's residual stream
  attention: int  # q, k, v and their float32 rotary copies; scores and probabilities
  exchange: int  # routing ranks, send / receive / compacted / returned rows, combine's picks
  expert_kernel: int  # the grouped MLP's hidden [rows, F] (and split-K partials)
  head: int  # the gathered rows and float32 logits of this device's vocabulary columns

  @property
  def total(self) -> int:
    return self.carries + max(self.attention, self.exchange + self.expert_kernel, self.head)


def _kernel_impl(dep: DeploymentConfig, platform: str, d: int, f: int, swiglu: bool) -> str:
  if dep.kernels != "auto":
    return dep.kernels
  if platform == "cpu" or grouped_matmul.mlp_supports(d, f, swiglu, dep.expert_blocks,
                                                      pairs=swiglu):
    return "xla"
  return "pallas"


def _phase(cfg: ModelConfig, dep: DeploymentConfig, rows: int, positions: int, length: int,
           head_rows: int, platform: str) -> WorkingSet:
  """One layer's buffers for `rows` sequences x `positions` new tokens on one device
  (rows already one micro-batch or one decode group), attending over `length` cached
  positions, and the head over `head_rows` rows."""
  b = cfg.bytes_per_param
  d, heads = cfg.model_dim, cfg.num_heads // dep.tp
  hk = heads * cfg.head_dim
  tokens = rows * positions
  split = dep.placement == "ep" and dep.tp > 1
  moe_tokens = max(-(-tokens // dep.tp) if split else tokens, 1)
  p = dep.expert_shards
  e_local = cfg.num_experts // p
  f = cfg.mlp_dim // dep.tp if dep.placement == "tp" else cfg.mlp_dim
  w = rows_per_destination(moe_tokens, cfg.top_k, e_local, p, dep.capacity_factor, dep.dropless)
  r = p * w
  # Attention: q, k, v in the model's dtype and their float32 rotary copies; scores and
  # probabilities over the cache and the new tokens in float32, the probabilities cast.
  scores = rows * heads * positions * (length + positions)
  attention = 3 * tokens * hk * (b + 4) + scores * (2 * 4 + b) + tokens * hk * b
  residual = 4 * tokens * d * b  # the layer's input, normed input, output, residual sum
  # Routing: the float32 router logits and the one-hot ranks over destinations and experts.
  picks = moe_tokens * cfg.top_k
  routing = moe_tokens * cfg.num_experts * 4 + 3 * picks * (p + cfg.num_experts) * 4
  head = head_rows * d * b + head_rows * (cfg.vocab_size // (dep.expert * dep.tp)) * 4
  exchange = 5 * r * d * b + picks * d * 4  # send, recv, compacted, out, back; picks f32
  swiglu = cfg.mlp_kind == "swiglu"
  impl = _kernel_impl(dep, platform, d, f, swiglu)
  gates = 2 if swiglu else 1  # SwiGLU's up weight is [D, 2F]: up and gate interleaved
  if impl == "xla":
    # ragged_dot: XLA expands it to a masked dense product over the local experts
    # (float32 [El, R, F] before the masked sum; kernels/grouped_matmul.py), then the
    # activation in float32 and the cast; the down product likewise over [El, R, D].
    kernel = e_local * r * (gates * f + d) * 4 + r * f * (gates * 4 + 4 + b)
  else:  # the hidden stays padded between the two products; split-K partials in float32
    up, down = grouped_matmul.mlp_blocks(d, f, swiglu, dep.expert_blocks, pairs=swiglu)
    pad = r + max(up.block_m, down.block_m)
    split_up = grouped_matmul.split_for(picks, (e_local, d, gates * f), up)
    split_down = grouped_matmul.split_for(picks, (e_local, f, d), down)
    kernel = pad * f * b + (split_up * pad * f * 4 * gates if split_up > 1 else 0) + (
        split_down * pad * d * 4 if split_down > 1 else 0) + pad * d * b
  return WorkingSet(carries=residual, attention=attention, exchange=exchange + routing,
                    expert_kernel=kernel, head=head)


def prefill_chunk(cfg: ModelConfig, dep: DeploymentConfig, batch: int, prompt_len: int) -> int:
  """Positions of the largest prefill chunk (decode.prefill_chunks' first chunk)."""
  if dep.prefill_chunk:
    return min(dep.prefill_chunk, prompt_len)
  one = dataclasses.replace(dep, decode_groups=1)
  lay = per_device.layout(cfg, one, batch)
  per_position = lay.ep_size * lay.send_rows
  return min(prompt_len, max(1, PREFILL_ROWS_PER_DEVICE // per_position))


def working_set(cfg: ModelConfig, dep: DeploymentConfig, batch: int, prompt_len: int,
                length: int, platform: str = "gpu") -> WorkingSet:
  """The larger (by total) of a prefill chunk's and a decode micro-step's working sets."""
  rows = batch // dep.expert
  chunk = prefill_chunk(cfg, dep, batch, prompt_len)
  mb = rows // dep.microbatches
  pre = _phase(cfg, dep, mb, chunk, length, batch, platform)
  # Prefill's pipeline carries every micro-batch's input and output [M, b, T, D], and the
  # activations in flight.
  carries = (2 * rows + mb) * chunk * cfg.model_dim * cfg.bytes_per_param
  pre = dataclasses.replace(pre, carries=pre.carries + carries)
  group = rows // dep.groups
  dec = _phase(cfg, dep, group, 1, length, group * dep.expert * dep.head_gather, platform)
  return max(pre, dec, key=lambda ws: ws.total)


# --- the footprint -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Bytes one device of `dep` needs for `batch` sequences and a cache of `length`."""

  cfg: ModelConfig
  dep: DeploymentConfig
  batch: int
  prompt_len: int
  max_len: int  # cache positions asked for (prompt + new tokens, at most max_seq_len)
  length: int  # allocated: max_len rounded up to 16 (decode.cache_len)
  weights: dict  # group -> bytes
  kv_cache: int
  state: int
  work: WorkingSet
  temporaries: int

  @property
  def weight_total(self) -> int:
    return sum(self.weights.values())

  @property
  def total(self) -> int:
    return self.weight_total + self.kv_cache + self.state + self.work.total + self.temporaries

  def rows(self) -> list[tuple[str, int, bool]]:
    """(what, bytes, counted in the total). Of attention, the MoE's buffers and the head
    only the largest counts: they are not live together."""
    w = self.work
    moe = w.exchange + w.expert_kernel
    live = max(("attention", w.attention), ("moe", moe), ("head", w.head), key=lambda kv: kv[1])[0]
    rows = [(f"weights: {k}", v, True)
            for k, v in sorted(self.weights.items(), key=lambda kv: -kv[1])]
    return rows + [
        (f"KV cache ({self.batch // self.dep.expert} of the {self.batch} sequences x "
         f"{count(self.cfg.num_layers // self.dep.stages, 'layer')} x "
         f"{count(self.length, 'position')})",
         self.kv_cache, True),
        ("prompt tokens and ring state", self.state, True),
        ("activations: pipeline carries and residual stream", w.carries, True),
        ("activations: attention (q, k, v, scores)", w.attention, live == "attention"),
        ("exchange buffers (routing, send, receive, return)", w.exchange, live == "moe"),
        ("expert kernel buffers (hidden rows x F)", w.expert_kernel, live == "moe"),
        ("activations: head (gathered rows, logits)", w.head, live == "head"),
        ("compile-time temporaries (estimate)", self.temporaries, True),
        ("total per device", self.total, True),
    ]


def footprint(cfg: ModelConfig, dep: DeploymentConfig, batch: int, prompt_len: int,
              max_len: int, platform: str = "gpu") -> Footprint:
  """What decode.generate of `batch` prompts of `prompt_len` tokens with a cache of
  `max_len` positions needs on each device of `dep`, on "gpu" or "cpu" (which expert
  kernel runs). Raises ConfigError if the model or batch cannot be laid out on `dep`."""
  dep.check_model(cfg)
  dep.check_batch(batch)
  length = cache_len(max_len)
  work = working_set(cfg, dep, batch, prompt_len, length, platform)
  return Footprint(cfg=cfg, dep=dep, batch=batch, prompt_len=prompt_len, max_len=max_len,
                   length=length,
                   weights=weight_bytes(cfg, dep),
                   kv_cache=kv_cache_bytes(cfg, dep, batch, length),
                   state=state_bytes(cfg, dep, batch, prompt_len), work=work,
                   temporaries=int(TEMPORARIES_FACTOR * work.total))
