"""The device mesh of a deployment: axes (stage, expert, tp), tp innermost."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jax_ep.config import ConfigError, DeploymentConfig
from jax_ep.ep import AXES


def make_mesh(dep: DeploymentConfig, devices=None) -> Mesh:
  """A (stage, expert, tp) mesh over the first stage*expert*tp devices.

  Devices are ordered by (process, id) and tp varies fastest, then expert, so a
  tp group and then an expert group stay on one host where the host has enough
  devices; stages are the axis that crosses hosts first.
  """
  devices = list(jax.devices() if devices is None else devices)
  need = dep.num_devices
  if len(devices) < need:
    raise ConfigError(
        f"deployment {dep.describe()} needs {need} devices but {len(devices)} are available. "
        f"Use --simulate_devices={need} on a CPU, or a smaller mesh "
        "(--stages, --expert_axis, --tp).")
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))[:need]
  return Mesh(np.asarray(devices, dtype=object).reshape(dep.mesh_shape), AXES)
