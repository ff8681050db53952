"""The tiny model with 64 experts per layer, for the seed_proposed_e64 layout on 64 devices."""

import dataclasses

from . import tiny


def get_config():
  return dataclasses.replace(tiny.get_config(), num_experts=64)
