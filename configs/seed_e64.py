"""The seed's other reading: 64 experts per layer ("all 64 experts per layer compute")."""

import dataclasses

from . import seed


def get_config():
  return dataclasses.replace(seed.get_config(), num_experts=64)
