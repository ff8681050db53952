"""jax_ep/perf/per_device.py: what one device holds and processes per micro-step (Layout),
the kernel's rows, the ring's period and bubbles, computed by hand; no jax."""

import dataclasses

from configs import deployments, load_model
from jax_ep.perf import per_device

TINY = load_model("tiny")  # L4 E16 K2, H8 x 8 = D64, F128, V256, float32 (4 bytes), gelu
SEED = load_model("seed")


def test_layout_single_tiny():
  lay = per_device.layout(TINY, deployments.SINGLE, 8)
  assert (lay.layers, lay.heads, lay.experts, lay.mlp) == (4, 8, 16, 128)
  assert (lay.rows, lay.groups, lay.period, lay.micro_rows, lay.moe_tokens) == (8, 1, 1, 8, 8)
  # Dropless: all 8 tokens x 2 picks could go to the one device.
  assert (lay.ep_size, lay.send_rows, lay.vocab_shards, lay.group_rows) == (1, 16, 1, 8)


def test_expert_rows_follow_the_kernel_tiles():
  lay = per_device.layout(SEED, deployments.SINGLE, 1024)
  assert per_device.expert_rows(SEED, lay) == (2048, 2048)  # 128 rows per expert: one 128-row tile
  # The busiest expert gets 1.5 x 128 = 192 rows (a tile and a 64-row tail in it), the
  # other 15 share the rest (124 each, one tile): the same 2048 real rows.
  real, kernel = per_device.expert_rows(SEED, lay, imbalance=1.5)
  assert (real, kernel) == (2048, 128 + 64 + 15 * 128)
  real, kernel = per_device.expert_rows(SEED, lay, imbalance=2.0)  # 256: two full tiles
  assert (real, kernel) == (2048, 256 + 15 * 128)
  lay = per_device.layout(TINY, deployments.SINGLE, 8)
  assert per_device.expert_rows(TINY, lay) == (16, 16 * 128)  # 1 row each, still a whole tile


def test_ring_period_and_bubbles():
  one = dataclasses.replace(deployments.SEED_PROPOSED, decode_groups=1)
  assert per_device.micro_steps(deployments.SEED_PROPOSED) == 4 == per_device.micro_steps(one)
  assert per_device.bubble_factor(deployments.SEED_PROPOSED) == 1  # 4 groups keep 4 stages busy
  assert per_device.bubble_factor(one) == 4  # one group: each stage busy one micro-step in 4
  assert per_device.bubble_factor(dataclasses.replace(one, decode_groups=8)) == 1
  assert per_device.bubble_factor(deployments.SINGLE) == 1
