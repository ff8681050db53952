"""Tests for jax_ep/experts.py against plain numpy, so a change of activation shows up."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from jax_ep import experts

E, T, D, F, K = 4, 6, 8, 16, 2


def np_gelu(x):
  """tanh-approximate GELU (jax.nn.gelu's default), written out."""
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_mlp(x_TxD, up_DxF, down_FxD, gate_DxF=None):
  h = x_TxD @ up_DxF
  h = np_gelu(h) if gate_DxF is None else np_silu(x_TxD @ gate_DxF) * h
  return h @ down_FxD


def _weights(mlp_kind, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(T, D))
  router = rng.normal(size=(D, E))
  up = rng.normal(size=(E, D, F)) / np.sqrt(D)
  down = rng.normal(size=(E, F, D)) / np.sqrt(F)
  gate = rng.normal(size=(E, D, F)) / np.sqrt(D) if mlp_kind == "swiglu" else None
  return x, router, up, down, gate


def _f32(a):
  return None if a is None else jnp.asarray(a, jnp.float32)


@pytest.mark.parametrize("mlp_kind", ["gelu", "swiglu"])
def test_expert_mlp_matches_numpy(mlp_kind):
  x, _, up, down, gate = _weights(mlp_kind)
  x_ExCxD = np.stack([x + e for e in range(E)])  # each expert gets different tokens
  got = experts.expert_mlp(_f32(x_ExCxD), _f32(up), _f32(down), _f32(gate))
  want = [np_mlp(x_ExCxD[e], up[e], down[e], None if gate is None else gate[e])
          for e in range(E)]
  assert_allclose(got, np.stack(want), rtol=2e-5, atol=2e-5)


def test_gelu_is_not_relu():
  # Negative pre-activations leak through GELU (slightly) but not through ReLU.
  up = np.zeros((1, D, F))
  up[0, 0, 0] = 1.0
  down = np.zeros((1, F, D))
  down[0, 0, 0] = 1.0
  x = np.zeros((1, 1, D))
  x[0, 0, 0] = -1.0
  got = experts.expert_mlp(_f32(x), _f32(up), _f32(down))
  assert_allclose(got[0, 0, 0], np_gelu(-1.0), rtol=1e-5)  # about -0.159


@pytest.mark.parametrize("mlp_kind", ["gelu", "swiglu"])
def test_dense_moe_reference_matches_numpy(mlp_kind):
  x, router, up, down, gate = _weights(mlp_kind, seed=1)
  got = experts.dense_moe_reference(_f32(x), _f32(router), _f32(up), _f32(down), K,
                                    _f32(gate))
  logits = x @ router
  want = np.zeros_like(x)
  for t in range(T):
    picks = np.argsort(-logits[t])[:K]
    w = np.exp(logits[t, picks] - logits[t, picks].max())
    w /= w.sum()
    for e, we in zip(picks, w, strict=True):
      want[t] += we * np_mlp(x[t:t + 1], up[e], down[e], None if gate is None else gate[e])[0]
  assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_dense_moe_reference_keeps_dtype():
  x, router, up, down, _ = _weights("gelu")
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  out = experts.dense_moe_reference(bf(x), _f32(router), bf(up), bf(down), K)
  assert out.dtype == jnp.bfloat16 and out.shape == (T, D)
