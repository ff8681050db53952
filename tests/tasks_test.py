"""Tests for jax_ep/tasks.py: the digit tasks' sequences are a function of (seed, step),
held apart from the evaluation stream, with the layout BOS digits SEP answer; answers,
the answer mask, exact match and the checks on a task."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from jax_ep import tasks
from jax_ep.config import ConfigError


def test_task_data_is_a_function_of_seed_and_step():
  task = tasks.Task("reverse", 5)
  a, b = task.train_batch(0, 3, 8), task.train_batch(0, 3, 8)
  assert_array_equal(a, b)
  assert not np.array_equal(a, task.train_batch(0, 4, 8))
  assert not np.array_equal(a, task.train_batch(1, 3, 8))
  a = np.asarray(a)
  assert (a[:, 0] == tasks.BOS).all() and (a[:, 6] == tasks.SEP).all()
  assert_array_equal(a[:, 7:], a[:, 1:6][:, ::-1])
  prompts, answers = task.eval_set(0, 8)
  assert prompts.shape == (8, 7) and answers.shape == (8, 5)
  assert_array_equal(np.asarray(tasks.Task("copy", 5).answer(a[:, 1:6])), a[:, 1:6])
  with pytest.raises(ConfigError, match="--task='add'"):
    tasks.Task("add", 3)


def test_answer_mask_exact_match_and_checks():
  task = tasks.Task("copy", 3)  # BOS d d d SEP a a a: 8 tokens, 7 next-token targets
  assert task.prompt_len == 5 and task.seq_len == 8
  assert_array_equal(task.answer_mask(), [False] * 4 + [True] * 3)
  assert tasks.exact_match([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == 0.5
  assert not np.array_equal(task.eval_batch(0, 4), task.train_batch(0, 0, 4))
  with pytest.raises(ConfigError, match="--task_digits=0 must be a positive integer"):
    tasks.Task("copy", 0)
  with pytest.raises(ConfigError, match="vocabulary of at least 12"):
    task.check_vocab(10, 64)
  with pytest.raises(ConfigError, match="sequences of 8 tokens, more than the model's "
                                        "max_seq_len=7"):
    task.check_vocab(12, 7)
