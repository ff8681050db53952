"""The tiny model with gated (SwiGLU) experts, to run the gated MLP on every mesh."""

import dataclasses

from . import tiny


def get_config():
  return dataclasses.replace(tiny.get_config(), mlp_kind="swiglu")
