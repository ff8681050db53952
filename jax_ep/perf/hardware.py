"""Hardware rates (datasheet presets H100_SXM, H200) and the efficiency factors of the
cost model (Efficiency, IDEAL)."""

from __future__ import annotations

import dataclasses
import math


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
                    note="datasheet rates, the collective latency assumed: what the GPU "
                         "could reach, not what it was measured at")

# shared/GPU.md, measured with jax 0.11.2: copy 3.66 TB/s (4 GiB, read + write), 8192^3
# fp16 matmul 637 TFLOP/s, ppermute 227 GB/s at 256 MiB over NVLink (2 GPUs), a 4 MiB
# all_to_all 165 us host-timed (dispatch included: an upper bound on in-graph latency).
# Inter-node 50 GB/s (400 Gb/s per GPU) is assumed: no multi-node machine was measured.
H200 = Hardware("H200", hbm_bytes_per_s=3.66e12, matmul_flops=637e12,
                intra_node_bytes_per_s=227e9, inter_node_bytes_per_s=50e9,
                gpus_per_node=8, collective_latency_s=160e-6, hbm_capacity_bytes=149e9,
                measured=("hbm_bytes_per_s", "matmul_flops", "intra_node_bytes_per_s",
                          "collective_latency_s"),
                note="rates measured on one H200 (shared/GPU.md), below its datasheet's; the "
                     "latency host-timed, an upper bound; inter-node assumed. Against "
                     "--hardware=h100's datasheet rates it predicts slower: the two "
                     "compare measurement with datasheet, not the two GPU kinds")

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
