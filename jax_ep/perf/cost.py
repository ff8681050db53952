"""The cost model: predicted TPOT and TPS of a deployment, term by term.

Pure Python over the configs (nothing here traces or runs jax). It follows what
jax_ep's code does per device for one decode step (a token for every sequence):

  * decode runs on the ring (ring.py): max(G, N) micro-steps per token, in each a
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
F MLP hidden, H heads, Dh head dim, V vocabulary, G groups, N stages.
"""

from __future__ import annotations

import dataclasses

from jax_ep.config import DeploymentConfig, ModelConfig
from jax_ep.perf.collectives import (
  all_to_all_bytes,
  collective_time,
  expert_tp_psum_bytes,
  head_gather_bytes,
  pipeline_bytes,
  split_by_link,
  tp_allgather_bytes,
  tp_allreduce_bytes,
)
from jax_ep.perf.hardware import IDEAL, Efficiency, Hardware
from jax_ep.perf.per_device import Layout, expert_rows, layout


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
  tp_ar = split_by_link(dep, tp_axes, tp_allreduce_bytes(cfg, dep, lay), gpn)
  tp_ar_s = collective_time(*tp_ar, hw) if dep.tp > 1 else 0.0
  ffn_ps = split_by_link(dep, tp_axes, expert_tp_psum_bytes(cfg, dep, lay), gpn)
  ffn_ps_s = collective_time(*ffn_ps, hw) if sum(ffn_ps) else 0.0
  gather = split_by_link(dep, tp_axes, tp_allgather_bytes(cfg, dep, lay), gpn)
  gather_s = collective_time(*gather, hw) if sum(gather) else 0.0
  comm_layer_s = a2a_s + tp_ar_s + ffn_ps_s + gather_s
  # Per micro-step: activations to the next stage, the head's row gather and its pick
  # over vocabulary shards, the sampled tokens to every stage.
  pipe = split_by_link(dep, ("stage",), pipeline_bytes(cfg, dep, lay), gpn)
  pipe_s = collective_time(*pipe, hw) if dep.stages > 1 else 0.0
  hg = split_by_link(dep, ("expert",), head_gather_bytes(cfg, dep, lay), gpn)
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
  (this device's vocabulary columns). max(G, N) micro-steps per token step; the
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

  A token crosses the N stages one after another, so with one group a step takes at
  least N times one stage; groups in flight raise TPS, not lower TPOT.
  """
  return sum(k * _roofline(b, f, hw) for _, k, b, f in floor_operations(cfg, dep, batch,
                                                                        context_len))
