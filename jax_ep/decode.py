"""Prefill (chunked), then decoding on the ring with the cache donated; TPS/TPOT.

Compilation is ahead of time (lower().compile()) so it is timed apart from running.
Decode calls are dispatched back to back; TPOT is their mean with one sync at the end
(as a server runs), and the first `synced_steps` calls are also timed one by one, each
with a sync, for their median and spread.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import distributed, memory, memory_budget, ring, routing
from jax_ep import params as param_layouts
from jax_ep.config import ConfigError, count
from jax_ep.engine import Engine
from jax_ep.perf import per_device


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray  # [B, O] int32, the O new tokens of each sequence
  compile_s: float  # prefill and decode calls, compiled ahead of time
  prefill_s: float
  step_s: list[float]  # per token, decode calls timed one by one, each synced (the first
  # synced_steps calls after the ring's fill)
  decode_s: float  # the remaining decode calls, dispatched back to back, one sync
  decode_steps: int  # how many tokens per sequence decode_s covers
  load_LxE: np.ndarray  # (token, pick) pairs per expert, prefill and decode together
  dropped: int
  groups: int = 1
  micro_steps_per_step: int = 1  # ring period: micro-steps per token of each sequence

  @property
  def batch(self) -> int:
    return self.tokens.shape[0]

  @property
  def imbalance(self) -> float:
    """Expert load max/mean, the worst layer (1.0: perfectly balanced)."""
    return float(routing.load_imbalance(self.load_LxE))

  @property
  def steps(self) -> int:
    return self.tokens.shape[1] - 1

  @property
  def tpot_ms(self) -> float:
    """Time per output token of each sequence: the mean of the back-to-back steps (the
    synced median when there are none)."""
    if self.decode_steps:
      return 1e3 * self.decode_s / self.decode_steps
    return self.tpot_synced_ms

  @property
  def tpot_synced_ms(self) -> float:
    """Median of the steps timed one by one with a sync each (nan if none were)."""
    return 1e3 * float(np.median(self.step_s)) if self.step_s else float("nan")

  @property
  def tps(self) -> float:
    """Generated tokens per second over the whole batch, at tpot_ms."""
    return self.batch / (self.tpot_ms / 1e3) if self.steps else 0.0


def _progress(msg: str, log: Callable[[str], None] | None):
  if log:
    log(msg)


def _check_sampling(max_new_tokens: int, temperature: float) -> None:
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
  if not temperature >= 0:
    raise ConfigError(f"temperature={temperature} must be >= 0 (0 is greedy).")


def check_request_shape(engine: Engine, batch: int, prompt_len: int, max_new_tokens: int,
                        temperature: float, max_len: int) -> None:
  """The checks of a generate request that need only its sizes: a caller runs them before
  it builds prompts (or checks memory) for a batch that may be refused. Raises
  ConfigError saying what to change."""
  _check_sampling(max_new_tokens, temperature)
  if batch < 1 or prompt_len < 1:
    raise ConfigError(f"prompts have an empty dimension: {batch} sequences of {prompt_len} "
                      "tokens; need at least one sequence of at least one token.")
  if prompt_len + max_new_tokens - 1 > max_len:
    room, fits = max_len + 1 - prompt_len, max_len + 1 - max_new_tokens
    lower = " or ".join([f"max_new_tokens={room}"] * (room >= 1)
                        + [f"prompt_len={fits}"] * (fits >= 1))
    lower = (f"use {lower} (or less)" if lower else
             f"lower both so that prompt_len + max_new_tokens <= {max_len + 1}")
    model_cap = max_len == engine.cfg.max_seq_len
    what, raise_ = (("the model's max_seq_len", "raise max_seq_len in the model's ModelConfig "
                     "(a preset's in configs/)") if model_cap else ("max_len", "raise max_len"))
    raise ConfigError(
        f"prompt_len={prompt_len} + max_new_tokens={max_new_tokens} - 1 exceeds the KV "
        f"cache length {max_len} ({what}): {lower}, or {raise_}.")
  engine.dep.check_batch(batch)


def default_max_len(engine: Engine, prompt_len: int, max_new_tokens: int) -> int:
  """The KV cache length generate uses when none is given: the prompt and the new tokens,
  capped at the model's max_seq_len (a longer request is refused there)."""
  return min(engine.cfg.max_seq_len, prompt_len + max_new_tokens)


def check_params(engine: Engine, params) -> None:
  """ConfigError unless `params` are this engine's: its model's shapes and dtypes, laid
  out on its mesh as engine.place_params lays them out."""
  fix = "pass them through engine.place_params(params) first"
  if not param_layouts.is_layout(params):
    raise ConfigError(f"params are not in this engine's layout; {fix}.")
  if not param_layouts.same_shapes(params, engine.abstract_params):
    raise ConfigError(f"params do not match this engine's model: "
                      f"{param_layouts.first_mismatch(params, engine.abstract_params)}. Pass "
                      "the parameters of this model (engine.place_params lays out those of any "
                      "deployment of it).")
  for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(engine.param_shardings), strict=True):
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or not sharding.is_equivalent_to(want, leaf.ndim):
      raise ConfigError(
          f"params are laid out for another mesh or deployment: "
          f"{jax.tree_util.keystr(path)} is {_where(sharding)}, this engine needs "
          f"{_where(want)}; {fix}.")


def _where(sharding) -> str:
  if sharding is None:
    return "a host array"
  spec = getattr(sharding, "spec", None)
  devices = len(sharding.device_set)
  return (f"sharded as {spec} over {devices} devices" if spec is not None
          else f"on {devices} device{'s' * (devices != 1)}")


def check_request(engine: Engine, prompts_BxT, max_new_tokens: int, temperature: float,
                  max_len: int):
  """Every check of a generate request, on the host, before anything compiles.

  Returns the prompts as int32 [B, T]; raises ConfigError saying what to change.
  """
  _check_sampling(max_new_tokens, temperature)  # first, whatever the prompts' shape
  prompts = np.asarray(prompts_BxT)
  if prompts.ndim == 2:
    check_request_shape(engine, *prompts.shape, max_new_tokens, temperature, max_len)
  return engine.check_tokens(prompts, 0, max_len)


# Rows of the expert kernel's buffer per device per prefill chunk when
# DeploymentConfig.prefill_chunk is 0: bounds its hidden (32768 rows x F = 2.1 GB for the
# seed) and the exchange buffers, so the seed with SwiGLU experts, batch 1024, prompt 128
# prefills on one H200.
PREFILL_ROWS_PER_DEVICE = 32768


def prefill_chunks(prompt_len: int, chunk: int, rows_per_position: int) -> list[tuple[int, int]]:
  """(start, length) of each prefill chunk. chunk 0: as many positions as keep a chunk's
  kernel buffer within PREFILL_ROWS_PER_DEVICE, at `rows_per_position` buffer rows per
  prompt position (routing.rows_per_destination of one position's tokens, times P)."""
  chunk = chunk or max(1, PREFILL_ROWS_PER_DEVICE // rows_per_position)
  return [(s, min(chunk, prompt_len - s)) for s in range(0, prompt_len, chunk)]


def cache_len(max_len: int) -> int:
  """The allocated cache: max_len rounded up to a multiple of 16 positions (the decode
  attention kernel's tile); attention masks every position at or past a sequence's own."""
  return -(-max_len // 16) * 16


def generate(engine: Engine, params, prompts_BxT, max_new_tokens: int, *,
             temperature: float = 0.0, seed: int = 0, max_len: int | None = None,
             synced_steps: int = 0, log: Callable[[str], None] | None = None,
             profile_dir: str | None = None, check_memory: bool = True) -> Generation:
  """Prefills `prompts_BxT` and generates `max_new_tokens` tokens per sequence.

  `params` must be in `engine`'s layout (Engine.init_params or Engine.place_params).
  `max_len`: the KV cache's length, prompt and new tokens (if None, default_max_len:
  the prompt's length + max_new_tokens, at most ModelConfig.max_seq_len; a given one may
  be longer or shorter than max_seq_len).
  `check_memory`: refuse, before anything compiles, a request whose cache, state and
  working set (jax_ep/memory.py) do not fit beside the weights on the devices.
  The first of the N - 1 decode steps also fills the ring; `synced_steps` of the next
  decode calls are timed one by one, the rest back to back (traced with jax.profiler into
  `profile_dir` if given), at least the last call whatever `synced_steps` asks.
  """
  _check_sampling(max_new_tokens, temperature)
  if max_len is None:
    shape = np.shape(prompts_BxT)
    max_len = default_max_len(engine, shape[-1] if shape else 0, max_new_tokens)
  elif isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
    raise ConfigError(f"max_len={max_len!r} must be a positive integer (KV cache positions), "
                      "or None for the prompt's length + max_new_tokens.")
  tokens = check_request(engine, prompts_BxT, max_new_tokens, temperature, max_len)
  check_params(engine, params)
  b, p = tokens.shape
  dep = engine.dep
  if check_memory:
    devices = list(engine.mesh.devices.flat)
    fp = memory.footprint(engine.cfg, dep, b, p, max_len, devices[0].platform)
    memory_budget.check_beside_weights(fp, memory_budget.budget_for_devices(devices))
  tokens = jax.device_put(tokens, engine.tokens_sharding())
  params_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            params)
  cache_abs = engine.abstract_cache(b, cache_len(max_len))
  key = jax.random.key(seed)
  i32 = jnp.int32(0)

  _progress(f"compiling prefill and decode for {dep.describe()} ...", log)
  t0 = time.perf_counter()
  lay = per_device.layout(engine.cfg, dataclasses.replace(dep, decode_groups=1), b)
  chunks = prefill_chunks(p, dep.prefill_chunk, lay.ep_size * lay.send_rows)
  compiled = {}
  for i, (_, n) in enumerate(chunks):
    last = i == len(chunks) - 1
    if (n, last) not in compiled:
      fn = engine.prefill_program(temperature, sample=last)
      compiled[n, last] = fn.lower(params_abs, cache_abs, tokens[:, :n], i32, key).compile()
  state_abs = engine.abstract_decode_state(b, cache_len(max_len))
  period = dep.ring_period
  first_steps = ring.first_call_steps(dep.groups, dep.stages)
  calls = decode_calls(max_new_tokens - 1, dep.tokens_per_call)
  decoders = {k: engine.decode_program(b, k, temperature).lower(params_abs, state_abs,
                                                                key).compile()
              for k in {first_steps} | {period * n for n in calls[1:]}}
  compile_s = time.perf_counter() - t0
  _progress(f"compiled in {compile_s:.1f} s; prefill of {b} x {p} tokens in "
            f"{count(len(chunks), 'chunk')}", log)

  cache = engine.init_cache(b, cache_len(max_len))
  jax.block_until_ready(cache)
  t0 = time.perf_counter()
  loads, dropped = [], []
  for i, (start, n) in enumerate(chunks):
    out = compiled[n, i == len(chunks) - 1](params, cache, tokens[:, start:start + n],
                                            jnp.int32(start), key)
    cache, stats = out[-2:]
    loads.append(stats.load_E)
    dropped.append(stats.dropped)
  first = out[0]
  first.block_until_ready()
  prefill_s = time.perf_counter() - t0

  # Decode: call 0 fills the ring (one token); each later call is calls[i] tokens for
  # every sequence.
  state = engine.decode_state(first, jnp.full((b,), p, jnp.int32), cache)
  del cache  # the state holds it, and each decode call donates the state
  outs, step_s = [], []
  # At least one call back to back (TPOT's figure) wherever there is a call after the fill.
  synced = min(synced_steps, max(len(calls) - 2, 0))
  t_all = time.perf_counter()
  timed = 0
  for i, n in enumerate(calls):
    t0 = time.perf_counter()
    state, out, stats = decoders[first_steps if i == 0 else period * n](params, state, key)
    outs.append(out)
    loads.append(stats.load_E)
    dropped.append(stats.dropped)
    if i <= synced:  # the fill (not a steady step), then the calls timed one by one
      out.tokens_UxBg.block_until_ready()
      if i:
        step_s.append((time.perf_counter() - t0) / n)
      if i == synced and profile_dir:  # before the clock starts: tracing takes a while
        jax.profiler.start_trace(profile_dir)
      t_all = time.perf_counter()
    else:
      timed += n
    if log and (i + 1) % max(1, len(calls) // 4) == 0:
      _progress(f"decode call {i + 1}/{len(calls)}", log)
  if outs:
    jax.block_until_ready(outs[-1])
  decode_s = time.perf_counter() - t_all
  if profile_dir and calls:
    jax.profiler.stop_trace()
  steps = max_new_tokens - 1
  new = assemble(np.asarray(first), outs, b, dep.groups, dep.expert, steps)
  return Generation(
      tokens=new, compile_s=compile_s, prefill_s=prefill_s, step_s=step_s,
      decode_s=decode_s, decode_steps=timed,
      load_LxE=np.sum([distributed.to_host(x) for x in loads], axis=0),
      dropped=int(np.sum([distributed.to_host(x).sum() for x in dropped])), groups=dep.groups,
      micro_steps_per_step=dep.ring_period)


def decode_calls(steps: int, tokens_per_call: int) -> list[int]:
  """Tokens per sequence of each decode call for `steps` tokens after prefill's: the
  ring's fill (one token), then calls of `tokens_per_call`, the last one shorter."""
  if steps < 1:
    return []
  full, rest = divmod(steps - 1, tokens_per_call)
  return [1] + [tokens_per_call] * full + ([rest] if rest else [])


def assemble(first_B: np.ndarray, outs: list[ring.DecodeOutput], batch: int, groups: int,
             experts: int, steps: int) -> np.ndarray:
  """Per-sequence token lists [B, 1 + steps] from prefill's token and the ring's outputs."""
  new = np.zeros((batch, 1 + steps), np.int32)
  new[:, 0] = first_B
  filled = np.ones((groups,), np.int64)
  for out in outs:
    toks, grp, valid = (np.asarray(a) for a in out)
    for k in np.flatnonzero(valid):
      g = int(grp[k])
      if filled[g] <= steps:
        ids = np.asarray(ring.group_ids(g, batch, groups, experts, xp=np))
        new[ids, filled[g]] = toks[k]
        filled[g] += 1
  if steps and filled.min() <= steps:
    raise RuntimeError(f"the ring produced {filled.min() - 1} of {steps} tokens for a group")
  return new
