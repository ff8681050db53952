"""The device mesh of a deployment: axes (stage, expert, tp), tp innermost.

The ordering rule (device_grid): devices sorted by (process, id) fill the
[stage, expert, tp] grid row-major, tp fastest. A tp group is then `tp` consecutive
devices and a stage's expert x tp devices the next block out, so on hosts of d devices
each (processes hold whole hosts, or one GPU each of a host in order):
  * a tp group lies inside one host when tp divides d (seed_baseline: tp 8 = one node);
  * a stage's expert x tp group lies inside one host when it divides d, else it spans
    exactly expert x tp / d hosts when d divides it (seed_proposed: 16 experts of a
    stage on 2 nodes of 8), and never shares a host with another stage;
  * stages are what cross hosts first.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jax_ep.config import ConfigError, DeploymentConfig

# The mesh axes, outermost first: pipeline stages, expert parallelism (attention data
# parallel over it), tensor parallelism. Every module names them through these.
STAGE, EXPERT, TP = "stage", "expert", "tp"
AXES = (STAGE, EXPERT, TP)


def device_grid(dep: DeploymentConfig, devices) -> np.ndarray:
  """The [stage, expert, tp] array of devices by the ordering rule above.

  `devices` need only `process_index` and `id` (real jax devices, or placement's
  virtual ones). Raises ConfigError if there are too few, or if a process of a
  multi-process job would hold none of the mesh.
  """
  devices = list(devices)
  need = dep.num_devices
  if len(devices) < need:
    processes = len({d.process_index for d in devices})
    if processes == 1:
      simulate = (f"jax_ep.runtime.simulate_devices({need}) before jax starts "
                  f"(--simulate_devices={need} on the command line)")
    elif need % processes == 0:  # --simulate_devices counts one process's devices
      simulate = (f"{need // processes} in each of the {processes} processes "
                  f"(--simulate_devices={need // processes}; launch/local.py "
                  f"--devices_per_process={need // processes})")
    else:
      simulate = (f"a whole number in each of the {processes} processes, which {need} "
                  f"devices are not: start a number of processes that divides {need}")
    raise ConfigError(
        f"deployment {dep.describe()} needs {need} devices but {len(devices)} are available. "
        f"On a CPU, simulate them: {simulate}; or use a smaller mesh "
        "(fewer stages, expert or tp; --stages, --expert_axis, --tp on the command line).")
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  chosen = ordered[:need]
  idle = sorted({d.process_index for d in ordered} - {d.process_index for d in chosen})
  if idle:
    raise ConfigError(
        f"deployment {dep.describe()} uses {need} of the {len(devices)} devices, so process"
        f"{'es' if len(idle) > 1 else ''} {', '.join(map(str, idle))} would hold none of it; "
        f"use a deployment of {len(devices)} devices or start fewer processes.")
  grid = np.empty(need, dtype=object)
  grid[:] = chosen
  return grid.reshape(dep.mesh_shape)


def make_mesh(dep: DeploymentConfig, devices=None) -> Mesh:
  """The (stage, expert, tp) mesh over the global devices (jax.devices() by default)."""
  return Mesh(device_grid(dep, jax.devices() if devices is None else devices), AXES)

