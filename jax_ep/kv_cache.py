"""The preallocated KV cache: one pytree, layers stacked, updated in place (donated)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_ep.config import ModelConfig


class KVCache(NamedTuple):
  # [L, B, H, S, Dh]: each (sequence, head) is one contiguous [S, Dh] run, what decode
  # attention reads (kernels/decode_attention.py). S = max_seq_len slots; positions at or
  # past a sequence's position are stale.
  k_LxBxHxSxDh: jax.Array
  v_LxBxHxSxDh: jax.Array

  def write(self, layer, pos_B, k_BxTxHxDh, v_BxTxHxDh) -> KVCache:
    """Stores new keys and values for `layer`, sequence b at positions pos_B[b].."""
    return KVCache(write_rows(self.k_LxBxHxSxDh, layer, pos_B, k_BxTxHxDh),
                   write_rows(self.v_LxBxHxSxDh, layer, pos_B, v_BxTxHxDh))

  @staticmethod
  def shape(cfg: ModelConfig, batch: int, max_len: int | None = None) -> tuple[int, ...]:
    return (cfg.num_layers, batch, cfg.num_heads, max_len or cfg.max_seq_len, cfg.head_dim)

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, max_len: int | None = None) -> KVCache:
    shape = cls.shape(cfg, batch, max_len)
    return cls(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))


def write_rows(cache_LxBxHxSxDh, layer, pos_B, new_BxTxHxDh, row0=0, valid=True):
  """cache[layer, row0 + b, :, pos_B[b] + j] = new[b, j]: each sequence at its own position.

  A scatter into the (donated) cache, in place. Positions past the cache are dropped,
  so a sequence decoded past its length writes nothing. `valid` False (a pipeline
  bubble) writes nothing either.

  The (row, position) pairs are distinct and sorted, dropped ones included (a bubble's
  go to positions S + j), and the scatter is told so: without the promise XLA:GPU
  guards each element's write against a duplicate (benchmarks/NOTES.md).
  """
  b, t = new_BxTxHxDh.shape[:2]
  s = cache_LxBxHxSxDh.shape[3]
  rows_BxT = jnp.broadcast_to(row0 + jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
  step_1xT = jnp.arange(t, dtype=jnp.int32)[None, :]
  pos_BxT = jnp.where(valid, pos_B[:, None] + step_1xT, s + step_1xT)  # past S: dropped
  # Advanced indices split by the head slice: the update is [B, T, H, Dh], as `new`.
  return cache_LxBxHxSxDh.at[layer, rows_BxT, :, pos_BxT].set(
      new_BxTxHxDh.astype(cache_LxBxHxSxDh.dtype), mode="drop", unique_indices=True,
      indices_are_sorted=True)


class StagedKVCache(NamedTuple):
  """A deployment's cache: per local layer i, [N, B, H, S, Dh] (stage s holds layer
  s * L_local + i), sharded over stages. Inside shard_map each array is [1, ...], so
  taking layer i's cache is a free reshape, not a copy of the cache."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]

  @staticmethod
  def zeros(cfg: ModelConfig, stages: int, batch: int, max_len: int | None = None):
    l, b, h, s, k = KVCache.shape(cfg, batch, max_len)

    def zeros():
      return tuple(jnp.zeros((stages, b, h, s, k), cfg.jnp_dtype) for _ in range(l // stages))

    return StagedKVCache(zeros(), zeros())
