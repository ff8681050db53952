"""jax_ep/runtime.py: XLA flags, simulated devices, the GPU-plugin check, quiet logs.

In-process and without a backend change: what would restart jax (a new device count) is
checked through the config values it would set, on a monkeypatched jax.config.
"""

import logging
import os
import types

import jax
import pytest
from absl import logging as absl_logging

from jax_ep import runtime
from jax_ep.config import ConfigError


def test_set_xla_flags_adds_the_overlap_flags_once_and_keeps_the_rest(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d "
                     "--xla_gpu_enable_latency_hiding_scheduler=false")
  runtime.set_xla_flags(True)
  flags = os.environ["XLA_FLAGS"].split()
  # A flag the user set keeps the user's value; the other is added; nothing is lost.
  assert flags == ["--xla_dump_to=/tmp/d", "--xla_gpu_enable_latency_hiding_scheduler=false",
                   "--xla_gpu_enable_highest_priority_async_stream=true"]
  runtime.set_xla_flags(True)
  assert os.environ["XLA_FLAGS"].split() == flags
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
  runtime.set_xla_flags(False)
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"


def test_has_gpu_plugin_reads_the_installed_distributions(monkeypatch):
  import importlib.metadata

  def dists(*names):
    return lambda: [types.SimpleNamespace(metadata={"Name": n}) for n in names]

  monkeypatch.setattr(importlib.metadata, "distributions", dists("numpy", "jax"))
  assert runtime.has_gpu_plugin() is False
  monkeypatch.setattr(importlib.metadata, "distributions",
                      dists("jax", "jax-cuda12-plugin", "jax-cuda12-pjrt"))
  assert runtime.has_gpu_plugin() is True


def test_simulate_devices(monkeypatch):
  with pytest.raises(ConfigError, match="--simulate_devices=-2"):
    runtime.simulate_devices(-2)
  with pytest.raises(ConfigError, match="from 1 to 4096"):
    runtime.simulate_devices(runtime.MAX_SIMULATED + 1)
  updates = []
  config = types.SimpleNamespace(jax_platforms="", jax_num_cpu_devices=-1,
                                 update=lambda k, v: updates.append((k, v)))
  monkeypatch.setattr(jax, "config", config)  # runtime's `import jax` finds this one
  runtime.simulate_devices(0)  # the devices as they are
  monkeypatch.setattr(runtime, "has_gpu_plugin", lambda: True)
  runtime.simulate_devices(-1)  # a GPU plugin: the real devices
  assert updates == []
  monkeypatch.setattr(runtime, "has_gpu_plugin", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
  runtime.simulate_devices(-1)  # no plugin, no forced count: 8 fake CPU devices
  runtime.simulate_devices(4)
  assert updates == [("jax_platforms", "cpu"), ("jax_num_cpu_devices", 8),
                     ("jax_platforms", "cpu"), ("jax_num_cpu_devices", 4)]
  updates.clear()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=64 --xla_cpu_foo=1")
  runtime.simulate_devices(-1)  # jax's own flag asks for 64: honoured, not overridden by 8
  runtime.simulate_devices(16)  # an explicit count wins over the flag
  assert updates == [("jax_platforms", "cpu"), ("jax_num_cpu_devices", 64),
                     ("jax_platforms", "cpu"), ("jax_num_cpu_devices", 16)]
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=many")
  with pytest.raises(ConfigError, match="takes a whole number"):
    runtime.simulate_devices(-1)
  updates.clear()
  config.jax_platforms, config.jax_num_cpu_devices = "cpu", 4
  runtime.simulate_devices(4)  # already so: nothing changes (the backend may be up)
  assert updates == []


def test_quiet_library_logs_drops_only_info_of_the_named_packages():
  logger = absl_logging.get_absl_logger()
  before = list(logger.filters)
  runtime.quiet_library_logs(("orbax",))
  (keep,) = [f for f in logger.filters if f not in before]
  try:
    def record(level, path):
      return logging.LogRecord("absl", level, path, 1, "m", None, None)

    orbax = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py")
    ours = os.path.join(os.sep, "repo", "jax_ep", "train.py")
    assert not keep(record(logging.INFO, orbax))
    assert keep(record(logging.WARNING, orbax))
    assert keep(record(logging.INFO, ours))
  finally:
    logger.removeFilter(keep)
