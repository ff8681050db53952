"""Frozen, validated configuration: the model and the deployment that serves it."""

from __future__ import annotations

import dataclasses
import math
import re

import jax.numpy as jnp

from jax_ep.kernels import grouped_matmul, groups

DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
MLP_KINDS = ("gelu", "swiglu")
PLACEMENTS = ("ep", "tp")
KINDS = ("single", "baseline", "proposed")
KERNELS = ("auto", "xla", "pallas", "interpret")


class ConfigError(ValueError):
  """A configuration, mesh or input that cannot work; the message says what to change."""


def did_you_mean(name: str, choices) -> str:
  """" Did you mean 'x'?" for the choice nearest a mistyped name, or "" if none is near."""
  import difflib

  near = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.75)
  return f" Did you mean {near[0]!r}?" if near else ""


def count(n: int, noun: str) -> str:
  """"1 device", "8 devices", "2 processes": a count with its noun in its number."""
  return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def natural_sort(names) -> list[str]:
  """Names in the order a reader expects: baseline_2 before baseline_16."""
  return sorted(names, key=lambda n: [int(t) if t.isdigit() else t
                                      for t in re.split(r"(\d+)", str(n))])


def _positive(obj, *names):
  for name in names:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"{type(obj).__name__}.{name}={value!r} must be a positive integer.")


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _or_list(values) -> str:
  """[1, 2, 4] -> "1, 2 or 4"."""
  words = [str(v) for v in values]
  return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only MoE transformer. Defaults are the seed's model."""

  num_layers: int = 4
  num_experts: int = 16  # per layer
  top_k: int = 2
  num_heads: int = 16
  head_dim: int = 512
  model_dim: int = 8192  # must equal num_heads * head_dim
  mlp_dim: int = 32768  # hidden size of each expert's MLP
  mlp_kind: str = "gelu"  # "gelu": the seed's plain MLP; "swiglu": gated
  vocab_size: int = 32768
  max_seq_len: int = 2048  # length of the preallocated KV cache
  dtype: str = "float16"  # weights and activations; the router always runs in float32
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    _positive(self, "num_layers", "num_experts", "top_k", "num_heads", "head_dim",
              "model_dim", "mlp_dim", "vocab_size", "max_seq_len")
    if self.model_dim != self.num_heads * self.head_dim:
      raise ConfigError(
          f"ModelConfig.model_dim={self.model_dim} must equal num_heads x head_dim = "
          f"{self.num_heads} x {self.head_dim} = {self.num_heads * self.head_dim}; "
          "change model_dim or the head shape.")
    if self.top_k > self.num_experts:
      raise ConfigError(
          f"ModelConfig.top_k={self.top_k} is larger than num_experts={self.num_experts}; "
          "a token cannot pick more experts than a layer has.")
    if self.dtype not in DTYPES:
      raise ConfigError(f"ModelConfig.dtype={self.dtype!r} is unknown; use one of {list(DTYPES)}.")
    if self.mlp_kind not in MLP_KINDS:
      raise ConfigError(
          f"ModelConfig.mlp_kind={self.mlp_kind!r} is unknown; use one of {list(MLP_KINDS)}.")
    if not (0 < self.rope_theta < math.inf) or not (0 <= self.norm_eps < math.inf):
      raise ConfigError(
          f"ModelConfig.rope_theta={self.rope_theta} must be positive and norm_eps="
          f"{self.norm_eps} non-negative, both finite.")
    if self.head_dim % 2:
      raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary positions.")

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  @property
  def bytes_per_param(self) -> int:
    return jnp.dtype(self.jnp_dtype).itemsize

  @property
  def expert_mats(self) -> int:
    """Weight matrices per expert: up and down, plus the gate for swiglu."""
    return 3 if self.mlp_kind == "swiglu" else 2


@dataclasses.dataclass(frozen=True)
class DeploymentConfig:
  """How a model is laid out on a mesh of (stage, expert, tp) devices.

  One mechanism serves every deployment:
    * layers are split over `stage` (pipeline), micro-batches flow stage to stage;
    * the batch is split over `expert` for attention (data parallel), and tokens
      are exchanged with all_to_all to the device that holds their expert;
    * attention heads are split over `tp` (all-reduce after the output projection).
  `placement` says where each expert's weights go:
    * "ep": whole experts, split over the expert and tp axes together (the
      baseline's 4 experts per device; the proposed deployment's one per device);
    * "tp": experts split over `expert` only, each expert's MLP hidden dim over `tp`.
  """

  kind: str = "single"
  stages: int = 1
  expert: int = 1  # size of the expert axis
  tp: int = 1
  placement: str = "ep"
  microbatches: int = 1  # pipeline micro-batches per prefill chunk
  # Decode groups in flight (ring.py): the batch splits into G groups and stage s serves
  # group (t - s) mod max(G, stages) at micro-step t, so G >= stages keeps every stage
  # busy; 1 is one batch in flight (a stage works one micro-step in `stages`). 0: G =
  # stages.
  decode_groups: int = 0
  # Tokens per sequence that one decode call generates: the call runs that many ring
  # periods in a loop of static trip count, so the host dispatches (and can stop or
  # admit sequences) once per `tokens_per_call` tokens, as servers' multi-step
  # scheduling does. 1: a call per token.
  tokens_per_call: int = 1
  # Prompt positions per prefill chunk (each chunk runs that many tokens of every
  # sequence); 0: chosen so a chunk's expert buffer stays within
  # decode.PREFILL_ROWS_PER_DEVICE rows a device. Bounds prefill's activation memory.
  prefill_chunk: int = 0
  # Send-buffer rows per destination relative to a balanced share, when not dropless.
  capacity_factor: float = 2.0
  # Dropless: worst-case static buffers, nothing dropped, no step-dependent shapes.
  dropless: bool = True
  # The grouped expert matmul and decode attention: "auto" (Pallas on GPU, XLA
  # elsewhere), "xla", "pallas", "interpret" (the Pallas kernels through the interpreter).
  kernels: str = "auto"
  # Changes to the grouped expert kernel's measured tile sizes (kernels/groups.py Blocks),
  # e.g. "up.tail_m=16,down.num_stages=3": `up.`/`down.` names one product, a bare field
  # both. "": the defaults. Only the Pallas kernels read it.
  expert_blocks: str = ""
  # A one-device share of a larger deployment (jax-ep bench --share) only: the devices of a stage
  # whose rows its head scores. A stage gathers all its rows for the head, each device
  # scoring them on its vocabulary columns; the share scores its own rows this many times
  # instead (its head's work, without the gather). 1 everywhere else.
  head_gather: int = 1
  # How the user named it (a preset, and the command line's mesh overrides), for messages
  # only: describe() shows it; equality and hashing ignore it.
  name: str = dataclasses.field(default="", compare=False)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(
          f"DeploymentConfig.kind={self.kind!r} is unknown; use one of {list(KINDS)}.")
    _positive(self, "stages", "expert", "tp", "microbatches", "tokens_per_call", "head_gather")
    if self.head_gather > 1 and self.num_devices > 1:
      raise ConfigError(f"DeploymentConfig.head_gather={self.head_gather} is for a one-device "
                        "share of a deployment (jax-ep bench --share); a mesh of "
                        f"{self.num_devices} devices gathers its rows for the head itself: "
                        "leave it 1.")
    if not isinstance(self.decode_groups, int) or self.decode_groups < 0:
      raise ConfigError(f"DeploymentConfig.decode_groups={self.decode_groups!r} must be 0 (as "
                        "many as stages) or a positive number of groups.")
    if not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 0:
      raise ConfigError(f"DeploymentConfig.prefill_chunk={self.prefill_chunk!r} must be 0 (chunks "
                        "sized to the expert buffer) or a positive number of prompt positions.")
    if self.kernels not in KERNELS:
      raise ConfigError(f"DeploymentConfig.kernels={self.kernels!r} is unknown; "
                        f"use one of {list(KERNELS)}.")
    if not isinstance(self.expert_blocks, str):
      raise ConfigError(f"DeploymentConfig.expert_blocks={self.expert_blocks!r} must be a string "
                        "such as 'up.tail_m=16' ('' for the defaults).")
    try:
      groups.parse_blocks(self.expert_blocks)
    except ValueError as e:
      raise ConfigError(f"DeploymentConfig.expert_blocks={self.expert_blocks!r}: {e}.") from None
    if self.placement not in PLACEMENTS:
      raise ConfigError(
          f"DeploymentConfig.placement={self.placement!r} is unknown; "
          f"use one of {list(PLACEMENTS)}.")
    if not (isinstance(self.capacity_factor, (int, float)) and 0 < self.capacity_factor < math.inf):
      raise ConfigError(
          f"DeploymentConfig.capacity_factor={self.capacity_factor!r} must be a positive, "
          "finite number.")
    if not isinstance(self.dropless, bool):
      raise ConfigError(f"DeploymentConfig.dropless={self.dropless!r} must be True or False.")

  @property
  def num_devices(self) -> int:
    return self.stages * self.expert * self.tp

  @property
  def mesh_shape(self) -> tuple[int, int, int]:
    return (self.stages, self.expert, self.tp)

  @property
  def expert_shards(self) -> int:
    """Devices one layer's experts are spread over."""
    return self.expert * (self.tp if self.placement == "ep" else 1)

  def check_model(self, model: ModelConfig) -> None:
    """Raises ConfigError if `model` cannot be laid out on this deployment."""
    if model.num_layers % self.stages:
      raise ConfigError(
          f"num_layers={model.num_layers} is not divisible by stages={self.stages}; "
          "each pipeline stage must hold the same number of layers: use stages="
          f"{_or_list(_divisors(model.num_layers))}.")
    if model.num_heads % self.tp:
      raise ConfigError(
          f"num_heads={model.num_heads} is not divisible by tp={self.tp}; "
          "tensor-parallel attention gives each tp device whole heads.")
    if model.num_experts % self.expert_shards:
      axes = "expert x tp" if self.placement == "ep" else "expert"
      raise ConfigError(
          f"num_experts={model.num_experts} is not divisible by the {axes} axes "
          f"({self.expert_shards} devices) that placement={self.placement!r} spreads them over; "
          f"choose DeploymentConfig.expert="
          + (" (and DeploymentConfig.tp=)" if self.placement == "ep" else "")
          + f" so that {axes} divides {model.num_experts} "
          f"({_or_list(_divisors(model.num_experts))})"
          + (", or DeploymentConfig.placement=tp to split each expert's MLP over tp instead."
             if self.placement == "ep" and self.tp > 1 and model.num_experts % self.expert == 0
             and model.mlp_dim % self.tp == 0 else "."))
    if self.placement == "tp" and model.mlp_dim % self.tp:
      raise ConfigError(f"mlp_dim={model.mlp_dim} is not divisible by tp={self.tp}.")
    f = model.mlp_dim // self.tp if self.placement == "tp" else model.mlp_dim
    try:
      swiglu = model.mlp_kind == "swiglu"
      grouped_matmul.mlp_blocks(model.model_dim, f, swiglu, self.expert_blocks, pairs=swiglu)
    except ValueError as e:
      raise ConfigError(f"DeploymentConfig.expert_blocks={self.expert_blocks!r}: {e}.") from None
    shards = self.expert * self.tp
    if model.vocab_size % shards:
      raise ConfigError(
          f"vocab_size={model.vocab_size} is not divisible by expert x tp = {shards}: the "
          "unembedding splits the vocabulary over a stage's devices. Change the mesh or pad "
          "the vocabulary.")

  @property
  def groups(self) -> int:
    """Decode groups in flight (decode_groups, or stages when it is 0)."""
    return self.decode_groups or self.stages

  @property
  def ring_period(self) -> int:
    """Micro-steps between two tokens of one sequence: max(groups, stages)."""
    return max(self.groups, self.stages)

  @property
  def min_batch(self) -> int:
    """The smallest batch this deployment splits: every valid batch is a multiple of it
    (each device's share of each micro-batch and of each decode group is whole)."""
    return math.lcm(self.expert * self.microbatches, self.expert * self.groups)

  def default_batch(self, at_least: int = 8) -> int:
    """The smallest valid batch of at least `at_least` sequences (the CLI's default)."""
    return -(-at_least // self.min_batch) * self.min_batch

  def check_batch(self, batch: int) -> None:
    """Raises ConfigError if a batch of `batch` sequences cannot be split on this deployment."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
      raise ConfigError(f"batch={batch!r} must be a positive integer.")
    for field in ("microbatches", "groups"):
      m = getattr(self, field)
      per = self.expert * m
      if batch % per:
        what = "micro-batch" if field == "microbatches" else "decode group"
        raise ConfigError(
            f"batch={batch} is not divisible by expert axis x "
            f"{'microbatches' if field == 'microbatches' else 'decode groups'} = "
            f"{self.expert} x {m} = {per}; each device's share of each "
            f"{what} must be whole. Use a batch that is a multiple of {self.min_batch} (the "
            "least that every split of this deployment takes).")

  def describe(self) -> str:
    axes = [word for size, word in ((self.stages, "pipeline"), (self.expert, "expert"),
                                    (self.tp, "tensor")) if size > 1]
    shape = f"{' x '.join(axes)} parallel" if axes else "one device"
    label = f"{self.name or self.kind} ({shape})"
    return (f"{label}: stage {self.stages} x expert {self.expert} x tp {self.tp} "
            f"({count(self.num_devices, 'device')}), "
            f"placement={self.placement}, "
            f"microbatches={self.microbatches}, decode groups {self.groups}"
            + (f", head on {self.head_gather} devices' rows" if self.head_gather > 1 else ""))
