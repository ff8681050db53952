"""`jax-ep bench` and `jax-ep predict`: the single, baseline and proposed deployments run
side by side, and the seed's table predicted by the cost model (jax_ep/perf/)."""

from __future__ import annotations

import os
import sys

from jax_ep.cli import flags

# Flags of generate that bench does not read (main says so) and that name a mesh.
MESH_FLAGS = (flags.DEPLOYMENT, flags.STAGES, flags.EXPERT, flags.TP, flags.PLACEMENT,
              flags.MICRO, flags.GROUPS, flags.PREFILL_CHUNK, flags.KERNELS, flags.CAPACITY,
              flags.DROPLESS)


def bench():
  """The side-by-side run (jax_ep/perf/runner.py). Unset, --config, --prompt_len and --steps
  take the platform's defaults (BenchSpec: the seed on GPU, tiny on CPU); --max_new_tokens
  sets the steps (the ring's fill, --warmup and --synced steps, the rest timed back to
  back); --checkpoint: the model and weights of a checkpoint instead of random ones. Mesh
  flags are not read (main reports them; --kinds=mesh:SxExT/G runs any mesh)."""
  from jax_ep.config import ConfigError
  from jax_ep.perf import report, runner

  if any(f.present for f in MESH_FLAGS):  # main reports them as unread; say what to use
    print("jax-ep bench runs the single, baseline and proposed presets for the devices "
          "present, or --kinds; for other meshes use --kinds=mesh:SxExT/G.", flush=True)
  if flags.STEPS.present and flags.NEW.present:
    raise ConfigError("--steps and --max_new_tokens both set bench's timed steps: give one.")
  steps = flags.STEPS.value if flags.STEPS.present else None
  if flags.NEW.present:
    fixed = 2 + flags.WARMUP.value + flags.SYNCED.value  # prefill's token, the fill, the rest
    if flags.NEW.value < fixed + 1:
      raise ConfigError(
          f"--max_new_tokens={flags.NEW.value} is fewer than a bench decodes: prefill's token, "
          f"the ring's fill, --warmup={flags.WARMUP.value} and --synced={flags.SYNCED.value} "
          f"steps and one timed back to back, {fixed + 1}; give --max_new_tokens={fixed + 1} "
          "or more, or fewer --warmup or --synced steps.")
    steps = flags.NEW.value - fixed
  config = flags.CONFIG.value if flags.CONFIG.present else None
  spec = runner.BenchSpec(
      config=f"checkpoint:{flags.CHECKPOINT.value}" if flags.CHECKPOINT.value else config,
      kinds=tuple(flags.KINDS.value) if flags.KINDS.value else runner.BenchSpec.kinds,
      share=flags.SHARE.value, batch=1024 if flags.BATCH.value is None else flags.BATCH.value,
      prompt_len=flags.PROMPT_LEN.value if flags.PROMPT_LEN.present else None, steps=steps,
      synced=flags.SYNCED.value, warmup=flags.WARMUP.value, num_devices=flags.DEVICES.value,
      seed=flags.SEED.value, probe_mib=flags.PROBE_MIB.value, checkpoint=flags.CHECKPOINT.value,
      tokens_per_call=flags.PER_CALL.value or 1, expert_blocks=flags.EXPERT_BLOCKS.value or "",
      skip_unfit=flags.SKIP_UNFIT.value,
      check_memory=flags.CHECK_MEMORY.value)
  result = runner.run(spec, log=lambda m: print(m, flush=True))
  print(report.markdown(result))
  out_dir, stem, json_path = flags.OUT_DIR.value, "seed_table", None
  if flags.OUTPUT.value:  # the JSON as named; the table and plot beside it, by its stem
    json_path = flags.OUTPUT.value
    stem = os.path.splitext(os.path.basename(json_path))[0]
    out_dir = os.path.dirname(os.path.abspath(json_path))
  if out_dir:
    for path in report.write(result, out_dir, stem, json_path):
      print(f"wrote {path}")
  return 0


def predict():
  """The seed's table, the term-by-term breakdown and, with --plot, the scaling curves
  (jax_ep/perf/tables.py); no device is used."""
  from jax_ep import output
  from jax_ep.perf import tables

  output.check_output_path(flags.PLOT.value, "--plot")
  _check_calibration(flags.CALIBRATION.value)
  batch = 1024 if flags.BATCH.value is None else flags.BATCH.value
  print(tables.report(flags.HARDWARE.value, batch, flags.CONTEXT_LEN.value, flags.CALIBRATION.value,
                      flags.PLOT.value))
  return 0


def _check_calibration(path: str | None) -> None:
  """--calibration must be a jax-ep bench result with at least one measured run."""
  import json

  from jax_ep.config import ConfigError
  from jax_ep.perf.calibrate import load_records

  if path is None:
    return
  try:
    records = load_records(path)
  except OSError as e:
    raise ConfigError(f"--calibration={path}: cannot read it ({e.strerror}).") from None
  except (json.JSONDecodeError, AttributeError, TypeError) as e:
    raise ConfigError(f"--calibration={path} is not a jax-ep bench result ({e}).") from None
  if not records:
    raise ConfigError(f"--calibration={path} holds no measured run (a \"runs\" list with "
                      "tpot_ms, as `jax-ep bench --output` writes).")
  with open(path) as f:
    result = json.load(f)
  if isinstance(result, dict) and result.get("platform") == "cpu":
    print(f"jax-ep: --calibration={path} was measured on CPU devices: its efficiencies say "
          "nothing about a GPU, so the calibrated rows below only show the mechanics.",
          file=sys.stderr, flush=True)

