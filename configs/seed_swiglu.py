"""The seed model with gated (SwiGLU) experts: a third 8192 x 32768 matrix per expert."""

import dataclasses

from . import seed


def get_config():
  return dataclasses.replace(seed.get_config(), mlp_kind="swiglu")
