"""jax_ep/perf/hardware.py: the presets' rates, and descriptions that mark measured fields."""

from jax_ep.perf import hardware


def test_presets_and_descriptions():
  assert hardware.HARDWARE == {"h100": hardware.H100_SXM, "h200": hardware.H200}
  for hw in hardware.HARDWARE.values():
    assert hw.hbm_bytes_per_s > 1e12 and hw.matmul_flops > 1e14 and hw.gpus_per_node == 8
    assert hw.intra_node_bytes_per_s > hw.inter_node_bytes_per_s
  h100 = hardware.H100_SXM.describe()
  assert h100.startswith("H100 SXM: HBM 3.35 TB/s, matmul 989 TFLOP/s") and "*" not in h100
  h200 = hardware.H200.describe()  # measured on one H200: marked
  assert "HBM 3.66* TB/s" in h200 and "inter-node 50 GB/s" in h200
  assert h200.endswith("(* measured)")
  assert hardware.IDEAL == hardware.Efficiency(1.0, 1.0, 1.0, 1.0, 0.0)
  assert hardware.Efficiency(memory=0.5).describe().startswith("memory 0.500, compute 1.000")
