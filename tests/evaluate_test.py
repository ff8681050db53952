"""Tests for jax_ep/evaluate.py on the host: task accuracy is the exact match of the first
n generated tokens, and a generation routed its prompts and every token but the last.

A checkpoint's model on deployments (open_model, expert_load, the random router) is
tested in train_test.py, on its one training run."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from jax_ep import decode, evaluate
from jax_ep.config import ConfigError


def _generation(tokens_BxO):
  return decode.Generation(np.asarray(tokens_BxO, np.int32), 0.0, 0.0, [], 0.0, 0,
                           np.zeros((1, 1)), 0)


def test_accuracy_is_the_exact_match_of_the_first_n_tokens():
  gen = _generation([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
  assert evaluate.accuracy(gen, np.array([[1, 2], [4, 0], [7, 8]])) == pytest.approx(2 / 3)
  assert evaluate.accuracy(gen, np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])) == 1.0
  with pytest.raises(ConfigError, match="generated 3 tokens; the task's answers have 4"):
    evaluate.accuracy(gen, np.zeros((3, 4), np.int32))


def test_routed_tokens_are_the_prompts_and_every_generated_token_but_the_last():
  gen = _generation([[1, 2, 3], [4, 5, 6]])
  assert_array_equal(evaluate.routed_tokens(np.array([[7, 8], [9, 9]]), gen),
                     [[7, 8, 1, 2], [9, 9, 4, 5]])
