"""The preallocated KV cache: one pytree, layers stacked, updated in place (donated)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_ep.config import ModelConfig


class KVCache(NamedTuple):
  k_LxBxSxHxK: jax.Array  # S = max_seq_len slots; positions >= the decode position are stale
  v_LxBxSxHxK: jax.Array

  def write(self, layer, row, pos, k_BxTxHxK, v_BxTxHxK) -> KVCache:
    """Stores new keys and values for `layer`, batch rows row.., positions pos.."""
    at = (layer, row, pos, 0, 0)
    return KVCache(jax.lax.dynamic_update_slice(self.k_LxBxSxHxK, k_BxTxHxK[None], at),
                   jax.lax.dynamic_update_slice(self.v_LxBxSxHxK, v_BxTxHxK[None], at))

  @staticmethod
  def shape(cfg: ModelConfig, batch: int, max_len: int | None = None) -> tuple[int, ...]:
    return (cfg.num_layers, batch, max_len or cfg.max_seq_len, cfg.num_heads, cfg.head_dim)

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int | None = None) -> KVCache:
    shape = cls.shape(cfg, batch, max_len)
    return cls(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))


class StagedKVCache(NamedTuple):
  """A deployment's cache: per local layer i, [stages, B, S, H, K] (stage s holds layer
  s * L_local + i), sharded over stages. Inside shard_map each array is [1, ...], so
  taking layer i's cache is a free reshape, not a copy of the cache."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @staticmethod
  def zeros(cfg: ModelConfig, stages: int, batch: int, max_len: int | None = None):
    l, b, s, h, k = KVCache.shape(cfg, batch, max_len)
    def zeros():
      return tuple(jnp.zeros((stages, b, s, h, k), cfg.jnp_dtype) for _ in range(l // stages))

    return StagedKVCache(zeros(), zeros())
