"""Tests for jax_ep/sampling.py: greedy is argmax, temperature draws from softmax(l / T),
and the noise depends on (key, sequence, position, vocabulary id) only."""

import jax
import jax.numpy as jnp
import numpy as np
from numpy.testing import assert_array_equal

from jax_ep import sampling

KEY = jax.random.key(0)


def test_noise_is_the_same_whatever_the_shard():
  seq, pos = jnp.arange(3), jnp.array([5, 5, 9])
  whole = sampling.gumbel_noise(KEY, seq, pos, jnp.arange(64))
  for lo in (0, 16, 48):
    part = sampling.gumbel_noise(KEY, seq, pos, jnp.arange(lo, lo + 16))
    assert_array_equal(part, whole[:, lo:lo + 16])
  # Another sequence, position or key draws other noise.
  assert not np.allclose(whole[0], whole[1])
  assert not np.allclose(sampling.gumbel_noise(KEY, seq, pos + 1, jnp.arange(64)), whole)
  assert not np.allclose(sampling.gumbel_noise(jax.random.key(1), seq, pos, jnp.arange(64)),
                         whole)
  assert np.isfinite(np.asarray(whole)).all()


def test_greedy_is_argmax_and_ids_are_global():
  logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 2.0]])
  seq, pos = jnp.arange(2), jnp.zeros(2, jnp.int32)
  assert_array_equal(sampling.sample(logits, 0.0, KEY, seq, pos), [1, 0])  # ties: lowest id
  score, ids = sampling.local_best(logits, 100, 0.0, KEY, seq, pos)
  assert_array_equal(ids, [101, 100])
  assert_array_equal(score, [3.0, 2.0])


def test_temperature_draws_from_the_softmax():
  probs = np.array([0.5, 0.3, 0.2])
  logits = jnp.log(jnp.asarray(probs))[None]
  draw = jax.jit(jax.vmap(lambda p: sampling.sample(logits, 1.0, KEY, jnp.zeros(1, jnp.int32),
                                                    p[None])[0]))
  freq = np.bincount(np.asarray(draw(jnp.arange(20000))), minlength=3) / 20000
  assert np.abs(freq - probs).max() < 0.015  # 3 sigma of 20000 draws is about 0.01
  # A low temperature concentrates on the largest logit.
  cold = jax.jit(jax.vmap(lambda p: sampling.sample(logits, 0.05, KEY, jnp.zeros(1, jnp.int32),
                                                    p[None])[0]))
  assert (np.asarray(cold(jnp.arange(200))) == 0).mean() > 0.99


def test_noise_of_the_extreme_bits_is_finite():
  # All-zero bits are the uniform's 0 (clamped, else the noise is -inf and that id can never
  # be drawn); all-one bits its largest value below 1.
  noise = np.asarray(sampling.gumbel_of_bits(jnp.array([0, 2**9 - 1, 2**32 - 1], jnp.uint32)))
  assert np.isfinite(noise).all() and noise[0] == noise[1] < noise[2], noise
