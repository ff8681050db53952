"""Analytic performance model: predicted TPOT and TPS of a deployment, term by term.

Pure Python over the configs (nothing here traces or runs jax). It follows what
jax_ep's code does per device for one decode step (a token for every sequence):

  * decode runs on the ring (ring.py): L = max(G, S) micro-steps per token, in each a
    stage runs its layers on one group of B / (G x E) rows per device, and the head
    (vocabulary split over the stage's devices) runs on one group's rows;
  * attention reads `context_len` positions of its rows' KV cache (on GPU the decode
    kernel reads only the live ones; the XLA path the whole allocated cache);
  * the MoE exchange sends a static [P, W, D] buffer each way, W the worst case when
    dropless (routing.rows_per_destination); the grouped kernel reads each local
    expert's weights once and multiplies only the real rows, rounded up per expert to
    its tiles; a bubble sends no rows, so its experts cost nothing;
  * the embedding is replicated (a lookup of the group's rows).

Time of one micro-step = sum over its phases of max(bytes / bandwidth, flops / rate),
divided by an efficiency, plus the exposed communication, plus a fixed cost per layer.
The floor (floor_s) is what any implementation of the layout must spend: each
operation's bytes (weights, the live KV cache) or unpadded FLOPs at the ceilings.

Shape letters as in the README: B batch, L layers, E experts, D model dim,
F MLP hidden, H heads, K head dim (Dh), V vocabulary, G groups, S stages.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

from jax_ep.config import DeploymentConfig, ModelConfig
from jax_ep.kernels.grouped_matmul import DEFAULT_BLOCKS, cost_rows
from jax_ep.routing import rows_per_destination

# --- hardware ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One GPU kind and the network between GPUs; all rates per GPU."""

  name: str
  hbm_bytes_per_s: float  # device memory bandwidth, read + write bytes
  matmul_flops: float  # dense fp16/bf16 matmul rate
  intra_node_bytes_per_s: float  # NVLink, per direction, per GPU
  inter_node_bytes_per_s: float  # network between nodes, per direction, per GPU
  gpus_per_node: int
  collective_latency_s: float  # fixed cost of one collective call
  hbm_capacity_bytes: float = math.inf
  measured: tuple[str, ...] = ()  # fields measured (the rest are datasheet or assumed)
  note: str = ""

  def describe(self) -> str:
    def mark(field):
      return "*" if field in self.measured else ""

    return (f"{self.name}: HBM {self.hbm_bytes_per_s / 1e12:.2f}{mark('hbm_bytes_per_s')} TB/s, "
            f"matmul {self.matmul_flops / 1e12:.0f}{mark('matmul_flops')} TFLOP/s, "
            f"intra-node {self.intra_node_bytes_per_s / 1e9:.0f}"
            f"{mark('intra_node_bytes_per_s')} GB/s, inter-node "
            f"{self.inter_node_bytes_per_s / 1e9:.0f}{mark('inter_node_bytes_per_s')} GB/s, "
            f"{self.gpus_per_node}/node, latency "
            f"{self.collective_latency_s * 1e6:.0f}{mark('collective_latency_s')} us"
            + (" (* measured)" if self.measured else ""))


# Datasheet: HBM3 3.35 TB/s, 989 TFLOP/s dense fp16, NVLink 4 900 GB/s both ways, one
# 400 Gb/s NIC per GPU. The collective latency is an assumption (in-graph NCCL, small
# messages); calibrate() rescales communication from measurements.
H100_SXM = Hardware("H100 SXM", hbm_bytes_per_s=3.35e12, matmul_flops=989e12,
                    intra_node_bytes_per_s=450e9, inter_node_bytes_per_s=50e9,
                    gpus_per_node=8, collective_latency_s=20e-6, hbm_capacity_bytes=80e9,
                    note="datasheet; collective latency assumed")

# shared/GPU.md, measured with jax 0.11.2: copy 3.66 TB/s (4 GiB, read + write), 8192^3
# fp16 matmul 637 TFLOP/s, ppermute 227 GB/s at 256 MiB over NVLink (2 GPUs), a 4 MiB
# all_to_all 165 us host-timed (dispatch included: an upper bound on in-graph latency).
# Inter-node 50 GB/s (400 Gb/s per GPU) is assumed: no multi-node machine was measured.
H200 = Hardware("H200", hbm_bytes_per_s=3.66e12, matmul_flops=637e12,
                intra_node_bytes_per_s=227e9, inter_node_bytes_per_s=50e9,
                gpus_per_node=8, collective_latency_s=160e-6, hbm_capacity_bytes=149e9,
                measured=("hbm_bytes_per_s", "matmul_flops", "intra_node_bytes_per_s",
                          "collective_latency_s"),
                note="shared/GPU.md; latency host-timed; inter-node assumed")

HARDWARE = {"h100": H100_SXM, "h200": H200}


@dataclasses.dataclass(frozen=True)
class Efficiency:
  """How far real kernels and collectives fall short of the hardware; 1, 1, 1, 0 is ideal."""

  memory: float = 1.0  # achieved fraction of HBM bandwidth in each phase
  compute: float = 1.0  # achieved fraction of the matmul rate in each phase
  comm: float = 1.0  # achieved fraction of link bandwidth and latency (divides comm time)
  overlap: float = 1.0  # share of the exchange hidden under compute (not yet modelled)
  layer_overhead_s: float = 0.0  # fixed cost per layer per micro-step (launches, small ops)

  def describe(self) -> str:
    return (f"memory {self.memory:.3f}, compute {self.compute:.3f}, comm {self.comm:.3f}, "
            f"overlap {self.overlap:.2f}, per-layer-micro-step overhead "
            f"{self.layer_overhead_s * 1e6:.1f} us")


IDEAL = Efficiency()

# --- what one device holds and processes -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """Per-device sizes of one decode micro-step, as the code lays them out."""

  layers: int  # L / S: layers of this device's stage
  heads: int  # H / tp
  experts: int  # E / expert_shards: experts of each local layer on this device
  mlp: int  # F, or F / tp when placement = "tp"
  rows: int  # B / expert: sequences this device attends for (replicated over tp, stage)
  groups: int  # G decode groups in flight
  period: int  # L = max(G, S): micro-steps per token of each sequence
  micro_rows: int  # rows / G: one group's rows on this device
  moe_tokens: int  # tokens this device routes per layer and micro-step (/ tp if split)
  ep_size: int  # devices one layer's experts are spread over (the all_to_all group)
  send_rows: int  # W: send-buffer rows per destination
  vocab_shards: int  # expert x tp: the unembedding's columns are split this many ways
  group_rows: int  # a group's rows over the stage (micro_rows x expert): the head's rows

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
      vocab_shards=dep.expert * dep.tp, group_rows=micro_rows * dep.expert)


def micro_steps(dep: DeploymentConfig) -> int:
  """Ring micro-steps per token of each sequence (ring.py): max(G, S)."""
  return dep.ring_period


def bubble_factor(dep: DeploymentConfig) -> float:
  """Micro-steps per token over the stage-busy ones: L / G (1 when G >= S)."""
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


# --- bytes read from HBM, per device -----------------------------------------------------


def attention_weight_bytes(cfg: ModelConfig, lay: Layout) -> int:
  """wq, wk, wv, wo of this device's heads, and the two norms, for one layer."""
  return (4 * cfg.model_dim * lay.heads * cfg.head_dim + 2 * cfg.model_dim) * cfg.bytes_per_param


def expert_weight_bytes(cfg: ModelConfig, lay: Layout) -> int:
  """This device's experts of one layer (up, down and, for swiglu, gate) and the f32 router."""
  experts = lay.experts * cfg.expert_mats * cfg.model_dim * lay.mlp * cfg.bytes_per_param
  return experts + cfg.model_dim * cfg.num_experts * 4


def expert_activation_bytes(cfg: ModelConfig, lay: Layout, kernel_rows: int) -> int:
  """The exchange buffers written and read (send, receive, compact, both ways) and the
  kernel's hidden [rows, F] written and read back, one layer."""
  buffers = 6 * lay.ep_size * lay.send_rows * cfg.model_dim * cfg.bytes_per_param
  hidden = 2 * kernel_rows * lay.mlp * cfg.bytes_per_param
  return buffers + hidden


def kv_read_bytes(cfg: ModelConfig, lay: Layout, context_len: int) -> int:
  """Keys and values of one group's rows, `context_len` positions, one layer."""
  return lay.micro_rows * context_len * 2 * lay.heads * cfg.head_dim * cfg.bytes_per_param


def head_bytes(cfg: ModelConfig, lay: Layout) -> int:
  """This device's vocabulary columns of the unembedding and its f32 logits, per head call."""
  cols = cfg.vocab_size // lay.vocab_shards
  return cfg.model_dim * cols * cfg.bytes_per_param + lay.group_rows * cols * 4


def resident_bytes(cfg: ModelConfig, lay: Layout, context_len: int) -> int:
  """Weights and KV cache one device holds (does it fit in HBM?)."""
  embed = cfg.vocab_size * cfg.model_dim * cfg.bytes_per_param
  unembed = embed // lay.vocab_shards
  kv = lay.layers * lay.rows * context_len * 2 * lay.heads * cfg.head_dim * cfg.bytes_per_param
  per_layer = attention_weight_bytes(cfg, lay) + expert_weight_bytes(cfg, lay)
  return embed + unembed + lay.layers * per_layer + kv


# --- FLOPs, per device ---------------------------------------------------------------


def attention_flops(cfg: ModelConfig, lay: Layout, context_len: int) -> int:
  """One layer, one group: 4 projections and scores over `context_len` (QK and PV)."""
  hk = lay.heads * cfg.head_dim
  return lay.micro_rows * (2 * cfg.model_dim * hk * 4 + 4 * hk * context_len)


def expert_flops(cfg: ModelConfig, lay: Layout, rows: float) -> float:
  """One layer: the MLP on `rows` rows of this device's experts, and the router."""
  return rows * 2 * cfg.model_dim * lay.mlp * cfg.expert_mats \
      + 2 * lay.moe_tokens * cfg.model_dim * cfg.num_experts


def head_flops(cfg: ModelConfig, lay: Layout) -> int:
  return 2 * lay.group_rows * cfg.model_dim * (cfg.vocab_size // lay.vocab_shards)


# --- communication -----------------------------------------------------------------------


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


def _split(dep: DeploymentConfig, axes, nbytes: float, gpus_per_node: int):
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


# --- the model ---------------------------------------------------------------------------


@dataclasses.dataclass
class Prediction:
  """A decode step of one deployment, term by term (seconds, bytes and FLOPs per device)."""

  tpot_s: float
  tps: float
  batch: int
  micro_steps: int
  terms_s: dict  # named times that add up to tpot_s
  hbm_bytes: float  # read per step, per device
  flops: float
  comm_bytes: dict  # {"intra": ..., "inter": ...} sent per step, per device
  resident_bytes: float
  fits: bool  # weights + KV cache within the device's HBM
  work_s: float  # this implementation's work at the hardware ceilings, comm overlapped, no latency
  ideal_s: float  # floor_s: any implementation of the layout at the ceilings
  components: dict  # roofline_s (with eff's memory, compute), comm_s (ideal), layer_steps

  @property
  def tpot_ms(self) -> float:
    return 1e3 * self.tpot_s


def _roofline(nbytes: float, flops: float, hw: Hardware, eff: Efficiency = IDEAL) -> float:
  """One phase: the slower of reading its bytes and doing its FLOPs."""
  return max(nbytes / (hw.hbm_bytes_per_s * eff.memory),
             flops / (hw.matmul_flops * eff.compute))


def predict(cfg: ModelConfig, dep: DeploymentConfig, batch: int, context_len: int,
            hw: Hardware, eff: Efficiency = IDEAL, imbalance: float = 1.0) -> Prediction:
  """TPOT and TPS of decoding one token for each of `batch` sequences.

  Args:
    cfg, dep: the model and its deployment (dep.num_devices GPUs of kind `hw`).
    batch: sequences decoded together (B), over dep.groups groups.
    context_len: KV cache length each step reads (jax_ep reads the whole max_len).
    hw: the GPU and network.
    eff: efficiency factors (calibrate() fits them).
    imbalance: expert load max/mean: the busiest device's kernel rows (expert_rows()).
  """
  lay = layout(cfg, dep, batch)
  gpn = hw.gpus_per_node
  lat = hw.collective_latency_s
  _, kernel_rows = expert_rows(cfg, lay, imbalance)

  # One micro-step of a stage that works on a real group (a bubble's experts are idle).
  # Attention's projections (FLOP-bound at large batch) and its pass over the cache
  # (bandwidth-bound) are separate kernels: each its own roofline.
  hk = lay.heads * cfg.head_dim
  proj_bytes, proj_flops = attention_weight_bytes(cfg, lay), lay.micro_rows * 8 * cfg.model_dim * hk
  kv_bytes, kv_flops = kv_read_bytes(cfg, lay, context_len), lay.micro_rows * 4 * hk * context_len
  exp_bytes = expert_weight_bytes(cfg, lay) + expert_activation_bytes(cfg, lay, kernel_rows)
  exp_flops = expert_flops(cfg, lay, kernel_rows)
  attn_s = _roofline(proj_bytes, proj_flops, hw, eff) + _roofline(kv_bytes, kv_flops, hw, eff)
  expert_s = _roofline(exp_bytes, exp_flops, hw, eff)
  head_s = _roofline(head_bytes(cfg, lay), head_flops(cfg, lay), hw, eff)

  # Communication per layer and micro-step.
  a2a_intra, a2a_inter = all_to_all_bytes(cfg, dep, lay, gpn)
  a2a_s = 2 * collective_time(a2a_intra, a2a_inter, hw) if lay.ep_size > 1 else 0.0
  tp_axes = ("tp",)
  tp_ar = _split(dep, tp_axes, tp_allreduce_bytes(cfg, dep, lay), gpn)
  tp_ar_s = collective_time(*tp_ar, hw) if dep.tp > 1 else 0.0
  ffn_ps = _split(dep, tp_axes, expert_tp_psum_bytes(cfg, dep, lay), gpn)
  ffn_ps_s = collective_time(*ffn_ps, hw) if sum(ffn_ps) else 0.0
  gather = _split(dep, tp_axes, tp_allgather_bytes(cfg, dep, lay), gpn)
  gather_s = collective_time(*gather, hw) if sum(gather) else 0.0
  comm_layer_s = a2a_s + tp_ar_s + ffn_ps_s + gather_s
  # Per micro-step: activations to the next stage, the head's row gather and its pick
  # over vocabulary shards, the sampled tokens to every stage.
  pipe = _split(dep, ("stage",), pipeline_bytes(cfg, dep, lay), gpn)
  pipe_s = collective_time(*pipe, hw) if dep.stages > 1 else 0.0
  hg = _split(dep, ("expert",), head_gather_bytes(cfg, dep, lay), gpn)
  head_comm_s = (collective_time(*hg, hw) if dep.expert > 1 else 0.0) + (
      2 * lat if lay.vocab_shards > 1 else 0.0) + (lat if dep.stages > 1 else 0.0)

  n = lay.period
  layer_steps = n * lay.layers
  micro_roof_s = lay.layers * (attn_s + expert_s) + head_s
  roof_s = n * micro_roof_s
  comm_s = n * (lay.layers * comm_layer_s + pipe_s + head_comm_s)
  terms = {
      "attention": n * lay.layers * attn_s,
      "experts": n * lay.layers * expert_s,
      "head": n * head_s,
      "all_to_all": n * lay.layers * a2a_s / eff.comm,
      "tp_collectives": n * lay.layers * (tp_ar_s + ffn_ps_s + gather_s) / eff.comm,
      "pipeline": n * (pipe_s + head_comm_s) / eff.comm,
      "layer_overhead": layer_steps * eff.layer_overhead_s,
  }
  tpot_s = sum(terms.values())
  phases = [(n * lay.layers, proj_bytes, proj_flops), (n * lay.layers, kv_bytes, kv_flops),
            (n * lay.layers, exp_bytes, exp_flops), (n, head_bytes(cfg, lay), head_flops(cfg, lay))]
  compute_bound_s = sum(k * _roofline(b, f, hw) for k, b, f in phases
                        if f / hw.matmul_flops > b / hw.hbm_bytes_per_s)
  memory_bound_s = sum(k * _roofline(b, f, hw) for k, b, f in phases) - compute_bound_s

  hbm = sum(k * b for k, b, _ in phases)
  flops = sum(k * f for k, _, f in phases)
  per_layer_intra = 2 * a2a_intra + tp_ar[0] + ffn_ps[0] + gather[0]
  per_layer_inter = 2 * a2a_inter + tp_ar[1] + ffn_ps[1] + gather[1]
  intra = n * (lay.layers * per_layer_intra + pipe[0] + hg[0])
  inter = n * (lay.layers * per_layer_inter + pipe[1] + hg[1])
  comm_bw_s = max(intra / hw.intra_node_bytes_per_s, inter / hw.inter_node_bytes_per_s)
  work_s = max(sum(k * _roofline(b, f, hw) for k, b, f in phases), comm_bw_s)
  resident = resident_bytes(cfg, lay, context_len)
  return Prediction(
      tpot_s=tpot_s, tps=batch / tpot_s, batch=batch, micro_steps=n,
      terms_s=terms, hbm_bytes=hbm, flops=flops, comm_bytes={"intra": intra, "inter": inter},
      resident_bytes=resident, fits=resident <= hw.hbm_capacity_bytes, work_s=work_s,
      ideal_s=floor_s(cfg, dep, batch, context_len, hw),
      components={"roofline_s": roof_s, "comm_s": comm_s, "layer_steps": layer_steps,
                  "memory_bound_s": memory_bound_s, "compute_bound_s": compute_bound_s,
                  "phases": [(k, b / hw.hbm_bytes_per_s, f / hw.matmul_flops)
                             for k, b, f in phases]})


def floor_operations(cfg: ModelConfig, dep: DeploymentConfig, batch: int,
                     context_len: float) -> list[tuple[str, float, float, float]]:
  """(name, count per token step, bytes, unpadded FLOPs) of each operation a device must
  do for one token of every sequence, in any implementation of this layout.

  Per micro-step a stage's layers on one group: the attention projections (its heads'
  weights), attention over the live KV cache (`context_len` positions), the router and
  its experts (weights once, the real rows' FLOPs); and the head on one group's rows
  (this device's vocabulary columns). L = max(G, S) micro-steps per token step; the
  head runs G times (once per group).
  """
  lay = layout(cfg, dep, batch)
  hk = lay.heads * cfg.head_dim
  real_rows, _ = expert_rows(cfg, lay)
  n = lay.period
  kv = lay.micro_rows * context_len * 2 * hk * cfg.bytes_per_param
  return [
      ("attention projections", n * lay.layers, attention_weight_bytes(cfg, lay),
       lay.micro_rows * 2 * cfg.model_dim * hk * 4),
      ("attention over the KV cache", n * lay.layers, kv, lay.micro_rows * 4 * hk * context_len),
      ("router and experts", n * lay.layers, expert_weight_bytes(cfg, lay),
       expert_flops(cfg, lay, real_rows)),
      ("head", lay.groups, cfg.model_dim * (cfg.vocab_size // lay.vocab_shards)
       * cfg.bytes_per_param, head_flops(cfg, lay)),
  ]


def floor_s(cfg: ModelConfig, dep: DeploymentConfig, batch: int, context_len: float,
            hw: Hardware) -> float:
  """A lower bound on TPOT: each operation's roofline (floor_operations), summed.

  A token crosses the S stages one after another, so with one group a step takes at
  least S times one stage; groups in flight raise TPS, not lower TPOT.
  """
  return sum(k * _roofline(b, f, hw) for _, k, b, f in floor_operations(cfg, dep, batch,
                                                                        context_len))


# --- calibration -------------------------------------------------------------------------


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
  """Non-negative least squares by trying every active set (a handful of columns)."""
  import numpy as np

  a, b = np.asarray(rows, float), np.asarray(y, float)
  best, best_err = np.zeros(a.shape[1]), float(np.sum(b * b))
  for k in range(1, a.shape[1] + 1):
    for cols in itertools.combinations(range(a.shape[1]), k):
      x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
      if np.any(x <= 0):
        continue
      err = float(np.sum((a[:, cols] @ x - b) ** 2))
      if err < best_err:
        best, best_err = np.zeros(a.shape[1]), err
        best[list(cols)] = x
  return best.tolist()


def _configs_of(record: dict):
  cfg = ModelConfig(**record["model"])
  dep = DeploymentConfig(**record["deployment"])
  hw = record.get("hardware", "h200")
  if isinstance(hw, dict):  # from JSON: an unmeasured link (one device) is stored as null
    hw = Hardware(**{k: math.inf if v is None else v for k, v in hw.items()
                     if k != "measured"}, measured=tuple(hw.get("measured", ())))
  elif not isinstance(hw, Hardware):
    hw = HARDWARE[str(hw)]
  return cfg, dep, hw


def calibrate(records, overlap: float = 1.0) -> Efficiency:
  """Fits Efficiency to measured decode steps.

  tpot = sum over phases of max(bytes / (bw x memory), flops / (rate x compute))
         + comm / comm_eff + layer_steps x overhead.

  Args:
    records: measurements, each a dict with model and deployment (the dataclass fields),
      batch, context_len, imbalance (optional), hardware (a Hardware dict or a HARDWARE
      key) and tpot_ms, as bench.py writes under "runs". A JSON path or a bench result
      dict ({"runs": [...]}) is accepted too.
    overlap: kept as given (a few runs cannot separate it from the other factors).

  Least squares on relative error: memory and compute on a log grid, refined around
  the best point; comm and the overhead solved non-negative at each point. With fewer
  runs than factors the later ones in (roofline, overhead, split memory/compute, comm)
  stay ideal; a
  factor no run depends on stays ideal; memory and compute are tied (one roofline
  factor) unless three runs or more include both memory-bound and compute-bound phases
  (over 10% of their roofline time each way).
  """
  import numpy as np

  records = load_records(records)
  if not records:
    raise ValueError("calibrate() needs at least one measured run.")
  setups = [_configs_of(r) for r in records]
  y = np.array([r["tpot_ms"] / 1e3 for r in records])

  def predictions(memory, compute):
    eff = Efficiency(memory=memory, compute=compute, overlap=overlap)
    return [predict(c, d, r["batch"], r["context_len"], hw, eff, r.get("imbalance", 1.0))
            for (c, d, hw), r in zip(setups, records, strict=True)]

  base = predictions(1.0, 1.0)
  comm = np.array([p.components["comm_s"] for p in base])
  steps = np.array([p.components["layer_steps"] for p in base], float)
  linear = []  # (name, column) solved by least squares at each grid point
  if len(records) >= 2 and steps.any():  # fixed per-layer cost dominates small shares
    linear.append(("layer_steps", steps))
  if len(records) >= 4 and comm.any():
    linear.append(("comm", comm))
  share = [(p.components["memory_bound_s"] / p.components["roofline_s"],
            p.components["compute_bound_s"] / p.components["roofline_s"]) for p in base]
  tied = (len(records) < 3 or not any(m > 0.1 for m, _ in share)
          or not any(c > 0.1 for _, c in share))

  def fit(memory, compute):
    roof = np.array([p.components["roofline_s"] for p in predictions(memory, compute)])
    rest, coef = y - roof, np.zeros(len(linear))
    if linear:
      cols = np.stack([col for _, col in linear], axis=1)
      coef = np.asarray(_nnls((cols / y[:, None]).tolist(), (rest / y).tolist()))
      rest = rest - cols @ coef
    return float(np.sum((rest / y) ** 2)), coef

  # A coarse log grid, then finer grids around the few best points of the last: the
  # error has long valleys (memory efficiency against per-layer overhead), so refining
  # around one grid point can settle in the wrong part of a valley.
  centers, span, points, found = [(0.2, 0.2)], math.log(20.0), 41, []
  for _ in range(4):
    offsets = np.exp(np.linspace(-span, span, points))
    found = []
    for cm, cc in centers:
      pairs = ([(cm * o, cm * o) for o in offsets] if tied else
               [(cm * om, cc * oc) for om in offsets for oc in offsets])
      found += [(*fit(m, c), m, c) for m, c in pairs]
    found.sort(key=lambda t: t[0])
    centers = [(m, c) for _, _, m, c in found[:4]]
    span, points = 2 * span / (points - 1), 21
  err, coef, memory, compute = found[0]
  memory, compute = _polish(base, linear, y, memory, compute, tied)
  best = (fit(memory, compute)[0], memory, compute, fit(memory, compute)[1])
  _, memory, compute, coef = best
  if memory > 1 or compute > 1:
    # No kernel beats the probed ceilings: with too few runs to separate the factors the
    # fit can wander past them; hold them at 1 and refit the rest.
    memory, compute = min(memory, 1.0), min(compute, 1.0)
    _, coef = fit(memory, compute)
  values = dict(zip([n for n, _ in linear], coef, strict=True))
  comm_coef = values.get("comm", 0.0)
  return Efficiency(memory=float(memory), compute=float(compute),
                    comm=float(1.0 / comm_coef) if comm_coef > 0 else 1.0, overlap=overlap,
                    layer_overhead_s=float(values.get("layer_steps", 0.0)))


def _polish(base, linear, y, memory, compute, tied, rounds: int = 20):
  """Refines (memory, compute) from a grid point: with each phase's bound side (bytes or
  FLOPs) fixed, a step's time is linear in 1/memory, 1/compute and the linear terms, so
  non-negative least squares solves it; repeat until the sides stop changing."""
  import numpy as np

  extra = np.stack([col for _, col in linear], axis=1) if linear else np.zeros((len(y), 0))
  for _ in range(rounds):
    rows = []
    for p in base:
      mem = sum(k * t_b for k, t_b, t_f in p.components["phases"]
                if t_b / memory >= t_f / compute)
      cmp = sum(k * t_f for k, t_b, t_f in p.components["phases"]
                if t_b / memory < t_f / compute)
      rows.append([mem + cmp] if tied else [mem, cmp])
    a = np.concatenate([np.asarray(rows), extra], axis=1) / y[:, None]
    x = np.asarray(_nnls(a.tolist(), (y / y).tolist()))
    if not (x[:1 if tied else 2] > 0).all():
      return memory, compute
    new = (1 / x[0], 1 / x[0]) if tied else (1 / x[0], 1 / x[1])
    if np.allclose(new, (memory, compute), rtol=1e-9):
      break
    memory, compute = new
  return memory, compute


def validate(records, eff: Efficiency = IDEAL) -> list[dict]:
  """Predicted vs measured TPOT for each record (same format as calibrate())."""
  out = []
  for r in load_records(records):
    cfg, dep, hw = _configs_of(r)
    p = predict(cfg, dep, r["batch"], r["context_len"], hw, eff, r.get("imbalance", 1.0))
    out.append({"name": r.get("name", dep.kind), "measured_ms": r["tpot_ms"],
                "predicted_ms": p.tpot_ms, "ratio": p.tpot_ms / r["tpot_ms"]})
  return out


def format_validation(rows: list[dict]) -> str:
  lines = ["| run | measured ms | predicted ms | predicted / measured |",
           "| --- | ---: | ---: | ---: |"]
  lines += [f"| {r['name']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} | "
            f"{r['ratio']:.2f} |" for r in rows]
  return "\n".join(lines)


def load_records(source) -> list[dict]:
  """Measurement records from a list, a bench result dict, or a JSON file path."""
  if isinstance(source, str):
    with open(source) as f:
      source = json.load(f)
  if isinstance(source, dict):
    source = source.get("runs", [])
  return [r for r in source if r.get("tpot_ms")]


# --- deployment families for scaling curves ----------------------------------------------


def ep_deployment(cfg: ModelConfig, n: int, order: str = "stages_first",
                  groups: int | None = None) -> DeploymentConfig | None:
  """A proposed-style deployment of `cfg` on n GPUs, or None if n does not factor.

  order="stages_first": as configs/deployments.py's presets (stages up to L, then
  experts, then tp on each expert's MLP); "experts_first": experts up to E, then
  stages, then tp. groups (decode groups in flight) defaults to 0: one per stage.
  """
  first, second = ("stages", "expert") if order == "stages_first" else ("expert", "stages")
  limit = {"stages": cfg.num_layers, "expert": cfg.num_experts}
  sizes = {}
  rest = n
  for axis in (first, second):
    sizes[axis] = math.gcd(rest, limit[axis])
    rest //= sizes[axis]
  tp = rest
  if tp > 1 and cfg.mlp_dim % tp:
    return None
  return DeploymentConfig(kind="proposed", stages=sizes["stages"], expert=sizes["expert"],
                          tp=tp, placement="tp" if tp > 1 else "ep",
                          microbatches=sizes["stages"], decode_groups=groups or 0)


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


# --- the seed's table and a scaling curve ------------------------------------------------

# The seed paper's reported figures (16 and 64 H100, batch 1024).
SEED_FIGURES = {"seed_baseline": (120_000, 8.3), "seed_proposed": (450_000, 2.2)}


def seed_rows(hw: Hardware = H100_SXM, batch: int = 1024, context_len: int = 128,
              eff: Efficiency = IDEAL, what_if: bool = True) -> list[dict]:
  """Predictions for the seed's two deployments (and a few variants) of the seed model."""
  import dataclasses as dc

  from configs import deployments, load_model

  cfg = load_model("seed")
  one = dict(decode_groups=1)
  cases = [("Baseline (TP=8, PP=2), one group", dc.replace(deployments.SEED_BASELINE, **one),
            "seed_baseline", batch),
           ("Baseline, ring of 2 groups", deployments.SEED_BASELINE, None, batch),
           ("Proposed cross-node EP, one group", dc.replace(deployments.SEED_PROPOSED, **one),
            "seed_proposed", batch),
           ("Proposed, ring of 4 groups of 256", deployments.SEED_PROPOSED, "seed_proposed",
            batch),
           ("Proposed, ring of 4 groups of 1024", deployments.SEED_PROPOSED, None, 4 * batch)]
  if what_if:
    cases += [
        ("  what if: proposed, 8 groups of 1024", dc.replace(deployments.SEED_PROPOSED,
                                                            decode_groups=8), None, 8 * batch),
        ("  what if: one GPU", deployments.SINGLE, None, batch),
    ]
  rows = []
  for name, dep, key, b in cases:
    p = predict(cfg, dep, b, context_len, hw, eff)
    tps, tpot = SEED_FIGURES.get(key, (None, None))
    rows.append({"method": name, "gpus": dep.num_devices,
                 "per_gpu": describe_layout(cfg, dep, b), "prediction": p,
                 "bubble": bubble_factor(dep), "groups": dep.groups,
                 "seed_tps": tps, "seed_tpot_ms": tpot})
  return rows


def format_seed_table(rows: list[dict], hw: Hardware) -> str:
  lines = [f"Seed model, batch {rows[0]['prediction'].batch}, on {hw.name}:",
           "| Method | GPUs | Per-GPU deployment | TPS (model) | TPOT ms (model) | "
           "TPS (seed) | TPOT ms (seed) | work ms | ideal ms | bubble x | fits |",
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
  for r in rows:
    p = r["prediction"]
    seed_tps = f"{r['seed_tps']:,}" if r["seed_tps"] else ""
    seed_tpot = f"{r['seed_tpot_ms']}" if r["seed_tpot_ms"] else ""
    lines.append(f"| {r['method']} | {r['gpus']} | {r['per_gpu']} | {p.tps:,.0f} | "
                 f"{p.tpot_ms:.2f} | {seed_tps} | {seed_tpot} | {1e3 * p.work_s:.2f} | "
                 f"{1e3 * p.ideal_s:.2f} | "
                 f"{r['bubble']:.2f} | {'yes' if p.fits else 'NO'} |")
  lines += ["", "model: this implementation's step at the hardware rates with the efficiency "
            "factors; work: the same work at the ceilings with communication overlapped and "
            "no latency; ideal: floor_s, each operation of a token step at its roofline "
            "(any implementation of the layout); bubble: L / G, micro-steps per token over "
            "the busy ones."]
  return "\n".join(lines)


def format_breakdown(rows: list[dict]) -> str:
  """Where each predicted step goes: the named terms in ms, and the per-device volumes."""
  names = list(rows[0]["prediction"].terms_s)
  lines = ["| Method | " + " | ".join(names) + " | HBM GB read | TFLOP | intra GB | inter GB |",
           "| --- |" + " ---: |" * (len(names) + 4)]
  for r in rows:
    p = r["prediction"]
    terms = " | ".join(f"{1e3 * p.terms_s[n]:.3f}" for n in names)
    lines.append(f"| {r['method'].strip()} | {terms} | {p.hbm_bytes / 1e9:.2f} | "
                 f"{p.flops / 1e12:.2f} | {p.comm_bytes['intra'] / 1e9:.3f} | "
                 f"{p.comm_bytes['inter'] / 1e9:.3f} |")
  return "\n".join(lines)


def scaling_curve(cfg: ModelConfig, hw: Hardware, batch: int = 1024, context_len: int = 128,
                  eff: Efficiency = IDEAL, gpus=(1, 2, 4, 8, 16, 32, 64, 128, 256)) -> dict:
  """Predicted TPS and TPOT against the GPU count for three families of EP deployments."""
  families = {
      "stages first, ring of G = S groups (jax_ep presets)": dict(order="stages_first"),
      "stages first, one group": dict(order="stages_first", groups=1),
      "experts first, G = S": dict(order="experts_first"),
  }
  curves = {}
  for label, kw in families.items():
    points = []
    for n in gpus:
      dep = ep_deployment(cfg, n, **kw)
      if dep is None:
        continue
      try:
        p = predict(cfg, dep, batch, context_len, hw, eff)
      except ValueError:  # ConfigError: this batch or model does not split on it
        continue
      points.append({"gpus": n, "tps": p.tps, "tpot_ms": p.tpot_ms, "fits": p.fits,
                     "mesh": f"S{dep.stages}xE{dep.expert}xTP{dep.tp}"})
    curves[label] = points
  return curves


def plot_scaling(curves: dict, path: str, title: str, seed_points: bool = True) -> bool:
  """Writes the scaling curves as a PNG; False (and a message) without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot written.")
    return False
  fig, (ax_tps, ax_tpot) = plt.subplots(1, 2, figsize=(12, 4.5))
  for label, pts in curves.items():
    x = [p["gpus"] for p in pts]
    line, = ax_tps.plot(x, [p["tps"] for p in pts], marker="o", label=label)
    ax_tpot.plot(x, [p["tpot_ms"] for p in pts], marker="o", color=line.get_color(), label=label)
    for ax, key in ((ax_tps, "tps"), (ax_tpot, "tpot_ms")):  # hollow: does not fit in HBM
      bad = [p for p in pts if not p["fits"]]
      ax.scatter([p["gpus"] for p in bad], [p[key] for p in bad], s=120, facecolors="none",
                 edgecolors="red", zorder=3)
  if seed_points:
    for key, (tps, tpot) in SEED_FIGURES.items():
      n = 16 if key == "seed_baseline" else 64
      ax_tps.scatter([n], [tps], marker="*", s=200, color="k", zorder=4)
      ax_tpot.scatter([n], [tpot], marker="*", s=200, color="k", zorder=4)
      ax_tps.annotate(f"seed {key.split('_')[1]}", (n, tps), textcoords="offset points",
                      xytext=(5, 5))
  for ax, ylabel in ((ax_tps, "TPS (tokens/s)"), (ax_tpot, "TPOT (ms)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("GPUs")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
  ax_tps.legend(fontsize=8)
  fig.suptitle(title + "  (red ring: does not fit in HBM; star: the seed's figure)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


# --- command line ------------------------------------------------------------------------


def report(hardware: str = "h100", batch: int = 1024, context_len: int = 128,
           calibration: str | None = None, plot: str | None = None) -> str:
  """The seed's table, the term-by-term breakdown and (optionally) the scaling plot."""
  hw = HARDWARE[hardware]
  eff, out = IDEAL, []
  if calibration:
    eff = calibrate(calibration)
    out += [f"calibrated from {calibration}: {eff.describe()}",
            format_validation(validate(calibration, eff)), ""]
  out += [hw.describe(), f"efficiency: {eff.describe()}"]
  rows = seed_rows(hw, batch, context_len, eff)
  out += [format_seed_table(rows, hw), "",
          "Predicted step, term by term (ms per decode step, per device):",
          format_breakdown(rows)]
  if plot:
    from configs import load_model

    curves = scaling_curve(load_model("seed"), hw, batch, context_len, eff)
    out += ["", "Scaling (GPUs: TPS):"]
    out += [f"  {label}: " + ", ".join(f"{p['gpus']}:{p['tps']:,.0f}" for p in pts)
            for label, pts in curves.items()]
    title = f"seed model, batch {batch}, context {context_len}, {hw.name}"
    if plot_scaling(curves, plot, title):
      out.append(f"wrote {plot}")
  return "\n".join(out)


def main(argv):
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help.")
  f = flags.FLAGS
  print(report(f.hardware, f.batch, f.context_len, f.calibration, f.plot))
  return 0


def _define_flags():
  from absl import flags

  flags.DEFINE_enum("hardware", "h100", sorted(HARDWARE), "GPU kind of the prediction.")
  flags.DEFINE_integer("batch", 1024, "Sequences decoded together (the seed's 1024).")
  flags.DEFINE_integer("context_len", 128,
                       "KV cache positions each step reads. The seed does not say; 128 keeps "
                       "the step weight-bound as its text implies.")
  flags.DEFINE_string("calibration", None,
                      "A bench results JSON (benchmarks/seed_table.py): fit the efficiency "
                      "factors to its runs before predicting.")
  flags.DEFINE_string("plot", None, "Write the EP scaling curve (1 to 256 GPUs) to this PNG.")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
