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
so one column of bytes holds for all; `holdings` says what each device's shards are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import numpy as np
from jax.sharding import PartitionSpec

from jax_ep import sharding
from jax_ep.config import ConfigError, DeploymentConfig, ModelConfig
from jax_ep.kernels import grouped_matmul
from jax_ep.mesh import AXES, EXPERT, STAGE, TP
from jax_ep.perf import per_device
from jax_ep.routing import rows_per_destination

GiB = 1 << 30
MiB = 1 << 20

# Device memory as nvidia-smi's memory.total reports it (MiB); the allocator gets
# `mem_fraction` of it (jax preallocates 75% by default; XLA_PYTHON_CLIENT_MEM_FRACTION or
# XLA_CLIENT_MEM_FRACTION changes that). On a GPU the allocator's own limit
# (Device.memory_stats()["bytes_limit"]) is used instead of this table.
DEVICE_MEMORY_MIB = {
    "h100": 81559,  # H100 80GB HBM3 (SXM)
    "h200": 143771,  # H200 141GB HBM3e (KINDS.md: nvidia-smi on the lent H200s)
    "a100": 81920,  # A100 80GB
    "a100_80": 81920,
    "a100_40": 40960,
}
DEFAULT_MEM_FRACTION = 0.75

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
  if name.startswith(("w_up", "w_down", "w_gate")):
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


def _kernel_impl(dep: DeploymentConfig, platform: str, d: int, f: int) -> str:
  if dep.kernels != "auto":
    return dep.kernels
  if platform == "cpu" or grouped_matmul.mlp_supports(d, f):
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
  impl = _kernel_impl(dep, platform, d, f)
  gates = 2 if cfg.mlp_kind == "swiglu" else 1
  if impl == "xla":
    # ragged_dot: XLA expands it to a masked dense product over the local experts
    # (float32 [El, R, F] before the masked sum; kernels/grouped_matmul.py), then the
    # activation in float32 and the cast; the down product likewise over [El, R, D].
    kernel = e_local * r * (f + d) * 4 + r * f * (gates * 4 + 4 + b)
  else:  # the hidden stays padded between the two products; split-K partials in float32
    pad = r + grouped_matmul.DEFAULT_BLOCKS.block_m
    up = (e_local, d, f)
    split_up = grouped_matmul.split_for(picks, up, grouped_matmul.DEFAULT_BLOCKS)
    split_down = grouped_matmul.split_for(picks, (e_local, f, d), grouped_matmul.DEFAULT_BLOCKS)
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
  dec = _phase(cfg, dep, group, 1, length, group * dep.expert, platform)
  return max(pre, dec, key=lambda ws: ws.total)


# --- the plan ----------------------------------------------------------------------------


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
        (f"KV cache ({self.batch} sequences x {self.length} positions)", self.kv_cache, True),
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


# --- what a device can hold --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budget:
  """Bytes each device may use or, `shared` (CPU devices: one host's memory), bytes that
  the devices of a deployment share: their footprints add up."""

  bytes: float
  source: str
  shared: bool = False
  name: str = "device"


def mem_fraction() -> float:
  """The share of a GPU's memory jax's allocator takes (its environment variables)."""
  for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    if os.environ.get(var):
      return float(os.environ[var])
  return DEFAULT_MEM_FRACTION


def host_memory_bytes() -> int:
  """Host memory a process can still take: MemAvailable, or the cgroup limit if lower."""
  avail = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
  except OSError:
    pass
  if avail is None:
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        limit = f.read().strip()
      if limit.isdigit() and int(limit) < avail:
        avail = int(limit)
    except OSError:
      continue
  return avail


def budget_for_kind(kind: str, num_devices: int, fraction: float | None = None) -> Budget:
  """A device kind by name (DEVICE_MEMORY_MIB, or "cpu": this host's memory)."""
  kind = kind.lower()
  if kind == "cpu":
    host = host_memory_bytes()
    return Budget(host, "this host's available memory, shared by its CPU devices",
                  shared=True, name="cpu")
  if kind not in DEVICE_MEMORY_MIB:
    raise ConfigError(f"--device_kind={kind!r} is unknown; use cpu or one of "
                      f"{sorted(DEVICE_MEMORY_MIB)}.")
  fraction = mem_fraction() if fraction is None else fraction
  if not 0 < fraction <= 1:
    raise ConfigError(f"--mem_fraction={fraction} must be in (0, 1].")
  total = DEVICE_MEMORY_MIB[kind] * MiB
  return Budget(total * fraction, f"{kind}: {total / GiB:.1f} GiB x memory fraction "
                f"{fraction:g}", name=kind)


def budget_for_devices(devices) -> Budget:
  """What the devices present can hold: the allocator's limit on a GPU, host memory on
  the CPU."""
  d = devices[0]
  if d.platform == "cpu":
    return budget_for_kind("cpu", len(devices))
  stats = d.memory_stats() if hasattr(d, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return Budget(free, f"{d.device_kind}: allocator limit {stats['bytes_limit'] / GiB:.1f} GiB"
                  f", {stats.get('bytes_in_use', 0) / GiB:.1f} GiB in use", name=d.device_kind)
  kind = next((k for k in DEVICE_MEMORY_MIB if k in d.device_kind.lower().replace(" ", "")),
              None)
  if kind is None:
    return Budget(math.inf, f"{d.device_kind}: memory unknown (not checked)", name=d.device_kind)
  return budget_for_kind(kind, len(devices))


def need_bytes(fp: Footprint, budget: Budget, held: float = 0.0) -> float:
  """Bytes `fp` takes from `budget` (per device, or the whole host when shared), with
  `held` bytes per device already taken (weights of another deployment)."""
  per_device = fp.total + held
  return per_device * fp.dep.num_devices if budget.shared else per_device


def fits(fp: Footprint, budget: Budget, held: float = 0.0) -> bool:
  """Whether `fp`, beside `held` bytes already on each of its devices, fits `budget`."""
  return need_bytes(fp, budget, held) <= budget.bytes


def _need(fp: Footprint, budget: Budget) -> str:
  if budget.shared:
    each = f" ({fp.dep.num_devices} devices x {fp.total / GiB:.2f} GiB)" \
        if fp.dep.num_devices > 1 else ""
    return f"{need_bytes(fp, budget) / GiB:.2f} GiB of host memory{each}"
  return f"{fp.total / GiB:.2f} GiB per device"


def _have(budget: Budget) -> str:
  if budget.shared:
    return f"{budget.bytes / GiB:.2f} GiB available on this host"
  return f"{budget.bytes / GiB:.2f} GiB usable per device"


def largest_batch(cfg, dep, batch, prompt_len, max_len, budget, platform) -> int | None:
  """The largest valid batch <= `batch` whose footprint fits (of the multiples of
  dep.min_batch, halving), or None."""
  step = dep.min_batch
  b = batch // step * step
  while b >= step:
    if fits(footprint(cfg, dep, b, prompt_len, max_len, platform), budget):
      return b
    b = b // 2 // step * step if b > 2 * step else b - step
  return None


def smallest_fitting(cfg, batch, prompt_len, max_len, budget, platform, candidates):
  """(name, deployment, footprint) of the candidate with fewest devices that fits."""
  for name, dep in sorted(candidates.items(), key=lambda kv: kv[1].num_devices):
    try:
      fp = footprint(cfg, dep, batch, prompt_len, max_len, platform)
    except ConfigError:
      continue
    if fits(fp, budget):
      return name, dep, fp
  return None


def check(fp: Footprint, budget: Budget, *, candidates=None, platform: str = "gpu",
          what: str = "") -> None:
  """Raises ConfigError if `fp` does not fit `budget`, naming the smallest deployment
  (among `candidates`, name -> DeploymentConfig) and the largest batch that fit."""
  if fits(fp, budget):
    return
  cfg, dep = fp.cfg, fp.dep
  biggest = max(fp.rows()[:-1], key=lambda row: row[1])
  lines = [f"{what or 'this run'} does not fit: {dep.describe()} with batch {fp.batch} needs "
           f"{_need(fp, budget)} ({biggest[0]}: {biggest[1] / GiB:.2f} GiB), "
           f"{_have(budget)} ({budget.source})."]
  b = largest_batch(cfg, dep, fp.batch, fp.prompt_len, fp.max_len, budget, platform)
  if b:
    lines.append(f"--batch={b} fits this deployment.")
  if candidates and not budget.shared:
    found = smallest_fitting(cfg, fp.batch, fp.prompt_len, fp.max_len, budget, platform,
                             candidates)
    if found:
      name, d, f = found
      lines.append(f"The smallest deployment that fits batch {fp.batch}: --deployment={name} "
                   f"({d.num_devices} devices of {f.total / GiB:.2f} GiB).")
  if len(lines) == 1:
    lines.append("Neither a smaller batch nor another deployment fits: use a smaller model "
                 "(--config) or devices with more memory; `jax-ep plan` prints the table.")
  raise ConfigError(" ".join(lines))


# --- which device holds what -------------------------------------------------------------


def holdings(cfg: ModelConfig, dep: DeploymentConfig, batch: int) -> list[dict]:
  """One row per device (mesh order: tp fastest, then expert, then stage; mesh.py): its
  coordinates and the ranges of layers, experts of each layer, MLP columns, heads,
  vocabulary columns and sequences that it holds. Ranges are [start, stop)."""
  dep.check_model(cfg)
  per_stage = cfg.num_layers // dep.stages
  e_local = cfg.num_experts // dep.expert_shards
  heads = cfg.num_heads // dep.tp
  vocab = cfg.vocab_size // (dep.expert * dep.tp)
  rows = batch // dep.expert
  ffn_tp = dep.placement == "tp" and dep.tp > 1
  f = cfg.mlp_dim // dep.tp if ffn_tp else cfg.mlp_dim
  out = []
  for i in range(dep.num_devices):
    s, rest = divmod(i, dep.expert * dep.tp)
    e, t = divmod(rest, dep.tp)
    shard = e * dep.tp + t if dep.placement == "ep" else e
    out.append({
        "device": i, STAGE: s, EXPERT: e, TP: t,
        "layers": (s * per_stage, (s + 1) * per_stage),
        "experts": (shard * e_local, (shard + 1) * e_local),
        "mlp_columns": (t * f, (t + 1) * f) if ffn_tp else (0, cfg.mlp_dim),
        "heads": (t * heads, (t + 1) * heads),
        "vocab": ((e * dep.tp + t) * vocab, (e * dep.tp + t + 1) * vocab),
        "sequences": (e * rows, (e + 1) * rows),
    })
  return out


def _range(r) -> str:
  a, b = r
  return f"{a}" if b == a + 1 else f"{a}-{b - 1}"


def format_holdings(cfg: ModelConfig, dep: DeploymentConfig, batch: int) -> str:
  rows = holdings(cfg, dep, batch)
  head = "| device | stage, expert, tp | layers | experts (each layer) | MLP columns | heads | " \
         "vocabulary | sequences |"
  lines = [head, "| ---: | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['device']} | {r[STAGE]}, {r[EXPERT]}, {r[TP]} | {_range(r['layers'])} | "
                 f"{_range(r['experts'])} | {_range(r['mlp_columns'])} | {_range(r['heads'])} | "
                 f"{_range(r['vocab'])} | {_range(r['sequences'])} |")
  return "\n".join(lines)


def format_footprint(fp: Footprint, budget: Budget | None = None) -> str:
  lines = ["| per device | GiB | bytes |", "| --- | ---: | ---: |"]
  lines += [f"| {k} | {v / GiB:.3f} | {v:,} |" if counted else
            f"| {k} (not live with the largest of these three; not added) | ({v / GiB:.3f}) | "
            f"({v:,}) |" for k, v, counted in fp.rows()]
  if budget is not None:
    ok = fits(fp, budget)
    lines += ["", f"Budget: {_have(budget)} ({budget.source}); needs {_need(fp, budget)}: "
              + ("fits." if ok else "DOES NOT FIT.")]
  return "\n".join(lines)



# --- measured: XLA's buffer assignment of the real programs ------------------------------


def compiled_memory(engine, batch: int, prompt_len: int, max_len: int) -> dict:
  """XLA's per-device bytes of generate's programs, compiled from shapes (nothing is
  allocated): {"prefill" | "decode": {"argument", "output", "alias", "temp"}}.

  The prefill program is the largest chunk's (decode.prefill_chunks), sampling the next
  token; decode is one ring period. On simulated CPU devices these are the CPU
  backend's figures: a GPU's fusions differ, its temporaries too.
  """
  import jax.numpy as jnp

  cfg, dep = engine.cfg, engine.dep
  dep.check_batch(batch)
  length = cache_len(max_len)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        engine.abstract_params, engine.param_shardings)
  cache = engine.abstract_cache(batch, length)
  chunk = prefill_chunk(cfg, dep, batch, prompt_len)
  tokens = jax.ShapeDtypeStruct((batch, chunk), jnp.int32, sharding=engine.tokens_sharding())
  key = jax.random.key(0)
  out = {}
  pre = engine.prefill_program(0.0, sample=True).lower(params, cache, tokens, jnp.int32(0), key)
  out["prefill"] = _stats(pre.compile().memory_analysis())
  state = engine.abstract_decode_state(batch, length)
  ring = engine.decode_program(batch, dep.ring_period, 0.0).lower(params, state, key)
  out["decode"] = _stats(ring.compile().memory_analysis())
  return out


def _stats(m) -> dict:
  return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
          "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
