"""A slice of the seed for 4 stage(s) x 2 experts: each GPU does exactly the per-GPU work of
seed_proposed (deployment slice_4x2): seed dimensions, one layer per stage, one expert per
GPU, top-2 so each expert receives 2 x 64 = 128 tokens per step from 2 GPUs of 64
sequences, and the vocabulary cut to 2048 columns per GPU as 32768 over 16 GPUs."""

import dataclasses

from configs import seed


def get_config():
  return dataclasses.replace(seed.get_config(), num_layers=4, num_experts=2,
                             vocab_size=2048 * 2)
