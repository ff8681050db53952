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


def test_the_attention_read_probe_attends_over_every_position():
  n = 2 * 16 * 32 * probes.READ_ROW  # keys and values of 16 heads and 32 positions
  x = jax.random.normal(jax.random.key(0), (n,))
  assert probes._attention_positions(n) == 32
  assert probes._attention_positions(1 << 31) == 256  # 4 GiB of fp16: 512 sequences
  k, v = x.reshape(2, 1, 16, 32, probes.READ_ROW)
  got = probes._attention_read(k, v, interpret=True)  # [B, H, Dh]
  q = k[:, :, 0]
  p = jax.nn.softmax(jnp.einsum("bhk,bhsk->bhs", q, k) * probes.READ_ROW**-0.5, axis=-1)
  assert jnp.allclose(got, jnp.einsum("bhs,bhsk->bhk", p, v), atol=1e-4)


def test_each_bandwidth_method_counts_the_bytes_it_moves(monkeypatch):
  # 12 MiB: the attention probe's cache (whole sequences of 256 positions) is 8 MiB of it.
  moved = []

  def fake_time(fn, *args, **kw):
    out = fn(*args)
    moved.append((sum(a.nbytes for a in args), out.nbytes, args[-1].nbytes))
    return 1.0

  monkeypatch.setattr(probes, "time_call", fake_time)
  got = probes.probe_bandwidth(jax.devices()[0], 12 << 20)
  assert list(got) == ["scale", "negate", "read", "read_attention", "weights_64_rows"]
  for name, (args, out, _) in zip(list(got)[:4], moved, strict=False):
    assert got[name] == args + out, name  # what it reads and what it writes
  assert moved[3][0] == 8 << 20
  assert got["weights_64_rows"] == moved[4][2] == 12 << 20  # the weight only


def test_probes_and_measured_hardware():
  devices = jax.devices()[:2]
  bandwidth = probes.probe_bandwidth(devices[0], 1 << 20)
  assert set(bandwidth) == {"scale", "negate", "read", "read_attention", "weights_64_rows"}
  assert min(bandwidth.values()) > 0
  assert set(probes.probe_matmul(devices[0], (64,), jnp.float32)) == {"square_64"}
  assert probes.probe_all_to_all(devices, 1 << 16) > 0
  logs = []
  hw, raw = probes.measure_hardware(devices, jnp.float32, False, logs.append, probe_mib=1)
  assert hw.hbm_bytes_per_s == max(raw["bandwidth_methods"].values())
  assert hw.matmul_flops == max(raw["matmul_methods"].values())
  assert hw.gpus_per_node == 2 and hw.collective_latency_s == raw["all_to_all_small_s"] > 0
  assert "hbm_bytes_per_s" in hw.measured and any("all_to_all over 2" in m for m in logs)
