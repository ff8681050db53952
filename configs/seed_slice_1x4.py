"""A slice of the seed for 1 stage(s) x 4 experts: each GPU does exactly the per-GPU work of
seed_proposed (deployment slice_1x4): seed dimensions, one layer per stage, one expert per
GPU, top-2 so each expert receives 2 x 64 = 128 tokens per step from 4 GPUs of 64
sequences, and the vocabulary cut to 2048 columns per GPU as 32768 over 16 GPUs."""

import dataclasses

from configs import seed


def get_config():
  return dataclasses.replace(seed.get_config(), num_layers=1, num_experts=4,
                             vocab_size=2048 * 4)
