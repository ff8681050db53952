"""jax_ep/perf/probes.py on the CPU devices, at small sizes: each probe reports a positive
rate for every method, and measure_hardware builds a measured Hardware from them."""

import jax
import jax.numpy as jnp

from jax_ep.perf import probes


def test_time_call_runs_warm_up_then_calls_times_trials():
  calls = []

  def fn(x):
    calls.append(1)
    return x

  assert probes.time_call(fn, jnp.zeros(4), calls=3, trials=2) > 0
  assert len(calls) == 1 + 3 * 2


def test_the_pallas_read_probe_reads_every_row():
  x = jax.random.normal(jax.random.key(0), (2 * probes.READ_CHUNK, probes.READ_ROW))
  got = probes._read_rows_max(x, interpret=True)
  assert (got == x.reshape(2, probes.READ_CHUNK, -1).max(axis=1)).all()


def test_probes_and_measured_hardware():
  devices = jax.devices()[:2]
  bandwidth = probes.probe_bandwidth(devices[0], 1 << 20)
  assert set(bandwidth) == {"scale", "negate", "read", "read_pallas", "weights_64_rows"}
  assert min(bandwidth.values()) > 0
  assert set(probes.probe_matmul(devices[0], (64,), jnp.float32)) == {"square_64"}
  assert probes.probe_all_to_all(devices, 1 << 16) > 0
  logs = []
  hw, raw = probes.measure_hardware(devices, jnp.float32, False, logs.append, probe_mib=1)
  assert hw.hbm_bytes_per_s == max(raw["bandwidth_methods"].values())
  assert hw.matmul_flops == max(raw["matmul_methods"].values())
  assert hw.gpus_per_node == 2 and hw.collective_latency_s == raw["all_to_all_small_s"] > 0
  assert "hbm_bytes_per_s" in hw.measured and any("all_to_all over 2" in m for m in logs)
