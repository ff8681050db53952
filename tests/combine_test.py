"""Tests for jax_ep/kernels/combine.py: the Pallas combine (through the interpreter)
against routing.combine, the XLA reference, with dropped picks and ragged token counts."""

import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from jax_ep import routing
from jax_ep.kernels import combine


@pytest.mark.parametrize("t,k,s,d", [(32, 2, 70, 1024), (5, 3, 9, 64), (16, 1, 16, 48)])
def test_kernel_equals_the_reference(t, k, s, d):
  rng = np.random.default_rng(t)
  y = jnp.asarray(rng.normal(size=(s, d)), jnp.float32)
  slot = rng.integers(0, s + 1, (t, k)).astype(np.int32)  # s: a dropped pick
  slot[0] = s  # a token all of whose picks were dropped
  w = jnp.asarray(rng.random((t, k)), jnp.float32)
  want = routing.combine(y, jnp.asarray(slot), w)
  got = combine.combine(y, jnp.asarray(slot), w, interpret=True)
  assert got.shape == (t, d) and got.dtype == y.dtype
  assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert_allclose(got[0], 0.0)


def test_padding_rows_past_rows_are_never_read():
  # The grouped kernel's padded output, taken in place: rows past `rows` hold NaN here,
  # and slot == rows (not len(y)) is the dropped pick.
  rng = np.random.default_rng(0)
  rows, pad, d = 12, 16, 64
  y = rng.normal(size=(rows + pad, d)).astype(np.float32)
  y[rows:] = np.nan
  slot = rng.integers(0, rows + 1, (20, 2)).astype(np.int32)
  slot[3] = rows
  w = jnp.asarray(rng.random((20, 2)), jnp.float32)
  want = routing.combine(jnp.asarray(y[:rows]), jnp.asarray(slot), w)
  got = combine.combine(jnp.asarray(y), jnp.asarray(slot), w, rows=rows, interpret=True)
  assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert_allclose(got[3], 0.0)
  with pytest.raises(ValueError, match="rows=29 must be within y's 28 rows"):
    combine.combine(jnp.asarray(y), jnp.asarray(slot), w, rows=29, interpret=True)


def test_block_width_and_errors():
  assert combine.block_d(8192) == 512 and combine.block_d(48) == 16
  assert not combine.supports(4, 40)
  with pytest.raises(ValueError, match="multiple of 16"):
    combine.combine(jnp.zeros((4, 40)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1)),
                    interpret=True)
