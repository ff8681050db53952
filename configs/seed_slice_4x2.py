"""The seed sliced for 4 stage(s) x 2 experts on 8 GPUs (deployment slice_4x2): each GPU
does exactly one seed_proposed GPU's work (configs/seed.py slice_config)."""

from . import seed


def get_config():
  return seed.slice_config(4, 2)
