"""Tests for jax_ep/memory.py: the planned bytes are the bytes Engine allocates and XLA
assigns; the estimate of the rest bounds XLA's temporaries; refusals name what fits."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import deployments, load_model
from jax_ep import decode, memory
from jax_ep.config import ConfigError, DeploymentConfig
from jax_ep.engine import Engine

PRESETS = deployments.PRESETS
TP2 = DeploymentConfig(kind="proposed", stages=2, expert=2, tp=2, placement="tp", microbatches=2)


def _device_bytes(tree):
  """Bytes each device holds of `tree`, by device id."""
  held = {}
  for a in jax.tree.leaves(tree):
    for s in a.addressable_shards:
      held[s.device.id] = held.get(s.device.id, 0) + s.data.nbytes
  return held


@pytest.mark.parametrize("model,dep", [("tiny", PRESETS["baseline_8"]), ("tiny_swiglu", TP2)])
def test_weights_and_cache_are_the_shards_engine_allocates(model, dep):
  cfg = load_model(model)
  engine = Engine(cfg, dep)
  held = _device_bytes(engine.init_params(0))
  assert len(held) == dep.num_devices
  assert set(held.values()) == {sum(memory.weight_bytes(cfg, dep).values())}
  cache = _device_bytes(engine.init_cache(8, 32))
  assert set(cache.values()) == {memory.kv_cache_bytes(cfg, dep, 8, 32)}


@pytest.mark.parametrize("model,dep,batch", [("tiny", PRESETS["single"], 8),
                                             ("tiny", PRESETS["baseline_8"], 8)])
def test_plan_against_xla_buffer_assignment(model, dep, batch):
  """Calibration (CPU): XLA's argument bytes are the planned weights, cache and inputs;
  its temporaries stay under the estimate, which is at most 3x them."""
  cfg = load_model(model)
  prompt, max_len = 16, 32
  fp = memory.footprint(cfg, dep, batch, prompt, max_len, platform="cpu")
  xla = memory.compiled_memory(Engine(cfg, dep), batch, prompt, max_len)
  exact = fp.weight_total + fp.kv_cache
  for program in ("prefill", "decode"):
    extra = xla[program]["argument"] - exact  # tokens, positions, the ring's state
    assert 0 < extra <= fp.state, (program, extra, fp.state)
  temp = max(m["temp"] for m in xla.values())
  estimate = fp.work.total + fp.temporaries
  assert temp <= estimate <= 3 * temp, (temp, fp.work, fp.temporaries)


def test_prefill_rows_constant_is_decodes():
  assert memory.PREFILL_ROWS_PER_DEVICE == decode.PREFILL_ROWS_PER_DEVICE
  assert memory.cache_len(17) == decode.cache_len(17) == 32


def test_seed_on_one_h100_is_refused_naming_the_smallest_deployment_that_fits():
  seed = load_model("seed")
  h100 = memory.budget_for_kind("h100", 1, fraction=0.75)
  fp = memory.footprint(seed, PRESETS["single"], 8, 16, 32)
  d, f, v, layers, experts = 8192, 32768, 32768, 4, 16
  by_hand = (layers * experts * 2 * d * f * 2 + layers * 4 * d * d * 2 + 2 * v * d * 2
             + layers * d * experts * 4 + (2 * layers + 1) * d * 2)  # router f32, norms
  assert fp.weight_total == by_hand
  with pytest.raises(ConfigError) as e:
    memory.check(fp, h100, candidates=PRESETS)
  msg = str(e.value)
  assert "does not fit" in msg and "--deployment=proposed_2 (2 devices" in msg
  assert "--batch=" not in msg  # the weights alone overflow: no batch fits
  assert memory.fits(memory.footprint(seed, PRESETS["proposed_2"], 8, 16, 32), h100)


def test_a_batch_too_large_for_the_cache_names_the_largest_batch_that_fits():
  seed = load_model("seed")
  h200 = memory.budget_for_kind("h200", 1, fraction=0.95)
  fp = memory.footprint(seed, PRESETS["single"], 4096, 32, 256)
  assert not memory.fits(fp, h200)
  with pytest.raises(ConfigError, match=r"--batch=(\d+) fits") as e:
    memory.check(fp, h200)
  b = int(str(e.value).split("--batch=")[1].split()[0])
  assert memory.fits(memory.footprint(seed, PRESETS["single"], b, 32, 256), h200)
  assert not memory.fits(memory.footprint(seed, PRESETS["single"], 2 * b, 32, 256), h200)


def test_cpu_devices_share_the_host():
  budget = memory.Budget(100, "host", shared=True)
  fp = memory.footprint(load_model("tiny"), PRESETS["proposed_8"], 8, 4, 8, platform="cpu")
  fp = dataclasses.replace(fp, weights={"all": 10}, kv_cache=0, state=0, temporaries=0,
                           work=memory.WorkingSet(0, 0, 0, 0, 0))
  assert memory.need_bytes(fp, budget) == 80 and memory.fits(fp, budget)
  assert not memory.fits(fp, budget, held=3)  # 8 x 13 > 100
  with pytest.raises(ConfigError, match="--device_kind='tpu9'"):
    memory.budget_for_kind("tpu9", 1)


@pytest.mark.parametrize("name", ["seed_baseline", "seed_proposed", "seed_proposed_tp2"])
def test_holdings_cover_every_weight_once_per_replica(name):
  cfg, dep = load_model("seed"), PRESETS[name]
  rows = memory.holdings(cfg, dep, 1024)
  held = np.zeros((cfg.num_layers, cfg.num_experts, cfg.mlp_dim // 512), int)  # 512-col blocks
  vocab = np.zeros((dep.stages, cfg.vocab_size), int)
  for r in rows:
    layers, experts, cols = (slice(*r["layers"]), slice(*r["experts"]),
                             slice(r["mlp_columns"][0] // 512, r["mlp_columns"][1] // 512))
    held[layers, experts, cols] += 1
    vocab[r["stage"], slice(*r["vocab"])] += 1
  assert (held == 1).all()  # every block of every expert on exactly one device
  assert (vocab == 1).all()  # each stage's devices split the vocabulary
  assert {r["sequences"] for r in rows} == {(e * 1024 // dep.expert, (e + 1) * 1024 // dep.expert)
                                           for e in range(dep.expert)}


def test_default_batch_fits_the_deployment():
  assert PRESETS["proposed_16"].default_batch(8) == 16
  PRESETS["proposed_16"].check_batch(16)
  assert PRESETS["proposed_8"].default_batch(8) == 8 and PRESETS["single"].default_batch(8) == 8
  for dep in PRESETS.values():
    dep.check_batch(dep.default_batch(8))
