"""Prefill, then greedy or temperature decoding with the cache donated each step; TPS/TPOT.

Compilation is ahead of time (lower().compile()) so it is timed apart from running.
The decode loop dispatches steps asynchronously; the only host synchronisation is
the one a measurement needs (each step when `time_steps`, else once at the end).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep.config import ConfigError
from jax_ep.engine import Engine


def sample(logits_BxV: jax.Array, temperature: float, key) -> jax.Array:
  """Greedy when temperature == 0, else a draw from softmax(logits / temperature)."""
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_BxV / temperature, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray  # [B, N] int32, the N new tokens of each sequence
  compile_s: float  # prefill and decode step, compiled ahead of time
  prefill_s: float
  step_s: list[float]  # each decode step (empty unless time_steps); else decode_s / steps
  decode_s: float  # all N - 1 decode steps (the first new token comes from prefill)
  load_LxE: np.ndarray  # (token, pick) pairs per expert, prefill and decode together
  dropped: int
  max_rounds: int

  @property
  def batch(self) -> int:
    return self.tokens.shape[0]

  @property
  def steps(self) -> int:
    return self.tokens.shape[1] - 1

  @property
  def tpot_ms(self) -> float:
    """Median time per decode step, i.e. per output token of each sequence."""
    if self.step_s:
      return 1e3 * float(np.median(self.step_s))
    return 1e3 * self.decode_s / max(self.steps, 1)

  @property
  def tps(self) -> float:
    """Generated tokens per second over the whole batch, at the median step time."""
    return self.batch / (self.tpot_ms / 1e3) if self.steps else 0.0


def _progress(msg: str, log: Callable[[str], None] | None):
  if log:
    log(msg)


def check_request(engine: Engine, prompts_BxP, max_new_tokens: int, temperature: float,
                  max_len: int):
  """Every check of a generate request, on the host, before anything compiles.

  Returns the prompts as int32 [B, P]; raises ConfigError saying what to change.
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
  if not temperature >= 0:
    raise ConfigError(f"temperature={temperature} must be >= 0 (0 is greedy).")
  prompts = np.asarray(prompts_BxP)
  if prompts.ndim == 2 and prompts.shape[1] + max_new_tokens - 1 > max_len:
    raise ConfigError(
        f"prompt_len {prompts.shape[1]} + max_new_tokens {max_new_tokens} - 1 exceeds the KV "
        f"cache length {max_len}; lower one of them or raise max_seq_len.")
  return engine.check_tokens(prompts, 0, max_len)


def generate(engine: Engine, params, prompts_BxP, max_new_tokens: int, *,
             temperature: float = 0.0, seed: int = 0, max_len: int | None = None,
             time_steps: bool = False, log: Callable[[str], None] | None = None) -> Generation:
  """Prefills `prompts_BxP` and generates `max_new_tokens` tokens per sequence.

  `params` must be in `engine`'s layout (Engine.init_params or Engine.place_params).
  """
  max_len = max_len or engine.cfg.max_seq_len
  tokens = check_request(engine, prompts_BxP, max_new_tokens, temperature, max_len)
  if jax.tree.structure(params) != jax.tree.structure(engine.abstract_params):
    raise ConfigError("params are not in this engine's layout; pass them through "
                      "engine.place_params(params) first.")
  b = tokens.shape[0]
  tokens = jax.device_put(tokens, engine.tokens_sharding())
  params_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            params)
  cache_abs = engine.abstract_cache(b, max_len)
  key = jax.random.key(seed)

  def prefill(params, cache, tokens, pos, key):
    # pos is an argument, not a constant, so XLA does not constant-fold the masks.
    logits, cache, stats = engine.forward_last(params, cache, tokens, pos)
    return sample(logits[:, -1], temperature, key), cache, stats

  def step(params, cache, last_B, pos, key):
    logits, cache, stats = engine.decode_forward(params, cache, last_B[:, None], pos)
    key, sub = jax.random.split(key)
    return sample(logits[:, -1], temperature, sub), cache, pos + 1, key, stats

  _progress(f"compiling prefill and decode step for {engine.dep.describe()} ...", log)
  t0 = time.perf_counter()
  prefill_c = jax.jit(prefill, donate_argnums=(1,)).lower(
      params_abs, cache_abs, tokens, jnp.int32(0), key).compile()
  last_abs = jax.ShapeDtypeStruct((b,), jnp.int32)
  step_c = jax.jit(step, donate_argnums=(1,)).lower(
      params_abs, cache_abs, last_abs, jnp.int32(0), key).compile()
  compile_s = time.perf_counter() - t0
  _progress(f"compiled in {compile_s:.1f} s; prefill of {b} x {tokens.shape[1]} tokens", log)

  cache = engine.init_cache(b, max_len)
  jax.block_until_ready(cache)
  t0 = time.perf_counter()
  key, prefill_key = jax.random.split(key)
  last, cache, stats = prefill_c(params, cache, tokens, jnp.int32(0), prefill_key)
  last.block_until_ready()
  prefill_s = time.perf_counter() - t0

  out, step_s = [last], []
  load, dropped, rounds = [stats.load_E], [stats.dropped], [stats.rounds]
  pos = jnp.int32(tokens.shape[1])
  t_all = time.perf_counter()
  for i in range(max_new_tokens - 1):
    t0 = time.perf_counter()
    last, cache, pos, key, stats = step_c(params, cache, last, pos, key)
    if time_steps:
      last.block_until_ready()
      step_s.append(time.perf_counter() - t0)
    out.append(last)
    load.append(stats.load_E)
    dropped.append(stats.dropped)
    rounds.append(stats.rounds)
    if log and (i + 1) % max(1, (max_new_tokens - 1) // 4) == 0:
      _progress(f"decode step {i + 1}/{max_new_tokens - 1}", log)
  jax.block_until_ready(out[-1])
  decode_s = time.perf_counter() - t_all
  return Generation(
      tokens=np.stack([np.asarray(t) for t in out], axis=1),
      compile_s=compile_s, prefill_s=prefill_s, step_s=step_s, decode_s=decode_s,
      load_LxE=np.sum([np.asarray(x) for x in load], axis=0),
      dropped=int(np.sum([np.asarray(x).sum() for x in dropped])),
      max_rounds=int(np.max([np.asarray(x).max() for x in rounds])))
