"""Digit tasks with checkable answers, drawn on the fly from (seed, step): copy or reverse.

A sequence is BOS d1 .. dn SEP a1 .. an: n random digits, the separator, and the
answer (the digits copied or reversed). A model is asked for the answer by greedy
decoding after the prompt BOS d1 .. dn SEP; it is right when all n tokens are. Since
greedy decoding feeds back its own tokens, that exact match is also what one
teacher-forced forward pass measures (every answer token the argmax), which is how
training scores it without decoding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep.config import ConfigError

NAMES = ("copy", "reverse")
SEP, BOS = 10, 11  # tokens 0..9 are the digits
MIN_VOCAB = 12

# Streams of jax.random.fold_in(key(seed), stream): training batches, held-out prompts.
TRAIN, EVAL = 0, 1


@dataclasses.dataclass(frozen=True)
class Task:
  name: str = "reverse"
  digits: int = 6  # n: digits in the prompt, tokens in the answer

  def __post_init__(self):
    if self.name not in NAMES:
      raise ConfigError(f"--task={self.name!r} is unknown; use one of {list(NAMES)}.")
    if not isinstance(self.digits, int) or isinstance(self.digits, bool) or self.digits < 1:
      raise ConfigError(f"--task_digits={self.digits!r} must be a positive integer.")

  @property
  def prompt_len(self) -> int:
    return self.digits + 2

  @property
  def seq_len(self) -> int:
    return self.prompt_len + self.digits

  def check_vocab(self, vocab_size: int, max_seq_len: int) -> None:
    if vocab_size < MIN_VOCAB:
      raise ConfigError(f"the {self.name} task needs a vocabulary of at least {MIN_VOCAB} "
                        f"tokens (10 digits, separator, BOS); the model has {vocab_size}.")
    if self.seq_len > max_seq_len:
      raise ConfigError(f"--task_digits={self.digits} makes sequences of {self.seq_len} "
                        f"tokens, more than the model's max_seq_len={max_seq_len}.")

  def answer(self, digits_BxO):
    return digits_BxO[:, ::-1] if self.name == "reverse" else digits_BxO

  def sequences(self, key, batch: int):
    """Whole sequences [B, 2n + 2] int32 (jnp, usable under jit)."""
    digits_BxO = jax.random.randint(key, (batch, self.digits), 0, 10, jnp.int32)
    bos = jnp.full((batch, 1), BOS, jnp.int32)
    sep = jnp.full((batch, 1), SEP, jnp.int32)
    return jnp.concatenate([bos, digits_BxO, sep, self.answer(digits_BxO)], axis=1)

  def train_batch(self, seed: int, step, batch: int):
    """The training batch of `step`: a function of (seed, step) only, so a resumed run
    sees the batches an uninterrupted one would."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), TRAIN), step)
    return self.sequences(key, batch)

  def eval_batch(self, seed: int, batch: int):
    """Held-out sequences: a stream apart from every training batch's."""
    return self.sequences(jax.random.fold_in(jax.random.key(seed), EVAL), batch)

  def eval_set(self, seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out prompts [B, n + 2] and their answers [B, n] (numpy)."""
    seq = np.asarray(self.eval_batch(seed, batch))
    return seq[:, :self.prompt_len], seq[:, self.prompt_len:]

  def answer_mask(self):
    """[2n + 1] over next-token targets seq[1:]: True where the target is an answer token."""
    return jnp.arange(self.seq_len - 1) >= self.prompt_len - 1

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> Task:
    return cls(**d)


def exact_match(answers_BxO, expected_BxO) -> float:
  """Fraction of sequences whose whole answer is right."""
  return float(np.mean(np.all(np.asarray(answers_BxO) == np.asarray(expected_BxO), axis=1)))
