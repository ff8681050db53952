"""The single-device reference the tests compare every deployment against.

`model.Transformer.__call__`: the whole model as one jitted program on one device, on the
canonical parameters (layers stacked [L, ...]) and a canonical KVCache [L, B, H, S, Dh],
with none of the engine's machinery (no shard_map, parameter layout, pipeline, ring,
chunked prefill or sharded sampling). Generation here is greedy, one token at a time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ep import ep
from jax_ep.config import ModelConfig
from jax_ep.kv_cache import KVCache
from jax_ep.model import Transformer


class Generation(NamedTuple):
  tokens_BxO: np.ndarray  # the O new tokens of each sequence, greedy
  load_LxE: np.ndarray  # (token, pick) pairs per expert over the prompt and the fed tokens
  cache: KVCache  # after the last fed token: positions < prompt + O - 1 written


class Reference:
  """Transformer.__call__ jitted: one compile per input shape."""

  def __init__(self, cfg: ModelConfig, seed: int = 0, par: ep.Parallel = ep.ONE_DEVICE):
    self.cfg = cfg
    self.seed = seed
    self.graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]
    self.call = jax.jit(lambda params, tokens_BxT, cache, pos_B: nnx.merge(
        self.graphdef, params)(tokens_BxT, cache, pos_B, par))

  @functools.cached_property
  def params(self):
    """The canonical parameters (nnx.State) that Engine.init_params(seed) lays out: the
    same draws."""
    return jax.jit(lambda: nnx.split(Transformer(self.cfg, nnx.Rngs(self.seed)))[1])()

  def __call__(self, tokens_BxT, cache: KVCache, pos_B, params=None):
    """(logits [B, T, V] float32, the cache extended, MoE stats per layer)."""
    params = self.params if params is None else params
    return self.call(params, jnp.asarray(tokens_BxT, jnp.int32), cache,
                     jnp.asarray(pos_B, jnp.int32))

  def forward(self, tokens_BxT, max_len: int, params=None):
    """From position 0 on an empty cache of `max_len` positions."""
    return self(tokens_BxT, KVCache.zeros(self.cfg, len(tokens_BxT), max_len), 0, params)

  def generate(self, prompts_BxT, new_tokens: int, max_len: int, params=None) -> Generation:
    """Greedy: the prompt in one call, then each new token fed back at its position."""
    logits, cache, stats = self.forward(prompts_BxT, max_len, params)
    tokens, loads = [jnp.argmax(logits[:, -1], axis=-1)], [stats.load_E]
    for i in range(new_tokens - 1):
      logits, cache, stats = self(tokens[-1][:, None], cache, len(prompts_BxT[0]) + i, params)
      tokens.append(jnp.argmax(logits[:, -1], axis=-1))
      loads.append(stats.load_E)
    return Generation(np.stack([np.asarray(t) for t in tokens], axis=1).astype(np.int32),
                      np.sum([np.asarray(x) for x in loads], axis=0), cache)


@functools.cache
def of(cfg: ModelConfig) -> Reference:
  """One Reference per model config (seed 0) for the whole test process."""
  return Reference(cfg)
