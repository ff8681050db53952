"""Tests for jax_ep/memory.py: the planned bytes are the bytes Engine allocates and XLA
assigns; the estimate of the rest bounds XLA's temporaries."""

import math

import jax
import pytest

from configs import deployments, load_model
from jax_ep import decode, memory, memory_report
from jax_ep.config import DeploymentConfig
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
  # A request of 17 positions: generate allocates them rounded up to the kernel's tile.
  fp = memory.footprint(cfg, dep, 8, 4, 17, platform="cpu")
  assert fp.length == decode.cache_len(17) == 32
  assert set(_device_bytes(engine.init_cache(8, decode.cache_len(17))).values()) == {
      fp.kv_cache}


@pytest.mark.parametrize("name,batch", [("single", 8), ("baseline_8", 8), ("proposed_8", 8),
                                        ("proposed_16", 32)])
def test_state_bytes_are_the_decode_states_shards_and_the_prompts(name, batch):
  # Exact, per device: the prompt's tokens (split over expert), then the ring's state as
  # Engine.abstract_decode_state shards it: tokens, positions and the in-flight
  # activations of its groups (the micro-step counter's one int32 is left out).
  cfg, dep, prompt = load_model("tiny"), PRESETS[name], 4
  state = Engine(cfg, dep).abstract_decode_state(batch, 32)
  held = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
             for a in (state.tokens_B, state.pos_B, state.inflight_NxBgxD))
  assert memory.state_bytes(cfg, dep, batch, prompt) == batch // dep.expert * prompt * 4 + held


@pytest.mark.parametrize("model,dep,batch", [("tiny", PRESETS["single"], 8),
                                             ("tiny", PRESETS["baseline_8"], 8)])
def test_plan_against_xla_buffer_assignment(model, dep, batch):
  """Calibration (CPU): XLA's argument bytes are the planned weights, cache and inputs;
  its temporaries stay under the estimate, which is at most 3x them."""
  cfg = load_model(model)
  prompt, max_len = 16, 32
  fp = memory.footprint(cfg, dep, batch, prompt, max_len, platform="cpu")
  xla = memory_report.compiled_memory(Engine(cfg, dep), batch, prompt, max_len)
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


def test_default_batch_fits_the_deployment():
  assert PRESETS["proposed_16"].default_batch(8) == 16
  PRESETS["proposed_16"].check_batch(16)
  assert PRESETS["proposed_8"].default_batch(8) == 8 and PRESETS["single"].default_batch(8) == 8
  for dep in PRESETS.values():
    dep.check_batch(dep.default_batch(8))
