"""The mesh's device ordering rule: tp groups, then a stage's experts, stay inside a host."""

import random

import jax
import numpy as np
import pytest

from configs import deployments
from jax_ep import mesh
from jax_ep.config import ConfigError, DeploymentConfig
from jax_ep.placement import virtual_devices


def _processes(grid):
  return np.vectorize(lambda d: d.process_index, otypes=[int])(grid)


def _spans(groups):
  """Processes of each group (rows of a [groups, devices] array)."""
  return [sorted(set(g.tolist())) for g in groups]


def test_seed_proposed_on_8_nodes_of_8_puts_a_stage_on_2_whole_nodes():
  devices = virtual_devices(8, 8)
  random.Random(0).shuffle(devices)  # the rule sorts; the order given does not matter
  proc = _processes(mesh.device_grid(deployments.PRESETS["seed_proposed"], devices))
  assert proc.shape == (4, 16, 1)
  stages = _spans(proc.reshape(4, -1))
  assert stages == [[0, 1], [2, 3], [4, 5], [6, 7]]  # 16 experts of a stage: 2 nodes, no sharing
  # Each node holds 8 experts of one layer, 8 consecutive ones.
  assert all(sorted(set(proc[s, 8 * h:8 * h + 8, 0])) == [2 * s + h]
             for s in range(4) for h in range(2))


def test_seed_baseline_on_2_nodes_keeps_each_tp_group_on_one_node():
  proc = _processes(mesh.device_grid(deployments.PRESETS["seed_baseline"], virtual_devices(2, 8)))
  assert _spans(proc.reshape(-1, 8)) == [[0], [1]]  # tp 8 = a node; the stages cross nodes


def test_tp_groups_inside_hosts_then_experts():
  dep = DeploymentConfig(kind="proposed", stages=2, expert=4, tp=2, placement="tp")
  proc = _processes(mesh.device_grid(dep, virtual_devices(4, 4)))
  assert all(len(s) == 1 for s in _spans(proc.reshape(-1, 2)))  # tp 2 inside a host of 4
  assert _spans(proc.reshape(2, -1)) == [[0, 1], [2, 3]]  # a stage of 8 on 2 hosts of 4
  # Where a tp group does not fit a host it spans the fewest: tp 8 over hosts of 4.
  proc = _processes(mesh.device_grid(deployments.PRESETS["baseline_16"], virtual_devices(4, 4)))
  assert _spans(proc.reshape(-1, 8)) == [[0, 1], [2, 3]]


def test_one_process_per_gpu_orders_by_process():
  proc = _processes(mesh.device_grid(deployments.PRESETS["seed_baseline"], virtual_devices(16, 1)))
  assert proc.ravel().tolist() == list(range(16))


def test_a_process_without_devices_in_the_mesh_is_an_error():
  with pytest.raises(ConfigError, match="uses 8 of the 16 devices, so process 1 would hold none"):
    mesh.device_grid(deployments.PRESETS["proposed_8"], virtual_devices(2, 8))
  with pytest.raises(ConfigError, match="needs 64 devices but 16 are available") as e:
    mesh.device_grid(deployments.PRESETS["seed_proposed"], virtual_devices(2, 8))
  # --simulate_devices counts one process's devices: 32 each, not 64.
  assert ("simulate them: 32 in each of the 2 processes (--simulate_devices=32; "
          "launch/local.py --devices_per_process=32)") in str(e.value)
  with pytest.raises(ConfigError, match="simulate_devices\\(64\\) before jax starts"):
    mesh.device_grid(deployments.PRESETS["seed_proposed"], virtual_devices(1, 16))
  with pytest.raises(ConfigError, match="start a number of processes that divides 64"):
    mesh.device_grid(deployments.PRESETS["seed_proposed"], virtual_devices(3, 4))


def test_make_mesh_on_real_devices_follows_the_rule():
  dep = deployments.PRESETS["proposed_16"]
  devices = jax.devices()[::-1]
  m = mesh.make_mesh(dep, devices)
  assert m.axis_names == ("stage", "expert", "tp") and m.devices.shape == (4, 4, 1)
  assert [d.id for d in m.devices.ravel()] == sorted(d.id for d in jax.devices())[:16]
