"""perf_model's arithmetic on small deployments, computed by hand; no jax computation."""

import dataclasses
import math

import pytest

from configs import deployments, load_model
from jax_ep import perf_model as pm

TINY = load_model("tiny")  # L4 E16 K2, H8 x 8 = D64, F128, V256, float32 (4 bytes), gelu
SEED = load_model("seed")

# A machine with round numbers, so times are easy to check by hand.
UNIT = pm.Hardware("unit", hbm_bytes_per_s=1e9, matmul_flops=1e12, intra_node_bytes_per_s=1e8,
                   inter_node_bytes_per_s=1e7, gpus_per_node=8, collective_latency_s=1e-5)


def test_layout_single_tiny():
  lay = pm.layout(TINY, deployments.SINGLE, 8)
  assert (lay.layers, lay.heads, lay.experts, lay.mlp) == (4, 8, 16, 128)
  assert (lay.rows, lay.micro_rows, lay.moe_tokens, lay.chunks) == (8, 8, 8, 1)
  # 8 tokens x 2 picks / 16 experts = 1 per expert, x capacity factor 2.
  assert (lay.capacity, lay.ep_size, lay.micro_steps) == (2, 1, 1)


def test_bytes_single_tiny():
  lay = pm.layout(TINY, deployments.SINGLE, 8)
  assert pm.attention_weight_bytes(TINY, lay) == (4 * 64 * 64 + 2 * 64) * 4  # wq wk wv wo, norms
  assert pm.expert_weight_bytes(TINY, lay) == 16 * 2 * 64 * 128 * 4 + 64 * 16 * 4  # + f32 router
  assert pm.kv_read_bytes(TINY, lay, 16) == 8 * 16 * 2 * 64 * 4  # rows x cache x (k, v) x H*K
  assert pm.head_bytes(TINY, lay) == 64 * 256 * 4 + 8 * 256 * 4  # unembedding + f32 logits
  # hidden [16, 2, 128] written and read, and the [16, 2, 64] buffers in and out, both ways
  assert pm.expert_activation_bytes(TINY, lay) == 16 * 2 * 128 * 4 * 2 + 4 * 16 * 2 * 64 * 4
  p = pm.predict(TINY, deployments.SINGLE, 8, 16, UNIT)
  per_layer = 66048 + 8 * 16 * 2 * 64 * 4 + 1052672 + 65536
  assert p.hbm_bytes == 4 * per_layer + 73728
  assert p.comm_bytes == {"intra": 0, "inter": 0}


def test_flops_single_tiny():
  lay = pm.layout(TINY, deployments.SINGLE, 8)
  # 4 projections of 64 x 64 and scores over 16 cached positions (QK and PV), 8 rows.
  assert pm.attention_flops(TINY, lay, 16) == 8 * (2 * 64 * 64 * 4 + 4 * 64 * 16)
  # 16 experts x 2 padded slots x 2 matmuls of 64 x 128, and the router on 8 tokens.
  assert pm.expert_flops(TINY, lay) == 16 * 2 * 2 * 64 * 128 * 2 + 2 * 8 * 64 * 16
  assert pm.head_flops(TINY, lay) == 2 * 8 * 64 * 256


def test_single_step_time_is_the_sum_of_rooflines():
  p = pm.predict(TINY, deployments.SINGLE, 8, 16, UNIT)
  lay = pm.layout(TINY, deployments.SINGLE, 8)
  attn = max((66048 + 65536) / 1e9, pm.attention_flops(TINY, lay, 16) / 1e12)
  experts = max((1052672 + 65536) / 1e9, pm.expert_flops(TINY, lay) / 1e12)
  head = max(73728 / 1e9, pm.head_flops(TINY, lay) / 1e12)
  assert p.tpot_s == pytest.approx(4 * (attn + experts) + head)
  assert p.tps == pytest.approx(8 / p.tpot_s)
  assert p.work_s == pytest.approx(p.tpot_s)  # nothing to communicate on one device


def _decode_m(dep, m=None):
  """The deployment decoding with m micro-batches (default: its prefill's)."""
  return dataclasses.replace(dep, decode_microbatches=m or dep.microbatches)


def test_bubble_factor_and_micro_steps():
  assert pm.micro_steps(_decode_m(deployments.SEED_PROPOSED)) == 4 + 4 - 1
  assert pm.bubble_factor(_decode_m(deployments.SEED_PROPOSED)) == 7 / 4
  assert pm.bubble_factor(_decode_m(deployments.SEED_BASELINE)) == 3 / 2
  assert pm.bubble_factor(deployments.SEED_PROPOSED) == 4  # decode M = 1: S steps, 1 useful
  assert pm.bubble_factor(deployments.SINGLE) == 1


def test_pipeline_rereads_weights_every_micro_step():
  dep = _decode_m(deployments.PRESETS["proposed_8"])  # S4 x E2, M4: 1 layer, 8 experts
  lay = pm.layout(TINY, dep, 8)
  assert (lay.layers, lay.experts, lay.rows, lay.micro_rows, lay.micro_steps) == (1, 8, 4, 1, 7)
  p = pm.predict(TINY, dep, 8, 16, UNIT)
  weights = pm.attention_weight_bytes(TINY, lay) + pm.expert_weight_bytes(TINY, lay)
  rest = pm.kv_read_bytes(TINY, lay, 16) + pm.expert_activation_bytes(TINY, lay)
  assert p.hbm_bytes == 7 * (weights + rest) + pm.head_bytes(TINY, lay)


def test_all_to_all_volume():
  dep = _decode_m(deployments.PRESETS["proposed_8"])
  lay = pm.layout(TINY, dep, 8)
  assert lay.capacity == 1  # 1 token x 2 picks / 16 experts x 2, at least 1
  # Buffer [16 experts, C=1, 64] float32; half of it goes to the other expert device.
  assert pm.all_to_all_bytes(TINY, dep, lay, 8) == (16 * 64 * 4 / 2, 0)
  assert pm.all_to_all_bytes(TINY, dep, lay, 1) == (0, 16 * 64 * 4 / 2)  # one GPU per node
  # The seed's 64 GPUs: 16 experts of a layer over 2 nodes of 8; C = 16 x 2 / 16 x 2 = 4,
  # buffer [16, 4, 8192] fp16 = 1 MiB, 64 KiB per peer: 7 peers on NVLink, 8 across nodes.
  seed_m4 = _decode_m(deployments.SEED_PROPOSED)
  lay = pm.layout(SEED, seed_m4, 1024)
  assert (lay.micro_rows, lay.capacity) == (16, 4)
  assert pm.all_to_all_bytes(SEED, seed_m4, lay, 8) == (7 * 65536, 8 * 65536)
  # Per step: dispatch and return, 1 layer, 7 micro-steps.
  p = pm.predict(SEED, seed_m4, 1024, 128, pm.H100_SXM)
  assert p.comm_bytes["inter"] == 7 * (2 * 8 * 65536 + 16 * 8192 * 2) + 64 * 8192 * 2 * 2 * 3 / 4


def test_tp_and_pipeline_collectives():
  dep = _decode_m(deployments.PRESETS["baseline_8"])  # S2 x TP4, experts over tp, M2
  lay = pm.layout(TINY, dep, 8)
  assert (lay.heads, lay.experts, lay.micro_rows, lay.moe_tokens) == (2, 4, 4, 1)
  assert pm.tp_allreduce_bytes(TINY, dep, lay) == 2 * 3 / 4 * 4 * 64 * 4  # ring, [4, 64] f32
  assert pm.tp_allgather_bytes(TINY, dep, lay) == 3 * 1 * 64 * 4
  assert pm.pipeline_bytes(TINY, dep, lay) == 4 * 64 * 4
  assert pm.final_broadcast_bytes(TINY, dep, lay) == 2 * 1 / 2 * 8 * 64 * 4
  assert pm.group_peers(dep, ("tp",), 8) == (3, 0)
  assert pm.group_peers(dep, ("stage",), 4) == (0, 1)  # stage 1 is devices 4..7


def test_expert_tp_placement():
  dep = deployments.SEED_PROPOSED_TP2
  lay = pm.layout(SEED, dep, 1024)
  assert (lay.experts, lay.mlp, lay.ep_size) == (1, 16384, 16)
  size = 1 * 16 * lay.capacity * 8192 * 2
  assert pm.expert_tp_psum_bytes(SEED, dep, lay) == 2 * 1 / 2 * size


def test_exchange_capacity_follows_imbalance():
  dep = deployments.SEED_PROPOSED
  lay = pm.layout(SEED, dep, 1024)  # decode M = 1: 64 tokens, mean queue 64 x 2 / 16 = 8
  assert lay.capacity == 16
  assert pm.exchange_capacity(SEED, dep, lay, 1.0) == (16, 1)
  assert pm.exchange_capacity(SEED, dep, lay, 2.5) == (24, 1)  # a queue of 20 fits 1.5 C
  assert pm.exchange_capacity(SEED, dep, lay, 5.0) == (48, 1)  # 40 fits 3 C
  small = dataclasses.replace(dep, capacity_factor=0.5)  # C = 4, buckets 4, 6, 8, 12, 16
  lay = pm.layout(SEED, small, 1024)
  assert pm.exchange_capacity(SEED, small, lay, 3.0) == (16, 2)  # 24 > 16: two rounds
  assert pm.exchange_rounds(SEED, small, lay, 3.0) == 2
  assert pm.exchange_capacity(SEED, dataclasses.replace(small, dropless=False), lay, 3.0) == (4, 1)
  one = pm.predict(SEED, small, 1024, 128, pm.H100_SXM, imbalance=1.0)
  two = pm.predict(SEED, small, 1024, 128, pm.H100_SXM, imbalance=3.0)
  assert (one.rounds, two.rounds) == (1, 2)
  assert two.terms_s["experts"] > 1.9 * one.terms_s["experts"]  # the weights read twice


def test_moe_chunks_reread_experts():
  dep = dataclasses.replace(deployments.SEED_PROPOSED, moe_chunks=2)
  one = pm.predict(SEED, deployments.SEED_PROPOSED, 1024, 128, pm.H100_SXM)
  two = pm.predict(SEED, dep, 1024, 128, pm.H100_SXM)
  assert two.terms_s["experts"] > 1.9 * one.terms_s["experts"]
  none = pm.predict(SEED, dep, 1024, 128, pm.H100_SXM, pm.Efficiency(overlap=0.0))
  assert none.terms_s["all_to_all"] > two.terms_s["all_to_all"]


def test_memory_fit():
  assert not pm.predict(SEED, deployments.SINGLE, 1024, 128, pm.H100_SXM).fits  # 72 GB + KV
  assert pm.predict(SEED, deployments.SINGLE, 1024, 32, pm.H200).fits
  assert pm.predict(SEED, deployments.SEED_PROPOSED, 1024, 128, pm.H100_SXM).fits


def test_seed_table_golden():
  # Golden numbers of the uncalibrated model (H100 datasheet, batch 1024, context 128).
  # Update them only with a deliberate change to a term of the model, and say which.
  # (Last: decode micro-batches default to 1, so the presets decode with M = 1.)
  rows = {r["method"]: r["prediction"] for r in pm.seed_rows(pm.H100_SXM, what_if=False)}
  assert rows["Baseline (TP=8, PP=2)"].tpot_ms == pytest.approx(5.99, abs=0.01)
  assert rows["Proposed cross-node EP"].tpot_ms == pytest.approx(3.30, abs=0.01)


def _records(truth, cases, context=64):
  out = []
  for dep, cfg, batch in cases:
    p = pm.predict(cfg, dep, batch, context, pm.H200, truth)
    out.append({"model": dataclasses.asdict(cfg), "deployment": dataclasses.asdict(dep),
                "batch": batch, "context_len": context, "hardware": "h200",
                "tpot_ms": p.tpot_ms})
  return out


def test_calibrate_recovers_known_efficiency():
  truth = pm.Efficiency(memory=0.8, compute=0.5, comm=0.4, overlap=1.0, layer_overhead_s=30e-6)
  records = _records(truth, [(deployments.SINGLE, SEED, 1024),  # compute-bound experts
                             (deployments.SEED_BASELINE, SEED, 1024),
                             (deployments.SEED_PROPOSED, SEED, 1024),  # memory-bound
                             (deployments.PRESETS["proposed_8"], TINY, 8)])
  eff = pm.calibrate(records)
  assert eff.memory == pytest.approx(0.8, rel=2e-3)
  assert eff.compute == pytest.approx(0.5, rel=2e-3)
  assert eff.comm == pytest.approx(0.4, rel=2e-2)
  assert eff.layer_overhead_s == pytest.approx(30e-6, rel=2e-2)
  assert all(r["ratio"] == pytest.approx(1.0, rel=1e-2) for r in pm.validate(records, eff))


def test_calibrate_one_gpu_runs():
  # What one H200 gives: the whole model and one device's share of seed_proposed. Two
  # runs fit one roofline factor and the fixed per-layer cost (which dominates the share).
  from jax_ep import bench

  truth = pm.Efficiency(memory=0.85, compute=0.85, layer_overhead_s=400e-6)
  share, rows = bench.share_config(SEED, deployments.SEED_PROPOSED, 1024)
  records = _records(truth, [(deployments.SINGLE, SEED, 1024), (deployments.SINGLE, share, rows)])
  eff = pm.calibrate(records)
  assert eff.memory == pytest.approx(0.85, rel=2e-3)
  assert eff.compute == eff.memory
  assert eff.layer_overhead_s == pytest.approx(400e-6, rel=1e-2)
  assert eff.comm == 1.0
  # One run: one roofline factor.
  eff = pm.calibrate(records[:1])
  assert eff.memory == eff.compute and eff.comm == 1.0 and eff.layer_overhead_s == 0.0


def test_scaling_families_are_valid_deployments():
  curves = pm.scaling_curve(SEED, pm.H100_SXM)
  for label, pts in curves.items():
    assert [p["gpus"] for p in pts] == [1, 2, 4, 8, 16, 32, 64, 128, 256], label
  assert pm.ep_deployment(SEED, 64) == deployments.SEED_PROPOSED
  assert pm.ep_deployment(SEED, 16, order="experts_first").mesh_shape == (1, 16, 1)
  assert pm.ep_deployment(SEED, 256).mesh_shape == (4, 16, 4)
  assert math.isfinite(curves["experts first, decode M = 1"][4]["tps"])


def test_report_writes_plot(tmp_path):
  out = pm.report("h100", plot=str(tmp_path / "scaling.png"))
  assert "120,000" in out and "450,000" in out and "Proposed cross-node EP" in out
  assert (tmp_path / "scaling.png").stat().st_size > 0


@pytest.mark.parametrize("experts, tokens, measured_ms", [(1, 1024, 1.74), (16, 128, 4.7)])
def test_expert_phase_against_shared_gpu_md(experts, tokens, measured_ms):
  # shared/GPU.md measured seed experts on one H200: 1 expert x 1024 tokens in 1.74 ms
  # (compute-bound), 16 experts x 128 tokens in 4.7 ms (at the copy ceiling). The ideal
  # roofline of the same buffers lands within 3%.
  cfg = dataclasses.replace(SEED, num_layers=1, num_experts=experts, top_k=1)
  dep = dataclasses.replace(deployments.SINGLE, capacity_factor=1.0)
  lay = pm.layout(cfg, dep, tokens * experts)
  assert lay.capacity == tokens
  bytes_ = pm.expert_weight_bytes(cfg, lay) + pm.expert_activation_bytes(cfg, lay)
  t = max(bytes_ / pm.H200.hbm_bytes_per_s, pm.expert_flops(cfg, lay) / pm.H200.matmul_flops)
  assert 1e3 * t == pytest.approx(measured_ms, rel=0.03)
