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
  # The largest: the next valid batch does not fit (not a halving's nearest fit).
  assert not memory_budget.fits(memory.footprint(seed, PRESETS["single"], b + 1, 32, 256), h200)
  # The same answer for any request above it.
  for asked in (b + 1, 3 * b, 10**8):
    assert memory_budget.largest_batch(seed, PRESETS["single"], asked, 32, 256, h200,
                                       "gpu") == b
  proposed = PRESETS["seed_proposed"]  # multiples of its least batch only
  got = memory_budget.largest_batch(seed, proposed, 10**6, 32, 256, h200, "gpu")
  assert got % proposed.min_batch == 0 and not memory_budget.fits(
      memory.footprint(seed, proposed, got + proposed.min_batch, 32, 256), h200)


def test_cpu_devices_share_the_host():
  budget = memory_budget.Budget(100, "host", shared=True)
  fp = memory.footprint(load_model("tiny"), PRESETS["proposed_8"], 8, 4, 8, platform="cpu")
  fp = dataclasses.replace(fp, weights={"all": 10}, kv_cache=0, state=0, temporaries=0,
                           work=memory.WorkingSet(0, 0, 0, 0, 0))
  assert memory_budget.need_bytes(fp, budget) == 80 and memory_budget.fits(fp, budget)
  assert not memory_budget.fits(fp, budget, held=3)  # 8 x 13 > 100
  with pytest.raises(ConfigError, match="--device_kind='tpu9'"):
    memory_budget.budget_for_kind("tpu9", 1)


def test_a_refusal_that_nothing_fixes_names_the_plan_command_it_is_given():
  seed = load_model("seed")
  fp = memory.footprint(seed, PRESETS["single"], 8, 16, 32, platform="cpu")
  budget = memory_budget.Budget(1 << 30, "a small host", shared=True, name="cpu")
  with pytest.raises(ConfigError, match="`jax-ep plan` prints the table"):
    memory_budget.check(fp, budget)
  with pytest.raises(ConfigError, match="`jax-ep plan --config=seed --device_kind=cpu` prints"):
    memory_budget.check(fp, budget, plan_command="jax-ep plan --config=seed --device_kind=cpu")
  with pytest.raises(ConfigError) as e:  # plan itself prints the table: no hint
    memory_budget.check(fp, budget, what="plan", plan_command="jax-ep plan --config=seed")
  assert "prints the table" not in str(e.value)


@pytest.mark.parametrize("platform,kind,want", [
    ("cpu", "cpu", "cpu"), ("gpu", "NVIDIA H200", "h200"), ("gpu", "NVIDIA H100 80GB HBM3", "h100"),
    ("gpu", "NVIDIA A100-SXM4-40GB", "a100_40"), ("gpu", "NVIDIA A100 80GB PCIe", "a100_80"),
    ("gpu", "Tesla T4", None)])
def test_plan_kind_names_the_device_kind_plan_knows(platform, kind, want):
  device = type("Device", (), {"platform": platform, "device_kind": kind})()
  assert memory_budget.plan_kind(device) == want
  assert want is None or want == "cpu" or want in memory_budget.DEVICE_MEMORY_MIB


def test_a_gpu_budget_asks_this_process_s_own_device(monkeypatch):
  """On process 1 of a multi-process run, devices[0] is process 0's: its memory_stats
  cannot be read there, so the budget comes from the first device this process holds."""
  class Device:
    platform, device_kind = "gpu", "NVIDIA H200"

    def __init__(self, process_index, limit):
      self.process_index, self.limit = process_index, limit

    def memory_stats(self):
      if self.process_index != 1:
        raise RuntimeError("another process's device")
      return {"bytes_limit": self.limit, "bytes_in_use": 0}

  monkeypatch.setattr("jax.process_index", lambda: 1)
  devices = [Device(0, 1), Device(0, 2), Device(1, 3 << 30), Device(1, 4)]
  budget = memory_budget.budget_for_devices(devices)
  assert budget.bytes == 3 << 30 and "allocator limit 3.0 GiB" in budget.source
  # None of them its own: its own first device, not devices[0].
  monkeypatch.setattr("jax.local_devices", lambda: [Device(1, 5 << 30)])
  assert memory_budget.budget_for_devices(devices[:2]).bytes == 5 << 30


def test_a_budget_of_unknown_memory_is_said_to_be_unchecked():
  fp = memory.footprint(load_model("tiny"), PRESETS["single"], 8, 4, 8, platform="cpu")
  unknown = memory_budget.Budget(float("inf"), "Tesla T4: memory unknown (not checked)")
  line = memory_budget.summary(fp, unknown)
  assert line.endswith("per device; Tesla T4: memory unknown (not checked).") and "fits" not in line
  assert "inf" not in line
  assert memory_budget.format_bytes(5000.0) == "5,000 bytes"
