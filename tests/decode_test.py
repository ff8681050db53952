"""Tests for jax_ep/decode.py: generation on one device, sampling, timing, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from configs import deployments, tiny
from jax_ep import decode, sampling
from jax_ep import params as param_layouts
from jax_ep.config import ConfigError
from jax_ep.engine import Engine

CFG = tiny.get_config()
B, PROMPT, NEW, MAX_LEN = 2, 4, 5, 8  # PROMPT + NEW - 1 == MAX_LEN: the cache is exactly full


@pytest.fixture(scope="module")
def engine():
  return Engine(CFG, deployments.SINGLE)


@pytest.fixture(scope="module")
def params(engine):
  return engine.init_params(0)


@pytest.fixture(scope="module")
def prompts():
  return np.random.default_rng(0).integers(0, CFG.vocab_size, (B, PROMPT)).astype(np.int32)


@pytest.fixture(scope="module")
def greedy(engine, params, prompts):
  return decode.generate(engine, params, prompts, NEW, max_len=MAX_LEN, synced_steps=2)


def test_generate_returns_new_tokens_and_timings(greedy):
  assert greedy.tokens.shape == (B, NEW) and greedy.tokens.dtype == np.int32
  assert ((greedy.tokens >= 0) & (greedy.tokens < CFG.vocab_size)).all()
  assert (greedy.batch, greedy.steps) == (B, NEW - 1)
  assert greedy.compile_s > 0 and greedy.prefill_s > 0 and greedy.decode_s > 0
  # 4 decode calls: the first fills the ring, 2 are timed with a sync each, 1 back to back.
  assert len(greedy.step_s) == 2 and min(greedy.step_s) > 0 and greedy.decode_steps == 1
  assert greedy.tpot_ms > 0 and greedy.tps > 0 and greedy.tpot_synced_ms > 0
  assert greedy.tps == pytest.approx(B / (greedy.tpot_ms / 1e3))


def test_greedy_tokens_are_the_argmax_of_a_full_forward(engine, params, prompts, greedy):
  # Feed prompt + generated tokens through one forward pass (no incremental cache): token
  # i + 1 must be the argmax at the position of token i.
  seq = np.concatenate([prompts, greedy.tokens[:, :-1]], axis=1)  # [B, PROMPT + NEW - 1]
  logits, _, _ = engine.logits_program()(params, engine.init_cache(B, MAX_LEN),
                                         jnp.asarray(seq), jnp.int32(0))
  logits = np.asarray(logits)
  assert_array_equal(np.argmax(np.asarray(logits)[:, PROMPT - 1:], axis=-1), greedy.tokens)


def test_load_counts_prefill_and_every_decode_step(greedy):
  tokens = B * (PROMPT + NEW - 1)  # the last new token is sampled, never fed back
  assert_array_equal(greedy.load_LxE.sum(-1), [tokens * CFG.top_k] * CFG.num_layers)
  assert greedy.dropped == 0


def test_temperature_sampling_is_reproducible(engine, params, prompts, greedy):
  run = lambda seed: decode.generate(engine, params, prompts, NEW, temperature=100.0,
                                     seed=seed, max_len=MAX_LEN).tokens
  first = run(0)
  assert_array_equal(run(0), first)
  # At temperature 100 the draw is nearly uniform over 256 tokens: another seed, or greedy,
  # agreeing on all 10 tokens would be a broken key.
  assert not np.array_equal(run(1), first)
  assert not np.array_equal(first, greedy.tokens)
  # Each step draws with a fresh key: reusing one would repeat the same Gumbel noise, and
  # at this temperature the same token, at every step.
  assert all(len(set(row)) > 1 for row in first.tolist())


def test_tpot_and_tps_arithmetic():
  tokens = np.zeros((4, 3), np.int32)
  gen = decode.Generation(tokens, 1.0, 0.1, [0.3, 0.1, 0.2], 0.6, 3, np.zeros((1, 1)), 0)
  assert gen.tpot_ms == pytest.approx(200.0)  # back to back: 0.6 s over 3 steps
  assert gen.tpot_synced_ms == pytest.approx(200.0)  # the median synced step
  assert gen.tps == pytest.approx(20.0)  # 4 sequences / 0.2 s
  gen = decode.Generation(tokens, 1.0, 0.1, [0.25], 0.0, 0, np.zeros((1, 1)), 0)
  assert gen.tpot_ms == pytest.approx(250.0)  # no back-to-back steps: the synced median
  gen = decode.Generation(tokens[:, :1], 1.0, 0.1, [], 0.0, 0, np.zeros((1, 1)), 0)
  assert gen.tps == 0.0


def test_prefill_chunks():
  assert decode.prefill_chunks(10, 4, 8) == [(0, 4), (4, 4), (8, 2)]
  # The seed on one device: 1024 tokens x 2 picks = 2048 kernel rows a position, so
  # chunks of 16 positions keep 32768 rows.
  assert decode.prefill_chunks(10, 0, 2048) == [(0, 10)]
  assert decode.prefill_chunks(128, 0, 2048) == [(i, 16) for i in range(0, 128, 16)]
  assert decode.cache_len(60) == 64 and decode.cache_len(64) == 64


def test_chunked_prefill_equals_one_shot(params, prompts, greedy):
  import dataclasses

  chunked = Engine(CFG, dataclasses.replace(deployments.SINGLE, prefill_chunk=3))
  gen = decode.generate(chunked, params, prompts, NEW, max_len=MAX_LEN)
  assert_array_equal(gen.tokens, greedy.tokens)  # prompt 4 in chunks of 3 and 1
  assert_array_equal(gen.load_LxE, greedy.load_LxE)


def test_several_tokens_per_call_give_the_same_tokens(params, prompts, greedy):
  import dataclasses

  # NEW = 5: prefill's token, the fill's, then calls of 2 and 1 (the shorter last call).
  assert decode.decode_calls(NEW - 1, 2) == [1, 2, 1]
  assert decode.decode_calls(7, 3) == [1, 3, 3] and decode.decode_calls(0, 3) == []
  multi = Engine(CFG, dataclasses.replace(deployments.SINGLE, tokens_per_call=2))
  gen = decode.generate(multi, params, prompts, NEW, max_len=MAX_LEN, synced_steps=1)
  assert_array_equal(gen.tokens, greedy.tokens)
  assert_array_equal(gen.load_LxE, greedy.load_LxE)
  assert len(gen.step_s) == 1 and gen.decode_steps == 1  # the call of 2 synced, 1 timed
  # More synced calls asked than there are: the last still runs back to back, so that
  # TPOT is a back-to-back figure, not the synced median under its name.
  gen = decode.generate(multi, params, prompts, NEW, max_len=MAX_LEN, synced_steps=5)
  assert len(gen.step_s) == 1 and gen.decode_steps == 1


def test_imbalance():
  gen = decode.Generation(np.zeros((1, 1), np.int32), 0, 0, [], 0, 0,
                          np.array([[1, 1, 2], [3, 3, 0]]), 0)
  assert gen.imbalance == pytest.approx(1.5)  # worst layer: 3 / 2


def _programs_built() -> int:
  """How many programs Engines have built (each is memoized per engine and arguments)."""
  return sum(f.cache_info().currsize
             for f in (Engine.logits_program, Engine.prefill_program, Engine.decode_program))


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=NEW + 1), "prompt_len=4 \\+ max_new_tokens=6 - 1 exceeds the KV cache "
                                   "length 8 \\(max_len\\): use max_new_tokens=5 or "
                                   "prompt_len=3 \\(or less\\), or raise max_len."),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(prompts=np.full((B, PROMPT), CFG.vocab_size)), "token id 256"),
    (dict(prompts=np.zeros((0, PROMPT), np.int32)), "empty dimension"),
])
def test_errors_before_compiling(params, prompts, kwargs, message):
  engine = Engine(CFG, deployments.SINGLE)  # fresh: nothing traced yet
  built = _programs_built()
  args = dict(prompts=prompts, max_new_tokens=NEW, temperature=0.0)
  args.update(kwargs)
  with pytest.raises(ConfigError, match=message):
    decode.generate(engine, params, args["prompts"], args["max_new_tokens"],
                    temperature=args["temperature"], max_len=MAX_LEN)
  assert _programs_built() == built  # the error came before any program was built


def test_params_of_another_model_dtype_or_mesh_are_refused_before_compiling(params, prompts):
  from configs import load_model

  engine = Engine(CFG, deployments.SINGLE)
  built = _programs_built()

  def refused(p, message, on=engine):
    with pytest.raises(ConfigError, match=message):
      decode.generate(on, p, prompts, NEW, max_len=MAX_LEN)

  # The same tree, another model: 64 experts a layer, not 16.
  e64 = Engine(load_model("tiny_e64"), deployments.SINGLE)
  refused(params, r"not match this engine's model: \['layers'\]\[0\]\['moe'\]\['w_down_ExFxD'\]"
                  r".* is float32\[1, 16, 128, 64\], the model needs float32\[1, 64, 128, 64\]",
          on=e64)
  refused(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params), r"is bfloat16\[.*needs float32")
  # The model's own (canonical) parameters, not yet laid out for a deployment.
  refused(param_layouts.canonical_of(engine, params), "not in this engine's layout")
  # Two stages either way: the same shapes, laid out over 2 devices, not tp x 2 = 4.
  two, four = Engine(CFG, deployments.PRESETS["proposed_2"]), Engine(
      CFG, deployments.PRESETS["baseline_4"])
  refused(two.place_params(params), r"laid out for another mesh or deployment: .* over 2 "
                                    r"devices, this engine needs .* over 4 devices", on=four)
  assert _programs_built() == built


def test_the_cache_is_sized_to_the_request_unless_max_len_is_given(params, prompts, monkeypatch):
  engine = Engine(CFG, deployments.SINGLE)
  lengths = []
  init_cache = engine.init_cache
  monkeypatch.setattr(engine, "init_cache", lambda b, n: lengths.append(n) or init_cache(b, n))
  gen = decode.generate(engine, params, prompts, NEW)  # not the model's max_seq_len
  assert lengths == [decode.cache_len(PROMPT + NEW)] and CFG.max_seq_len > 2 * (PROMPT + NEW)
  assert gen.tokens.shape == (B, NEW)
  with pytest.raises(ConfigError, match="max_len=0 must be a positive integer"):
    decode.generate(engine, params, prompts, NEW, max_len=0)


def test_each_sampled_token_is_the_gumbel_max_at_its_own_position(engine, params, prompts):
  # Pins what the engine-to-engine sampling tests cannot: the noise of the token at
  # position p is keyed (key, sequence, p), prefill's token and every decoded one alike,
  # over the logits of a plain forward of prompt + generated tokens.
  temperature, seed = 0.8, 5
  gen = decode.generate(engine, params, prompts, NEW, temperature=temperature, seed=seed,
                        max_len=MAX_LEN)
  seq = np.concatenate([prompts, gen.tokens[:, :-1]], axis=1)
  logits = np.asarray(engine.logits_program()(params, engine.init_cache(B, MAX_LEN),
                                              jnp.asarray(seq), jnp.int32(0))[0])
  key, ids = jax.random.key(seed), jnp.arange(CFG.vocab_size)
  for j in range(NEW):
    pos = PROMPT + j
    noise = sampling.gumbel_noise(key, jnp.arange(B), jnp.full((B,), pos), ids)
    want = np.argmax(logits[:, pos - 1] / temperature + np.asarray(noise), axis=-1)
    assert_array_equal(gen.tokens[:, j], want, err_msg=f"token {j} (position {pos})")


def test_a_request_that_does_not_fit_beside_the_weights_is_refused_before_compiling(
    params, prompts, monkeypatch):
  from jax_ep import memory, memory_budget

  engine = Engine(CFG, deployments.SINGLE)
  fp = memory.footprint(CFG, engine.dep, B, PROMPT, MAX_LEN, "cpu")
  beside = fp.total - fp.weight_total  # the cache, state and working set: the weights are in
  for room, fits in ((beside - 1, False), (beside, True)):  # refused first: nothing built yet
    monkeypatch.setattr(memory_budget, "budget_for_devices",
                        lambda devices, room=room: memory_budget.Budget(room, "test budget"))
    built = _programs_built()
    if fits:
      decode.generate(engine, params, prompts, NEW, max_len=MAX_LEN)
      continue
    with pytest.raises(ConfigError, match=r"does not fit beside its weights: .* batch 2 and a "
                                          r"cache of 16 positions needs .* per device more "
                                          r".*check_memory=False"):
      decode.generate(engine, params, prompts, NEW, max_len=MAX_LEN)
    assert _programs_built() == built
    gen = decode.generate(engine, params, prompts, NEW, max_len=MAX_LEN, check_memory=False)
    assert gen.tokens.shape == (B, NEW)
