"""jax_ep/perf/cost.py: the cost model's terms, prediction and floor on small deployments
and the seed's, computed by hand; no jax. (Its parts: perf_per_device_test,
perf_collectives_test, perf_calibrate_test, perf_tables_test.)"""

import dataclasses

import pytest

from configs import deployments, load_model
from jax_ep.perf import cost, hardware, per_device

TINY = load_model("tiny")  # L4 E16 K2, H8 x 8 = D64, F128, V256, float32 (4 bytes), gelu
SEED = load_model("seed")

# A machine with round numbers, so times are easy to check by hand.
UNIT = hardware.Hardware("unit", hbm_bytes_per_s=1e9, matmul_flops=1e12, intra_node_bytes_per_s=1e8,
                   inter_node_bytes_per_s=1e7, gpus_per_node=8, collective_latency_s=1e-5)


def test_bytes_single_tiny():
  lay = per_device.layout(TINY, deployments.SINGLE, 8)
  assert cost.attention_weight_bytes(TINY, lay) == (4 * 64 * 64 + 2 * 64) * 4  # wq wk wv wo, norms
  assert cost.expert_weight_bytes(TINY, lay) == 16 * 2 * 64 * 128 * 4 + 64 * 16 * 4  # + f32 router
  assert cost.kv_read_bytes(TINY, lay, 16) == 8 * 16 * 2 * 64 * 4  # rows x cache x (k, v) x H*Dh
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
