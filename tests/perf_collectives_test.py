"""jax_ep/perf/collectives.py: each collective's bytes within and across nodes on small
deployments and the seed's, computed by hand; no jax."""

import dataclasses

from configs import deployments, load_model
from jax_ep.perf import collectives, cost, hardware, per_device

TINY = load_model("tiny")  # L4 E16 K2, H8 x 8 = D64, F128, V256, float32 (4 bytes), gelu
SEED = load_model("seed")


def test_all_to_all_volume():
  dep = deployments.PRESETS["proposed_8"]  # S4 x E2, G4: 8 sequences, 1 per device a group
  lay = per_device.layout(TINY, dep, 8)
  assert (lay.micro_rows, lay.moe_tokens, lay.experts, lay.send_rows) == (1, 1, 8, 2)
  # Buffer [2 devices, W=2, 64] float32; one block goes to the other expert device.
  assert collectives.all_to_all_bytes(TINY, dep, lay, 8) == (2 * 64 * 4, 0)
  assert collectives.all_to_all_bytes(TINY, dep, lay, 1) == (0, 2 * 64 * 4)  # one GPU per node
  # The seed's 64 GPUs, 4 groups of 256: 16 tokens a device, W = 16 x min(2, 1) = 16 rows
  # of 8192 fp16 = 256 KiB to each of 15 peers: 7 on NVLink, 8 across nodes.
  lay = per_device.layout(SEED, deployments.SEED_PROPOSED, 1024)
  assert (lay.micro_rows, lay.send_rows) == (16, 16)
  assert collectives.all_to_all_bytes(SEED, deployments.SEED_PROPOSED, lay, 8) == (7 * 262144,
                                                                         8 * 262144)
  # Per token step: 4 micro-steps x 1 layer x dispatch and return, the activations to the
  # next stage (always on another node: 16 devices a stage), and the head's row gather.
  p = cost.predict(SEED, deployments.SEED_PROPOSED, 1024, 128, hardware.H100_SXM)
  gather_inter = 15 * 16 * 8192 * 2  # the expert group spans 2 nodes: all on the network
  assert p.comm_bytes["inter"] == 4 * (2 * 8 * 262144 + 16 * 8192 * 2 + gather_inter)


def test_tp_and_pipeline_collectives():
  dep = dataclasses.replace(deployments.PRESETS["baseline_8"], decode_groups=1)  # S2 x TP4
  lay = per_device.layout(TINY, dep, 8)
  assert (lay.heads, lay.experts, lay.micro_rows, lay.moe_tokens) == (2, 4, 8, 2)
  # ring, [8, 64] f32
  assert collectives.tp_allreduce_bytes(TINY, dep, lay) == 2 * 3 / 4 * 8 * 64 * 4
  assert collectives.tp_allgather_bytes(TINY, dep, lay) == 3 * 2 * 64 * 4
  assert collectives.pipeline_bytes(TINY, dep, lay) == 8 * 64 * 4
  assert collectives.head_gather_bytes(TINY, dep, lay) == 0  # one expert device: rows already whole
  assert collectives.group_peers(dep, ("tp",), 8) == (3, 0)
  assert collectives.group_peers(dep, ("stage",), 4) == (0, 1)  # stage 1 is devices 4..7


def test_expert_tp_placement():
  dep = deployments.SEED_PROPOSED_TP2
  lay = per_device.layout(SEED, dep, 1024)
  assert (lay.experts, lay.mlp, lay.ep_size, lay.send_rows) == (1, 16384, 16, 16)
  # The partial outputs of the whole compacted buffer [16 x 16, 8192] fp16, over tp 2.
  assert collectives.expert_tp_psum_bytes(SEED, dep, lay) == 2 * 1 / 2 * 16 * 16 * 8192 * 2
