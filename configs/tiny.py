"""The seed's shape scaled down to run in seconds on a CPU; fp32 so deployments agree exactly."""

import dataclasses

from . import seed


def get_config():
  return dataclasses.replace(seed.get_config(), num_heads=8, head_dim=8, model_dim=64,
                             mlp_dim=128, vocab_size=256, max_seq_len=64, dtype="float32")
