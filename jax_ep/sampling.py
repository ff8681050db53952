"""Sampling the next token from logits that may be split over vocabulary shards.

Greedy takes the largest logit; temperature T draws from softmax(logits / T) by the
Gumbel-max trick: argmax(logits / T + g) with g Gumbel noise. The noise of sequence
b at position p for vocabulary id v is a hash (Threefry) of (key, b, p, v) alone, so
each shard draws only its own columns, and every deployment, shard count and decode
grouping samples the same tokens. A shard reports its best (score, id); ep.py picks
the best over shards (ties: the lowest id, as argmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p


def gumbel_of_bits(bits: jax.Array) -> jax.Array:
  """Gumbel(0, 1) noise of uint32 random bits: their 23 high bits as a uniform in (0, 1),
  never 0 (nor 1), so both logs are finite."""
  u = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
  u = jnp.maximum(u, jnp.float32(2.0**-24))
  return -jnp.log(-jnp.log(u))


def gumbel_noise(key, seq_ids_B: jax.Array, pos_B: jax.Array, vocab_ids_V: jax.Array):
  """float32 [B, V]: Gumbel(0, 1) noise, a function of (key, sequence, position, id)."""

  def row(seq, pos):
    k = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, seq), pos))
    ids = vocab_ids_V.astype(jnp.uint32)
    k1, k2 = (jnp.broadcast_to(k[i], ids.shape) for i in range(2))
    bits, _ = threefry2x32_p.bind(k1, k2, ids, jnp.zeros_like(ids))
    return gumbel_of_bits(bits)

  return jax.vmap(row)(seq_ids_B, pos_B)


def local_best(logits_BxV: jax.Array, vocab0, temperature: float, key, seq_ids_B, pos_B):
  """This shard's best (score [B] float32, global id [B] int32) for columns vocab0.. .

  Greedy when temperature == 0; else the Gumbel-max score logits / T + noise.
  """
  v = logits_BxV.shape[-1]
  ids_V = vocab0 + jnp.arange(v, dtype=jnp.int32)
  scores = logits_BxV.astype(jnp.float32)
  if temperature > 0:
    scores = scores / temperature + gumbel_noise(key, seq_ids_B, pos_B, ids_V)
  best = jnp.argmax(scores, axis=-1)
  return jnp.take_along_axis(scores, best[:, None], -1)[:, 0], ids_V[best]


def sample(logits_BxV: jax.Array, temperature: float, key, seq_ids_B, pos_B) -> jax.Array:
  """The next token [B] int32 from whole (unsharded) logits: local_best of one shard."""
  return local_best(logits_BxV, 0, temperature, key, seq_ids_B, pos_B)[1]
