"""Tests for jax_ep/ring.py: decode groups in flight on a ring of stages produce, for every
sequence, exactly the tokens and caches of one-group decoding and of the single device
(model.Transformer.__call__, tests/reference.py), groups at different positions
included; the compiled ring has no conditional and a loop of known trip count."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from configs import deployments, load_model
from jax_ep import decode, ring
from jax_ep.config import DeploymentConfig
from jax_ep.engine import Engine
from tests import reference

PROMPT, NEW, CACHE = 3, 5, 16
PRESETS = deployments.PRESETS

# name -> (deployment, batch): 2 and 4 stages on 8 and 16 devices, G = S and G > S.
RINGS = {
    "2_stages_8_devices_g2": (DeploymentConfig(kind="proposed", stages=2, expert=4,
                                               microbatches=2), 16),
    "2_stages_8_devices_g4": (DeploymentConfig(kind="proposed", stages=2, expert=4,
                                               microbatches=2, decode_groups=4), 16),
    "4_stages_8_devices_g4": (PRESETS["proposed_8"], 16),
    "4_stages_16_devices_g4": (PRESETS["proposed_16"], 32),
    "baseline_8_g2": (PRESETS["baseline_8"], 8),  # tp 4: the head's vocabulary over tp
    # 1 < G < S, G not dividing S: 3 real groups and one idle slot in a period of 4.
    "4_stages_8_devices_g3": (dataclasses.replace(PRESETS["proposed_8"], decode_groups=3), 24),
}


def _ref() -> reference.Reference:
  return reference.of(load_model("tiny"))


@functools.cache
def _single():
  """The engine on one device (for sampling, which the reference does not do)."""
  engine = Engine(load_model("tiny"), deployments.SINGLE)
  return engine, engine.place_params(_ref().params)


def _prompts(batch):
  # Seed 3: the greedy top-2 logit gaps stay far above float32 noise (engine_test.py).
  return np.random.default_rng(3).integers(0, 256, (batch, PROMPT)).astype(np.int32)


def _run(engine, params, prompts, calls, pos_shift=None):
  """Prefill, then `calls` ring calls (the first also fills the ring). pos_shift: {group:
  k} puts group g k positions back, feeding its last k prompt tokens again.

  Returns (tokens per sequence [B, 1 + calls], canonical cache, (token, pick) pairs per
  expert [L, E] that prefill and the ring calls routed, picks dropped).
  """
  dep, b = engine.dep, prompts.shape[0]
  key = jax.random.key(0)
  cache = engine.init_cache(b, CACHE)
  tokens = jax.device_put(jnp.asarray(prompts), engine.tokens_sharding())
  first, cache, stats = engine.prefill_program()(params, cache, tokens, jnp.int32(0), key)
  load, dropped = np.asarray(stats.load_E), int(np.asarray(stats.dropped).sum())
  first, pos = np.array(first), np.full((b,), PROMPT, np.int32)
  for g, k in (pos_shift or {}).items():
    ids = np.asarray(ring.group_ids(g, b, dep.groups, dep.expert, xp=np))
    first[ids], pos[ids] = prompts[ids, PROMPT - k], PROMPT - k
  state = engine.decode_state(jnp.asarray(first), jnp.asarray(pos), cache)
  outs = []
  for i in range(calls):
    steps = ring.first_call_steps(dep.groups, dep.stages) if i == 0 else dep.ring_period
    state, out, stats = engine.decode_program(b, steps)(params, state, key)
    outs.append(out)
    load, dropped = load + np.asarray(stats.load_E), dropped + int(np.asarray(stats.dropped).sum())
  new = decode.assemble(first, outs, b, dep.groups, dep.expert, calls)
  return new, [np.asarray(a) for a in engine.canonical_cache(state.cache)], load, dropped


@pytest.mark.parametrize("name", sorted(RINGS))
def test_ring_equals_one_group_and_the_single_device(name):
  dep, batch = RINGS[name]
  ref = _ref()
  prompts = _prompts(batch)
  ring_engine = Engine(ref.cfg, dep)
  one_engine = Engine(ref.cfg, dataclasses.replace(dep, decode_groups=1))
  placed = ring_engine.place_params(ref.params)
  tokens, cache, load, dropped = _run(ring_engine, placed, prompts, NEW - 1)
  one_tokens, one_cache, one_load, one_dropped = _run(one_engine, placed, prompts, NEW - 1)
  want = ref.generate(prompts, NEW, CACHE)
  want_cache = [np.asarray(a) for a in want.cache]
  assert_array_equal(tokens, one_tokens)
  assert_array_equal(tokens, want.tokens_BxO)
  # The same routing, counted once per (token, pick). One group in flight routes exactly
  # the fed tokens; a ring call ends with groups in flight whose next tokens the first
  # stages have routed already: the last stage routed exactly the fed tokens.
  assert_array_equal(one_load, want.load_LxE)
  assert_array_equal(load[-1], want.load_LxE[-1])
  assert (load >= want.load_LxE).all()
  assert dropped == one_dropped == 0
  # Positions of finished tokens. A ring call ends with groups in flight: their next
  # token has been through the first stages, whose layers wrote position done (it is
  # the ring's next call that finishes it).
  done = PROMPT + NEW - 1
  for got, one, want in zip(cache, one_cache, want_cache, strict=True):
    assert_allclose(got[..., :done, :], one[..., :done, :], rtol=1e-5, atol=1e-5)
    assert_allclose(got[..., :done, :], want[..., :done, :], rtol=1e-5, atol=1e-5)
    assert_array_equal(one[..., done:, :], 0)  # one group in flight: nothing past done


def test_groups_at_different_positions():
  """Group 1 starts a position back (its last prompt token fed again): it runs one
  step behind the others on the same ring, and each of its sequences produces the
  single device's tokens from one position earlier."""
  dep, batch = RINGS["4_stages_8_devices_g4"]
  ref = _ref()
  prompts = _prompts(batch)
  engine = Engine(ref.cfg, dep)
  tokens = _run(engine, engine.place_params(ref.params), prompts, NEW - 1, pos_shift={1: 1})[0]
  want = ref.generate(prompts, NEW, CACHE).tokens_BxO
  late = np.asarray(ring.group_ids(1, batch, dep.groups, dep.expert, xp=np))
  on_time = np.setdiff1d(np.arange(batch), late)
  assert_array_equal(tokens[on_time], want[on_time])
  # Group 1's first ring token is the token at position PROMPT: prefill's sample.
  assert_array_equal(tokens[late, 1:], want[late, :-1])


def test_generate_uses_the_ring_and_equals_the_single_device():
  dep, batch = RINGS["4_stages_16_devices_g4"]
  ref = _ref()
  # Two tokens per call: each call runs two ring periods in its loop.
  engine = Engine(ref.cfg, dataclasses.replace(dep, tokens_per_call=2))
  gen = decode.generate(engine, engine.place_params(ref.params), _prompts(batch), NEW,
                        max_len=PROMPT + NEW, synced_steps=1)
  want = ref.generate(_prompts(batch), NEW, PROMPT + NEW)
  assert_array_equal(gen.tokens, want.tokens_BxO)
  # The last stage's layer routed exactly the single device's tokens; earlier stages
  # also routed the in-flight groups' next tokens (test above).
  assert_array_equal(gen.load_LxE[-1], want.load_LxE[-1])
  assert (gen.load_LxE >= want.load_LxE).all()
  assert gen.groups == 4 and gen.micro_steps_per_step == 4


def test_temperature_sampling_is_the_same_on_the_ring():
  dep, batch = RINGS["2_stages_8_devices_g2"]
  single, params = _single()
  engine = Engine(single.cfg, dep)
  gen = decode.generate(engine, engine.place_params(params), _prompts(batch), NEW,
                        temperature=0.8, seed=5, max_len=PROMPT + NEW)
  want = decode.generate(single, params, _prompts(batch), NEW, temperature=0.8, seed=5,
                         max_len=PROMPT + NEW)
  assert_array_equal(gen.tokens, want.tokens)  # noise keyed by (sequence, position)
  # Not greedy: the single device's greedy tokens are the reference's (engine_test.py).
  greedy = _ref().generate(_prompts(batch), NEW, CACHE)
  assert (gen.tokens != greedy.tokens_BxO).any()


def test_compiled_ring_has_no_conditional_and_a_known_trip_count():
  dep, batch = RINGS["4_stages_8_devices_g4"]
  engine = Engine(load_model("tiny"), dep)
  hlo = engine.decode_program(batch, 4).lower(engine.place_params(_ref().params),
                                              engine.abstract_decode_state(batch, CACHE),
                                              jax.random.key(0)).compile().as_text()
  assert " conditional(" not in hlo
  whiles = [line for line in hlo.splitlines() if " while(" in line]
  assert whiles and all(re.search(r'known_trip_count":\{"n":"4"', w) for w in whiles)


def test_first_call_steps_and_period():
  assert ring.first_call_steps(4, 4) == 7 and ring.first_call_steps(1, 4) == 4
  assert ring.first_call_steps(1, 1) == 1 and ring.first_call_steps(6, 2) == 7
  assert PRESETS["proposed_8"].ring_period == 4
  assert dataclasses.replace(PRESETS["proposed_8"], decode_groups=6).ring_period == 6
  assert dataclasses.replace(PRESETS["proposed_8"], decode_groups=1).ring_period == 4


def test_group_ids_cover_the_batch_once():
  ids = np.concatenate([np.asarray(ring.group_ids(g, 32, 4, 2, xp=np)) for g in range(4)])
  assert sorted(ids.tolist()) == list(range(32))
  # Group 1 on expert device 1: that device's rows 4..7 of its 16, global 16 + 4...
  assert np.asarray(ring.group_ids(1, 32, 4, 2, xp=np)).tolist() == [4, 5, 6, 7, 20, 21, 22, 23]


def test_a_share_head_scores_its_rows_head_gather_times_and_picks_the_same_tokens():
  # A one-device share of a deployment whose stage gathers 4 devices' rows for the head
  # (DeploymentConfig.head_gather): the same sampled tokens (each copy's noise is keyed by
  # its sequence and position), and a head whose unembedding multiplies 4 x the rows.
  single, params = _single()
  share = Engine(single.cfg, dataclasses.replace(deployments.SINGLE, head_gather=4))
  batch = 4
  want = decode.generate(single, params, _prompts(batch), NEW, temperature=0.8, seed=5,
                         max_len=PROMPT + NEW)
  got = decode.generate(share, share.place_params(params), _prompts(batch), NEW,
                        temperature=0.8, seed=5, max_len=PROMPT + NEW)
  assert_array_equal(got.tokens, want.tokens)

  def head_rows(engine):  # the compiled program's: XLA has not dropped the copies
    hlo = engine.decode_program(batch, 1).lower(
        engine.place_params(params), engine.abstract_decode_state(batch, CACHE),
        jax.random.key(0)).compile().as_text()
    return re.findall(rf"f32\[(\d+),{single.cfg.vocab_size}\]\{{[^}}]*\}} dot\(", hlo)

  assert head_rows(share) == [str(4 * batch)] and head_rows(single) == [str(batch)]
