"""A small model for the digit tasks (jax_ep/tasks.py): trains to high accuracy in seconds on a CPU.

Four layers (one per stage of the 8-device proposed preset), 4 experts (whole experts on
the baseline's tp of 4), vocabulary 16 (the 12 task tokens, divisible by every preset's
vocabulary shards up to 16), float32 so every deployment generates the same tokens.
"""

import dataclasses

from . import tiny


def get_config():
  return dataclasses.replace(tiny.get_config(), num_experts=4, top_k=2, num_heads=4,
                             head_dim=16, model_dim=64, mlp_dim=64, vocab_size=16,
                             max_seq_len=32)
