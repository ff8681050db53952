"""The cost model's arithmetic (jax_ep/perf/) on small deployments, computed by hand; no jax."""

import dataclasses
import math

import pytest

from configs import deployments, load_model
from jax_ep.perf import calibrate, collectives, cost, hardware, per_device, plan, tables

TINY = load_model("tiny")  # L4 E16 K2, H8 x 8 = D64, F128, V256, float32 (4 bytes), gelu
SEED = load_model("seed")

# A machine with round numbers, so times are easy to check by hand.
UNIT = hardware.Hardware("unit", hbm_bytes_per_s=1e9, matmul_flops=1e12, intra_node_bytes_per_s=1e8,
                   inter_node_bytes_per_s=1e7, gpus_per_node=8, collective_latency_s=1e-5)


def test_layout_single_tiny():
  lay = per_device.layout(TINY, deployments.SINGLE, 8)
  assert (lay.layers, lay.heads, lay.experts, lay.mlp) == (4, 8, 16, 128)
  assert (lay.rows, lay.groups, lay.period, lay.micro_rows, lay.moe_tokens) == (8, 1, 1, 8, 8)
  # Dropless: all 8 tokens x 2 picks could go to the one device.
  assert (lay.ep_size, lay.send_rows, lay.vocab_shards, lay.group_rows) == (1, 16, 1, 8)


def test_expert_rows_follow_the_kernel_tiles():
  lay = per_device.layout(SEED, deployments.SINGLE, 1024)
  assert per_device.expert_rows(SEED, lay) == (2048, 2048)  # 128 rows per expert: one 128-row tile
  # The busiest expert gets 1.5 x 128 = 192 rows (two tiles), the other 15 share the rest
  # (124 each, one tile): the same 2048 real rows.
  real, kernel = per_device.expert_rows(SEED, lay, imbalance=1.5)
  assert (real, kernel) == (2048, 256 + 15 * 128)
  lay = per_device.layout(TINY, deployments.SINGLE, 8)
  assert per_device.expert_rows(TINY, lay) == (16, 16 * 128)  # 1 row each, still a whole tile


def test_bytes_single_tiny():
  lay = per_device.layout(TINY, deployments.SINGLE, 8)
  assert cost.attention_weight_bytes(TINY, lay) == (4 * 64 * 64 + 2 * 64) * 4  # wq wk wv wo, norms
  assert cost.expert_weight_bytes(TINY, lay) == 16 * 2 * 64 * 128 * 4 + 64 * 16 * 4  # + f32 router
  assert cost.kv_read_bytes(TINY, lay, 16) == 8 * 16 * 2 * 64 * 4  # rows x cache x (k, v) x H*K
  assert cost.head_bytes(TINY, lay) == 64 * 256 * 4 + 8 * 256 * 4  # unembedding + f32 logits
  # send, receive and compact buffers [1, 16, 64] both ways, and the hidden [rows, 128]
  assert cost.expert_activation_bytes(TINY, lay, 2048) == 6 * 16 * 64 * 4 + 2 * 2048 * 128 * 4
  p = cost.predict(TINY, deployments.SINGLE, 8, 16, UNIT)
  per_layer = 66048 + 8 * 16 * 2 * 64 * 4 + 1052672 + 2097152 + 24576
  assert p.hbm_bytes == 4 * per_layer + 73728
  assert p.comm_bytes == {"intra": 0, "inter": 0}


def test_flops_single_tiny():
  lay = per_device.layout(TINY, deployments.SINGLE, 8)
  # 4 projections of 64 x 64 and scores over 16 cached positions (QK and PV), 8 rows.
  assert cost.attention_flops(TINY, lay, 16) == 8 * (2 * 64 * 64 * 4 + 4 * 64 * 16)
  # The kernel's rows x 2 matmuls of 64 x 128, and the router on 8 tokens.
  assert cost.expert_flops(TINY, lay, 2048) == 2048 * 2 * 64 * 128 * 2 + 2 * 8 * 64 * 16
  assert cost.head_flops(TINY, lay) == 2 * 8 * 64 * 256


def test_single_step_time_is_the_sum_of_rooflines():
  p = cost.predict(TINY, deployments.SINGLE, 8, 16, UNIT)
  lay = per_device.layout(TINY, deployments.SINGLE, 8)
  proj = max(66048 / 1e9, 8 * 2 * 64 * 64 * 4 / 1e12)
  kv = max(65536 / 1e9, 8 * 4 * 64 * 16 / 1e12)
  experts = max((1052672 + 2097152 + 24576) / 1e9, cost.expert_flops(TINY, lay, 2048) / 1e12)
  head = max(73728 / 1e9, cost.head_flops(TINY, lay) / 1e12)
  assert p.tpot_s == pytest.approx(4 * (proj + kv + experts) + head)
  assert p.tps == pytest.approx(8 / p.tpot_s)
  assert p.work_s == pytest.approx(p.tpot_s)  # nothing to communicate on one device


def test_ring_period_and_bubbles():
  one = dataclasses.replace(deployments.SEED_PROPOSED, decode_groups=1)
  assert per_device.micro_steps(deployments.SEED_PROPOSED) == 4 == per_device.micro_steps(one)
  assert per_device.bubble_factor(deployments.SEED_PROPOSED) == 1  # 4 groups keep 4 stages busy
  assert per_device.bubble_factor(one) == 4  # one group: each stage busy one micro-step in 4
  assert per_device.bubble_factor(dataclasses.replace(one, decode_groups=8)) == 1
  assert per_device.bubble_factor(deployments.SINGLE) == 1


def test_ring_multiplies_tps_when_weights_dominate():
  """Same mesh, the same rows per device per micro-step: G groups in flight take about
  the same TPOT and give about G times the TPS (the seed slices' target)."""
  one = dataclasses.replace(deployments.SEED_PROPOSED, decode_groups=1)
  p1 = cost.predict(SEED, one, 1024, 128, hardware.H100_SXM)
  p4 = cost.predict(SEED, deployments.SEED_PROPOSED, 4096, 128, hardware.H100_SXM)
  assert p4.tpot_ms == pytest.approx(p1.tpot_ms, rel=0.02)
  assert p4.tps == pytest.approx(4 * p1.tps, rel=0.02)
  lay = per_device.layout(SEED, deployments.SEED_PROPOSED, 4096)
  assert (lay.micro_rows, lay.period, lay.group_rows) == (64, 4, 1024)


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


def test_imbalance_costs_kernel_rows():
  one = cost.predict(SEED, deployments.SINGLE, 1024, 128, hardware.H200, imbalance=1.0)
  skew = cost.predict(SEED, deployments.SINGLE, 1024, 128, hardware.H200, imbalance=2.3)
  assert skew.terms_s["experts"] > one.terms_s["experts"]  # past ~186 rows: FLOP-bound
  assert skew.ideal_s == one.ideal_s  # the floor counts real rows only


def test_floor_against_decode_md():
  # ../shared/DECODE.md, one H200 at 3.75 TB/s and 700 TFLOP/s, context 44: experts 4.58,
  # projections 0.79, KV 0.39 per layer, head 0.79: about 23.8 ms.
  hw = dataclasses.replace(hardware.H200, hbm_bytes_per_s=3.75e12, matmul_flops=700e12)
  ops = {name: k * max(b / hw.hbm_bytes_per_s, f / hw.matmul_flops) * 1e3
         for name, k, b, f in cost.floor_operations(SEED, deployments.SINGLE, 1024, 44)}
  assert ops["router and experts"] / 4 == pytest.approx(4.58, abs=0.01)
  assert ops["attention projections"] / 4 == pytest.approx(0.785, abs=0.01)
  assert ops["attention over the KV cache"] / 4 == pytest.approx(0.385, abs=0.01)
  assert ops["head"] == pytest.approx(0.785, abs=0.01)
  assert 1e3 * cost.floor_s(SEED, deployments.SINGLE, 1024, 44, hw) == pytest.approx(23.8, abs=0.1)


def test_memory_fit():
  assert not cost.predict(SEED, deployments.SINGLE, 1024, 128, hardware.H100_SXM).fits  # 72 GB + KV
  assert cost.predict(SEED, deployments.SINGLE, 1024, 32, hardware.H200).fits
  assert cost.predict(SEED, deployments.SEED_PROPOSED, 1024, 128, hardware.H100_SXM).fits


def test_seed_table_golden():
  # Golden numbers of the uncalibrated model (H100 datasheet, batch 1024, context 128).
  # Update them only with a deliberate change to a term of the model, and say which.
  # (Last: the decode ring, worst-case exchange buffers, the grouped kernel's rows and the
  # vocabulary-sharded head.)
  rows = {r["method"]: r["prediction"] for r in tables.seed_rows(hardware.H100_SXM, what_if=False)}
  assert rows["Baseline (TP=8, PP=2), one group"].tpot_ms == pytest.approx(5.97, abs=0.01)
  assert rows["Proposed cross-node EP, one group"].tpot_ms == pytest.approx(5.77, abs=0.01)
  assert rows["Proposed, ring of 4 groups of 256"].tpot_ms == pytest.approx(3.33, abs=0.01)
  ring = rows["Proposed, ring of 4 groups of 1024"]
  assert ring.tpot_ms == pytest.approx(5.77, abs=0.01) and ring.batch == 4096


def _records(truth, cases, context=64):
  out = []
  for dep, cfg, batch in cases:
    p = cost.predict(cfg, dep, batch, context, hardware.H200, truth)
    out.append({"model": dataclasses.asdict(cfg), "deployment": dataclasses.asdict(dep),
                "batch": batch, "context_len": context, "hardware": "h200",
                "tpot_ms": p.tpot_ms})
  return out


def test_calibrate_recovers_known_efficiency():
  truth = hardware.Efficiency(memory=0.8, compute=0.5, comm=0.4, overlap=1.0,
                              layer_overhead_s=30e-6)
  one_group = dataclasses.replace(deployments.SEED_PROPOSED, decode_groups=1)
  records = _records(truth, [(deployments.SINGLE, SEED, 1024),
                             (deployments.SINGLE, SEED, 8192),  # compute-bound experts
                             (deployments.SEED_BASELINE, SEED, 1024),
                             (deployments.SEED_PROPOSED, SEED, 1024),  # memory-bound
                             (one_group, SEED, 1024),
                             (deployments.PRESETS["proposed_8"], TINY, 8)])
  eff = calibrate.calibrate(records)
  assert eff.memory == pytest.approx(0.8, rel=2e-3)
  assert eff.compute == pytest.approx(0.5, rel=2e-3)
  assert eff.comm == pytest.approx(0.4, rel=2e-2)
  assert eff.layer_overhead_s == pytest.approx(30e-6, rel=2e-2)
  assert all(r["ratio"] == pytest.approx(1.0, rel=1e-2) for r in calibrate.validate(records, eff))


def test_calibrate_one_gpu_runs():
  # What one H200 gives: the whole model and one device's share of seed_proposed. Two
  # runs fit one roofline factor and the fixed per-layer cost (which dominates the share).

  truth = hardware.Efficiency(memory=0.85, compute=0.85, layer_overhead_s=400e-6)
  share, rows = plan.share_config(SEED, deployments.SEED_PROPOSED, 1024 // 4)
  records = _records(truth, [(deployments.SINGLE, SEED, 1024), (deployments.SINGLE, share, rows)])
  eff = calibrate.calibrate(records)
  assert eff.memory == pytest.approx(0.85, rel=2e-3)
  assert eff.compute == eff.memory
  assert eff.layer_overhead_s == pytest.approx(400e-6, rel=1e-2)
  assert eff.comm == 1.0
  # One run: one roofline factor.
  eff = calibrate.calibrate(records[:1])
  assert eff.memory == eff.compute and eff.comm == 1.0 and eff.layer_overhead_s == 0.0


def test_scaling_families_are_valid_deployments():
  curves = tables.scaling_curve(SEED, hardware.H100_SXM)
  for label, pts in curves.items():
    assert [p["gpus"] for p in pts] == [1, 2, 4, 8, 16, 32, 64, 128, 256], label
  assert tables.ep_deployment(SEED, 64) == deployments.SEED_PROPOSED
  assert tables.ep_deployment(SEED, 16, order="experts_first").mesh_shape == (1, 16, 1)
  assert tables.ep_deployment(SEED, 256).mesh_shape == (4, 16, 4)
  assert math.isfinite(curves["experts first, G = S"][4]["tps"])


def test_report_writes_plot(tmp_path):
  out = tables.report("h100", plot=str(tmp_path / "scaling.png"))
  assert "120,000" in out and "450,000" in out and "Proposed cross-node EP" in out
  assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.parametrize("experts, tokens, measured_ms", [(1, 1024, 1.74), (16, 128, 4.7)])
def test_expert_phase_against_shared_gpu_md(experts, tokens, measured_ms):
  # shared/GPU.md measured seed experts on one H200: 1 expert x 1024 tokens in 1.74 ms
  # (compute-bound), 16 experts x 128 tokens in 4.7 ms (at the copy ceiling). The ideal
  # roofline of the kernel's rows lands within 3%.
  cfg = dataclasses.replace(SEED, num_layers=1, num_experts=experts, top_k=1)
  lay = per_device.layout(cfg, deployments.SINGLE, tokens * experts)
  _, rows = per_device.expert_rows(cfg, lay)
  assert rows == tokens * experts
  bytes_ = cost.expert_weight_bytes(cfg, lay) + cost.expert_activation_bytes(cfg, lay, rows)
  h200 = hardware.H200
  t = max(bytes_ / h200.hbm_bytes_per_s, cost.expert_flops(cfg, lay, rows) / h200.matmul_flops)
  assert 1e3 * t == pytest.approx(measured_ms, rel=0.03)
