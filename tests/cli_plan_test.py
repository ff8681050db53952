"""Tests for jax_ep/cli/plan.py: `jax-ep plan` run as users run it (cli_runner.py): the seed
refused on one H100 with the deployment that fits named, and the holdings of one that fits."""

from cli_runner import run_cases

from configs import deployments


def test_plan_refuses_what_does_not_fit_and_prints_the_holdings():
  (refused, fits, capacity, dropping, mesh, fewer, no_preset, cpu_fraction, slice_tiny,
   slice_own, more) = run_cases([
      ["plan", "--config=seed", "--deployment=single", "--device_kind=h100"],
      ["plan", "--config=seed", "--deployment=seed_proposed", "--device_kind=h200",
       "--batch=1024", "--prompt_len=32", "--max_new_tokens=32"],
      ["plan", "--capacity_factor=0.5"], ["plan", "--capacity_factor=0.5", "--nodropless"],
      ["plan", "--deployment=mesh:1x2x1", "--compile"],
      ["plan", "--deployment=mesh:2x2x1", "--devices=8"],
      ["plan", "--deployment=proposed", "--devices=3"],
      ["plan", "--device_kind=cpu", "--mem_fraction=0.5"],
      ["plan", "--deployment=slice_2x2"],
      ["plan", "--deployment=slice_2x2", "--config=seed_slice_2x2"],
      ["plan", "--deployment=proposed", "--expert_axis=4"],
  ])
  # Overrides that need more devices than the preset's count: the flag to pass is named.
  assert more["rc"] == 2 and ("needs 16 devices; the plan is for 8 devices "
                              "(--deployment=proposed's count without --devices): pass "
                              "--devices=16.") in more["stderr"], more["stderr"]
  # A seed slice's mesh with another model: said, and which model the slice is for.
  assert slice_tiny["rc"] == 0, slice_tiny["stderr"][-2000:]
  assert ("slice_2x2 is the mesh of the seed slice --config=seed_slice_2x2 (`jax-ep bench "
          "--kinds=slice_2x2` runs the two together); this run lays out tiny on it."
          in slice_tiny["stderr"])
  assert "is the mesh of the seed slice" not in slice_own["stderr"]
  assert cpu_fraction["rc"] == 0 and "--mem_fraction=0.5 is without effect" in cpu_fraction[
      "stderr"]
  # A mesh of fewer devices than --devices: planned for its own, and said so.
  assert fewer["rc"] == 0 and "(4 devices)" in fewer["stdout"]
  assert ("mesh:2x2x1 (stage 2 x expert 2 x tp 1) uses 4 of the "
          "--devices=8") in fewer["stderr"]
  # No preset of a kind for --devices: the advice is plan's flag, not generate's.
  assert no_preset["rc"] == 2 and "(--devices)" in no_preset["stderr"]
  assert "simulate" not in no_preset["stderr"]
  # The seed on one 80 GB H100: refused (exit 1, after the whole plan), and the smallest
  # deployment that fits is named.
  assert refused["rc"] == 1 and "DOES NOT FIT" in refused["stdout"]
  assert "Which device holds what" in refused["stdout"]
  assert "--deployment=proposed_2 (2 devices" in refused["stdout"]
  assert "| weights: experts | 64.000 |" in refused["stdout"]
  assert "(--nocheck_memory" not in refused["stdout"]  # plan runs nothing: no advice to
  # Per device of the 64 (expert axis 16, 4 stages): 64 of the 1024 sequences, one layer.
  assert "| KV cache (64 of the 1024 sequences x 1 layer x 64 positions) |" in fits["stdout"]
  # --capacity_factor sizes only --nodropless buffers: said where it does nothing.
  assert "--capacity_factor=0.5 is without effect" in capacity["stderr"]
  assert dropping["rc"] == 0 and "without effect" not in dropping["stderr"]
  assert fits["rc"] == 0 and "fits." in fits["stdout"]
  holdings = [line for line in fits["stdout"].splitlines() if line.startswith("| 63 |")]
  assert holdings == ["| 63 | 3, 15, 0 | 3 | 15 | 0-32767 | 0-15 | 30720-32767 | 960-1023 |"]
  assert deployments.PRESETS["seed_proposed"].num_devices == 64
  # Any mesh shape, on its own device count; the tiny model's compiled bytes in MiB (in
  # GiB they read 0.000).
  assert mesh["rc"] == 0 and "stage 1 x expert 2 x tp 1 (2 devices)" in mesh["stdout"]
  assert "compiled for 2 simulated CPU devices" in mesh["stdout"]
  assert " MiB" in mesh["stdout"] and "0.00 GiB" not in mesh["stdout"]
