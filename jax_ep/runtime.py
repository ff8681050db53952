"""Process set-up that must happen before jax starts a backend: devices and XLA flags."""

from __future__ import annotations

import os

# Async collectives overlap compute on GPU only when XLA's latency-hiding scheduler
# runs; it is off by default there (shared/GPU.md). These flags parse in jaxlib
# 0.10.2 .. 0.11.2 and are ignored by the CPU backend.
OVERLAP_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
)


def set_xla_flags(overlap: bool) -> None:
  """Adds the overlap flags to XLA_FLAGS (before the first jax computation)."""
  if not overlap:
    return
  flags = os.environ.get("XLA_FLAGS", "").split()
  names = {f.split("=")[0] for f in flags}
  flags += [f for f in OVERLAP_FLAGS if f.split("=")[0] not in names]
  os.environ["XLA_FLAGS"] = " ".join(flags)


def has_gpu_plugin() -> bool:
  """Whether a jax CUDA plugin is installed (found without starting a backend)."""
  import importlib.metadata

  names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
  return any(n.startswith("jax-cuda") and "plugin" in n for n in names)


FORCED_COUNT_FLAG = "--xla_force_host_platform_device_count"
AUTO_CPU_DEVICES = 8


def forced_device_count() -> int | None:
  """The N of XLA_FLAGS' --xla_force_host_platform_device_count=N, if set (the last one)."""
  count = None
  for flag in os.environ.get("XLA_FLAGS", "").split():
    name, _, value = flag.partition("=")
    if name == FORCED_COUNT_FLAG:
      try:
        count = int(value)
      except ValueError:
        from jax_ep.config import ConfigError

        raise ConfigError(f"XLA_FLAGS has {flag!r}: {FORCED_COUNT_FLAG} takes a whole "
                          "number of CPU devices, e.g. =64.") from None
  return count


# Past a few thousand fake devices XLA:CPU's start-up alone takes minutes (100,000 did not
# start in two): refused rather than left to look hung.
MAX_SIMULATED = 4096


def simulate_devices(n: int) -> None:
  """Runs on the CPU with `n` fake devices (n > 0), e.g. 64 to lay out the seed's mesh.

  n = -1 means: the real devices when a GPU plugin is installed; else the N of
  XLA_FLAGS=--xla_force_host_platform_device_count=N where that is set (jax's own way to
  ask for N CPU devices, which `jax_num_cpu_devices` would otherwise override), or 8.
  0: the devices as they are. Anything below -1, or above MAX_SIMULATED, is a
  ConfigError. Asking again for what is already set is a no-op (the backend may have
  started).
  """
  if n < -1 or n > MAX_SIMULATED:
    from jax_ep.config import ConfigError

    raise ConfigError(f"--simulate_devices={n}: use -1 (auto), 0 (the real devices) or a "
                      f"number of fake CPU devices from 1 to {MAX_SIMULATED} (the seed's "
                      "largest deployment takes 64).")
  if n == -1:
    n = 0 if has_gpu_plugin() else (forced_device_count() or AUTO_CPU_DEVICES)
  if n == 0:
    return
  import jax

  if jax.config.jax_platforms == "cpu" and jax.config.jax_num_cpu_devices == n:
    return
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)


def quiet_library_logs(packages=("orbax",)) -> None:
  """Drops INFO records of these packages from absl's logger: orbax logs each file of
  every save and restore at INFO, which buries the CLI's own output."""
  import logging

  from absl import logging as absl_logging

  def keep(record) -> bool:
    return record.levelno >= logging.WARNING or not any(
        f"{os.sep}{p}{os.sep}" in record.pathname for p in packages)

  absl_logging.get_absl_logger().addFilter(keep)
