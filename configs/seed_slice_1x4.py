"""The seed sliced for 1 stage(s) x 4 experts on 4 GPUs (deployment slice_1x4): each GPU
does exactly one seed_proposed GPU's work (configs/seed.py slice_config)."""

from . import seed


def get_config():
  return seed.slice_config(1, 4)
