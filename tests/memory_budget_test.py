"""Tests for jax_ep/memory_budget.py: what a device holds; refusals name the smallest
deployment and the largest batch that fit."""

import dataclasses

import pytest

from configs import deployments, load_model
from jax_ep import memory, memory_budget
from jax_ep.config import ConfigError

PRESETS = deployments.PRESETS


def test_seed_on_one_h100_is_refused_naming_the_smallest_deployment_that_fits():
  seed = load_model("seed")
  h100 = memory_budget.budget_for_kind("h100", 1, fraction=0.75)
  fp = memory.footprint(seed, PRESETS["single"], 8, 16, 32)
  d, f, v, layers, experts = 8192, 32768, 32768, 4, 16
  by_hand = (layers * experts * 2 * d * f * 2 + layers * 4 * d * d * 2 + 2 * v * d * 2
             + layers * d * experts * 4 + (2 * layers + 1) * d * 2)  # router f32, norms
  assert fp.weight_total == by_hand
  with pytest.raises(ConfigError) as e:
    memory_budget.check(fp, h100, candidates=PRESETS)
  msg = str(e.value)
  assert "does not fit" in msg and "--deployment=proposed_2 (2 devices" in msg
  assert "--batch=" not in msg  # the weights alone overflow: no batch fits
  assert memory_budget.fits(memory.footprint(seed, PRESETS["proposed_2"], 8, 16, 32), h100)


def test_a_batch_too_large_for_the_cache_names_the_largest_batch_that_fits():
  seed = load_model("seed")
  h200 = memory_budget.budget_for_kind("h200", 1, fraction=0.95)
  fp = memory.footprint(seed, PRESETS["single"], 4096, 32, 256)
  assert not memory_budget.fits(fp, h200)
  with pytest.raises(ConfigError, match=r"--batch=(\d+) fits") as e:
    memory_budget.check(fp, h200)
  b = int(str(e.value).split("--batch=")[1].split()[0])
  assert memory_budget.fits(memory.footprint(seed, PRESETS["single"], b, 32, 256), h200)
  assert not memory_budget.fits(memory.footprint(seed, PRESETS["single"], 2 * b, 32, 256), h200)


def test_cpu_devices_share_the_host():
  budget = memory_budget.Budget(100, "host", shared=True)
  fp = memory.footprint(load_model("tiny"), PRESETS["proposed_8"], 8, 4, 8, platform="cpu")
  fp = dataclasses.replace(fp, weights={"all": 10}, kv_cache=0, state=0, temporaries=0,
                           work=memory.WorkingSet(0, 0, 0, 0, 0))
  assert memory_budget.need_bytes(fp, budget) == 80 and memory_budget.fits(fp, budget)
  assert not memory_budget.fits(fp, budget, held=3)  # 8 x 13 > 100
  with pytest.raises(ConfigError, match="--device_kind='tpu9'"):
    memory_budget.budget_for_kind("tpu9", 1)
