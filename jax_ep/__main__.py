"""The jax-ep command line: `jax-ep generate|bench|predict|plan|train|import-hf|export-hf
[--flags]`
(also `python -m jax_ep`).

  generate   prefill prompts and decode them on a deployment; TPS and TPOT
  bench      the single, baseline and proposed deployments side by side (benchmarks/)
  predict    the seed's table predicted by the cost model, term by term (jax_ep/perf/)
  plan       bytes per device and which device holds what, without any GPU
  train      train a small MoE on a checkable task (optax), with orbax checkpoints
  import-hf  Mixtral-format weights (config.json + *.safetensors) -> a checkpoint
  export-hf  a checkpoint -> Mixtral-format weights

A thin shell: flags become configs once, here; the work is library calls.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from absl import app, flags, logging

from configs import deployments, model_names
from jax_ep import distributed, runtime
from jax_ep.perf.hardware import HARDWARE

COMMANDS = ("generate", "bench", "predict", "plan", "train", "import-hf", "export-hf")

_CONFIG = flags.DEFINE_string("config", "tiny", "Model preset, a file in configs/: "
                              f"{', '.join(model_names())}.")
_DEPLOYMENT = flags.DEFINE_string(
    "deployment", "proposed",
    "single, baseline or proposed (the preset for the device count), or a preset from "
    f"configs/deployments.py: {', '.join(sorted(deployments.PRESETS))}; '/G' after any sets "
    "its decode groups in flight.")
_SIMULATE = flags.DEFINE_integer(
    "simulate_devices", -1,
    "Run on the CPU with N fake devices. -1 (default): 8 when no GPU plugin is installed, "
    "else the real GPUs. 0: the real devices as they are.")
_STAGES = flags.DEFINE_integer("stages", None, "Override the preset's pipeline stages.")
_EXPERT = flags.DEFINE_integer("expert_axis", None, "Override the preset's expert axis size.")
_TP = flags.DEFINE_integer("tp", None, "Override the preset's tensor-parallel size.")
_PLACEMENT = flags.DEFINE_enum("placement", None, ["ep", "tp"],
                               "Override expert placement: ep = whole experts spread over "
                               "expert x tp; tp = each expert's MLP split over tp.")
_MICRO = flags.DEFINE_integer("microbatches", None, "Override prefill's pipeline micro-batches.")
_GROUPS = flags.DEFINE_integer(
    "decode_groups", None,
    "Decode groups in flight on the ring of stages (jax_ep/ring.py): G >= stages keeps every "
    "stage busy; 1 is one batch in flight; 0 (the presets): one per stage.")
_PER_CALL = flags.DEFINE_integer(
    "tokens_per_call", None,
    "Tokens per sequence that one decode call generates (a loop of static trip count on "
    "the device, one host dispatch per call, as multi-step scheduling in servers); 1 "
    "(default): a call per token.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", None,
    "Prompt positions per prefill chunk (each chunk runs that many tokens of every "
    "sequence); 0: the whole prompt at once.")
_KERNELS = flags.DEFINE_enum(
    "kernels", None, ["auto", "xla", "pallas", "interpret"],
    "The grouped expert matmul and decode attention: auto (the Pallas kernels on GPU, XLA "
    "elsewhere), xla, pallas, interpret (the kernels through Pallas' interpreter).")
_CAPACITY = flags.DEFINE_float(
    "capacity_factor", None,
    "With --nodropless: send-buffer rows per destination device, relative to a balanced share.")
_DROPLESS = flags.DEFINE_bool(
    "dropless", None,
    "Worst-case static exchange buffers, nothing dropped (default); --nodropless: "
    "capacity_factor-sized buffers, overflow dropped and counted.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, prompts and sampling.")
_BATCH = flags.DEFINE_integer(
    "batch", None, "Sequences decoded together (default: generate and plan 8, rounded up to "
    "a batch the deployment splits; bench 1024, the seed's tokens per forward pass).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Tokens in each (random) prompt.")
_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens generated per sequence.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy; > 0 samples.")
_OUTPUT = flags.DEFINE_string("output", None,
                              "JSON file for the generated tokens ([batch][new tokens]) and "
                              "metrics; written only when the run succeeds.")
_PROFILE = flags.DEFINE_string("profile_dir", None,
                               "Write a jax.profiler trace of the decode steps here.")
_OVERLAP = flags.DEFINE_bool("xla_overlap", True,
                             "Turn on XLA's latency-hiding scheduler (async collectives "
                             "overlap compute on GPU; see jax_ep/runtime.py).")
_CHECK_MEMORY = flags.DEFINE_bool(
    "check_memory", True,
    "generate, bench: refuse a run whose planned bytes per device (jax_ep/memory.py) exceed "
    "the device's memory, before allocating; --nocheck_memory runs it anyway.")
_CHECK_NUMERICS = flags.DEFINE_bool(
    "check_numerics", False,
    "generate: report every layer's non-finite outputs from inside the compiled programs and "
    "fail naming the first layer whose output was NaN or infinite (slower; off by default).")
_SKIP_UNFIT = flags.DEFINE_bool(
    "skip_unfit", False,
    "bench: skip the deployments that cannot run here (devices, batch, memory) and run the "
    "rest; without it any such deployment is an error.")
_DEVICES = flags.DEFINE_integer(
    "devices", None, "plan: devices to plan for (default: the preset's own count; for single, "
    "baseline or proposed 8); bench: use the first N devices (default: all).")
_DEVICE_KIND = flags.DEFINE_string(
    "device_kind", "h100", "plan: the device whose memory to plan against: cpu (this host) or "
    "one of h100, h200, a100 (80 GB), a100_40, a100_80.")
_MEM_FRACTION = flags.DEFINE_float(
    "mem_fraction", None, "plan: share of a GPU's memory jax's allocator takes (default: "
    "$XLA_PYTHON_CLIENT_MEM_FRACTION, else jax's 0.75).")
_COMPILE = flags.DEFINE_bool(
    "compile", False, "plan: also compile generate's prefill and decode programs from shapes on "
    "N simulated CPU devices (nothing is allocated) and print XLA's bytes per device.")

# DeploymentConfig fields -> the flags that set them; ConfigError messages are rewritten
# with these, so they name what the user typed (--expert_axis, not DeploymentConfig.expert).
FLAG_OF_FIELD = {"stages": "stages", "expert": "expert_axis", "tp": "tp",
                 "placement": "placement", "microbatches": "microbatches",
                 "decode_groups": "decode_groups", "prefill_chunk": "prefill_chunk",
                 "kernels": "kernels", "capacity_factor": "capacity_factor",
                 "dropless": "dropless", "batch": "batch", "max_new_tokens": "max_new_tokens",
                 "temperature": "temperature"}
# Fields also rewritten where a message names them bare ("batch=6 is not divisible");
# placement= and microbatches= also appear in DeploymentConfig.describe(), kept as is.
_BARE_FIELDS = ("stages", "tp", "decode_groups", "prefill_chunk", "capacity_factor", "batch",
                "max_new_tokens", "temperature")


def flag_message(message: str) -> str:
  """A library message with config fields written as the CLI flags that set them."""
  def sub(m):
    return f"--{FLAG_OF_FIELD[m.group(2)]}="

  fields = "|".join(sorted(FLAG_OF_FIELD, key=len, reverse=True))
  message = re.sub(rf"(DeploymentConfig\.)({fields})=", sub, message)
  bare = "|".join(sorted(_BARE_FIELDS, key=len, reverse=True))
  return re.sub(rf"(?<![\w.-])()({bare})=", sub, message)

# --- multi-process (jax_ep/distributed.py; launch/ has SLURM, mpirun and local launchers) ---
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0's jax.distributed coordinator, for a run over several processes "
    "(else JAX_EP_COORDINATOR, or found from SLURM / Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes of a multi-process run (else JAX_EP_NUM_PROCESSES, "
    "SLURM_NTASKS, OMPI_COMM_WORLD_SIZE; 1 when none is set).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process, 0..num_processes-1 (else JAX_EP_PROCESS_ID, "
    "SLURM_PROCID, OMPI_COMM_WORLD_RANK).")
_DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds for all processes to join (and to agree on the "
    "run) before it fails with an error.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "generate: check everything, print which process and device holds which "
    "layers, experts, heads, vocabulary columns and batch rows, and exit without compiling.")


def _setup_processes(command: str):
  """jax.distributed from the flags or environment, then the same flags on every process.

  Process 0 alone writes --output (so only it checks the directory: _check_flags).
  """
  args = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if distributed.resolve(*args).process_id != 0:
    logging.set_verbosity(logging.WARNING)  # process 0 logs; the others only warn and fail
  distributed.initialize(*args, timeout_s=_DIST_TIMEOUT.value)
  values = {f"--{f.name}": f.value for f in flags.FLAGS.get_flags_for_module(__name__)
            if f.name != "process_id"}
  distributed.check_same("flags", {"command": command, **values, **distributed.versions()},
                         _DIST_TIMEOUT.value)


def _say(message: str):
  """Progress and results: printed by process 0 only."""
  if distributed.is_primary():
    print(message, flush=True)

# --- checkpoints, train, import-hf, export-hf (jax_ep/checkpoint.py, train.py, hf.py) ------
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None,
    "generate, bench, export-hf: a checkpoint directory (what train or import-hf wrote as "
    "--workdir); its latest step's weights are laid out on the deployment, and its model "
    "config is used (--config, if given, must name the same model).")
_WORKDIR = flags.DEFINE_string("workdir", None, "train: checkpoints go here, and a run found "
                               "here is resumed; import-hf: the checkpoint to write.")
_STEPS = flags.DEFINE_integer("steps", 200, "train: optimizer steps in all (a resumed run "
                              "continues to this many); bench: decode steps timed back to "
                              "back, TPOT is their mean (default 20 on GPU, 4 on CPU).")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 50, "train: checkpoint every N steps (and at "
                                   "the end); 0: only at the end.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-2, "train: AdamW's peak learning rate "
                                    "(warm-up, then cosine decay to a tenth of it).")
_TASK = flags.DEFINE_enum("task", "reverse", ["reverse", "copy"],
                          "train: the digit task (jax_ep/tasks.py).")
_TASK_DIGITS = flags.DEFINE_integer("task_digits", 6, "train: digits in each task prompt.")
_SRC = flags.DEFINE_string("src", None, "import-hf: a Hugging Face Mixtral directory "
                           "(config.json and *.safetensors).")
_DST = flags.DEFINE_string("dst", None, "export-hf: the directory to write (config.json and "
                           "safetensors shards); must not exist or be empty.")


def _need(*flag_holders):
  for f in flag_holders:
    if not f.value:
      raise app.UsageError(f"--{f.name} is required here.")


def _train():
  import jax

  from configs import load_model
  from jax_ep import tasks, train
  from jax_ep.config import ConfigError

  _need(_WORKDIR)
  cfg = load_model(_CONFIG.value)
  tc = train.TrainConfig(steps=_STEPS.value, batch=_BATCH.value or train.TrainConfig.batch,
                         learning_rate=_LEARNING_RATE.value, seed=_SEED.value,
                         task=tasks.Task(_TASK.value, _TASK_DIGITS.value))
  if _SAVE_EVERY.value < 0:
    raise ConfigError(f"--save_every={_SAVE_EVERY.value} must be >= 0 (0: only at the end).")
  print(f"train {_CONFIG.value} ({cfg.num_layers} layers x {cfg.num_experts} experts, top-"
        f"{cfg.top_k}, {cfg.dtype}) on {tc.task.name} of {tc.task.digits} digits: {tc.steps} "
        f"steps of {tc.batch}, on {jax.devices()[0]}; checkpoints in {_WORKDIR.value}",
        flush=True)
  result = train.run(cfg, tc, _WORKDIR.value, save_every=_SAVE_EVERY.value,
                     log=lambda m: print("  " + m, flush=True))
  print(f"  done in {result.seconds:.1f} s; `jax-ep generate --checkpoint={_WORKDIR.value}` "
        "decodes the task on any deployment")
  return 0


def _import_hf():
  from jax_ep import hf

  _need(_SRC, _WORKDIR)
  cfg = hf.import_hf(_SRC.value, _WORKDIR.value)
  print(f"imported {_SRC.value}: {cfg.num_layers} layers x {cfg.num_experts} experts "
        f"(top-{cfg.top_k}), D={cfg.model_dim}, F={cfg.mlp_dim}, V={cfg.vocab_size}, "
        f"{cfg.dtype} -> checkpoint {_WORKDIR.value}")
  return 0


def _export_hf():
  from jax_ep import hf

  _need(_CHECKPOINT, _DST)
  for path in hf.export_hf(_CHECKPOINT.value, _DST.value):
    print(f"wrote {path}")
  return 0

# --- bench and predict (jax_ep/perf/: runner.py, report.py, tables.py) -------------------
_KINDS = flags.DEFINE_list(
    "kinds", None, "bench: deployments (default single, baseline, proposed: the seed's "
    "preset, or the scaled one for the devices present), preset names, mesh:SxExT, or seed "
    "slices (slice_1x4, slice_2x2, slice_4x2: their own model and batch); '/G' after any "
    "sets its decode groups in flight.")
_SHARE = flags.DEFINE_string(
    "share", None, "bench: also run one device's share of this deployment on one device: "
    "'proposed' (= seed_proposed: 1 layer, 1 expert, 64 sequences) or a tp=1 preset name.")
_SYNCED = flags.DEFINE_integer("synced", 5, "bench: decode steps before the timed ones, each "
                               "timed with a sync (median and p10-p90).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "bench: decode steps after the ring's fill, not "
                               "timed.")
_PROBE_MIB = flags.DEFINE_integer(
    "probe_mib", None, "bench: bandwidth probe size in MiB (default 4096 on GPU, 64 on CPU); "
    "the all_to_all probe moves 1/64 of it.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "bench: write seed_table.{json,md,png} here "
                               "(--output names the JSON instead).")
_HARDWARE = flags.DEFINE_enum("hardware", "h100", sorted(HARDWARE),
                              "predict: GPU kind of the prediction (jax_ep/perf/hardware.py).")
_CONTEXT_LEN = flags.DEFINE_integer(
    "context_len", 128, "predict: KV cache positions each step reads. The seed does not say; "
    "128 keeps the step weight-bound as its text implies.")
_CALIBRATION = flags.DEFINE_string(
    "calibration", None, "predict: a bench results JSON (jax-ep bench --out_dir): fit the "
    "efficiency factors to its runs before predicting.")
_PLOT = flags.DEFINE_string("plot", None, "predict: write the EP scaling curve (1 to 256 GPUs) "
                            "to this PNG.")


def _bench():
  """The side-by-side run (jax_ep/perf/runner.py). Unset, --config, --prompt_len and --steps
  take the platform's defaults (BenchSpec: the seed on GPU, tiny on CPU); --max_new_tokens
  sets the steps (the ring's fill, --warmup and --synced steps, the rest timed back to
  back); --checkpoint: the model and weights of a checkpoint instead of random ones. Mesh
  flags are ignored, with a warning (--kinds=mesh:SxExT/G runs any mesh)."""
  from jax_ep.config import ConfigError
  from jax_ep.perf import report, runner

  f = flags.FLAGS
  ignored = [n for n in ("deployment", "stages", "expert_axis", "tp", "placement",
                         "microbatches", "decode_groups", "prefill_chunk", "kernels",
                         "capacity_factor", "dropless", "temperature", "profile_dir",
                         "check_numerics")
             if f[n].present]
  if ignored:
    print(f"jax-ep bench ignores {', '.join('--' + n for n in ignored)}: it runs the single, "
          "baseline and proposed presets for the devices present, or --kinds; for other "
          "meshes use --kinds=mesh:SxExT/G.", flush=True)
  if _STEPS.present and _NEW.present:
    raise ConfigError("--steps and --max_new_tokens both set bench's timed steps: give one.")
  steps = _STEPS.value if _STEPS.present else None
  if _NEW.present:
    fixed = 2 + _WARMUP.value + _SYNCED.value  # prefill's token, the fill, warm-up, synced
    steps = max(1, _NEW.value - fixed)
  config = _CONFIG.value if _CONFIG.present else None
  spec = runner.BenchSpec(
      config=f"checkpoint:{_CHECKPOINT.value}" if _CHECKPOINT.value else config,
      kinds=tuple(_KINDS.value) if _KINDS.value else runner.BenchSpec.kinds,
      share=_SHARE.value, batch=1024 if _BATCH.value is None else _BATCH.value,
      prompt_len=_PROMPT_LEN.value if _PROMPT_LEN.present else None, steps=steps,
      synced=_SYNCED.value, warmup=_WARMUP.value, num_devices=_DEVICES.value,
      seed=_SEED.value, probe_mib=_PROBE_MIB.value, checkpoint=_CHECKPOINT.value,
      tokens_per_call=_PER_CALL.value or 1, skip_unfit=_SKIP_UNFIT.value,
      check_memory=_CHECK_MEMORY.value)
  result = runner.run(spec, log=lambda m: print(m, flush=True))
  print(report.markdown(result))
  out_dir, stem = _OUT_DIR.value, "seed_table"
  if _OUTPUT.value:
    stem = os.path.splitext(os.path.basename(_OUTPUT.value))[0]
    out_dir = os.path.dirname(os.path.abspath(_OUTPUT.value))
  if out_dir:
    for path in report.write(result, out_dir, stem):
      print(f"wrote {path}")
  return 0


def _predict():
  """The seed's table, the term-by-term breakdown and, with --plot, the scaling curves
  (jax_ep/perf/tables.py); no device is used."""
  from jax_ep.perf import tables

  batch = 1024 if _BATCH.value is None else _BATCH.value
  print(tables.report(_HARDWARE.value, batch, _CONTEXT_LEN.value, _CALIBRATION.value,
                      _PLOT.value))
  return 0


def _checkpoint_model():
  """(config, trained task or None) for generate: the checkpoint's, or the --config preset."""
  from configs import load_model
  from jax_ep import evaluate

  if not _CHECKPOINT.value:
    return load_model(_CONFIG.value), None
  named = load_model(_CONFIG.value) if _CONFIG.present else None
  m = evaluate.open_model(_CHECKPOINT.value, named)
  print(f"checkpoint {_CHECKPOINT.value}: step {m.step}"
        + (f", trained on {m.task.name} of {m.task.digits} digits" if m.task else ""))
  return m.cfg, m.task


def _checkpoint_report(engine, params, prompts, answers, gen, seed):
  """For generate's report: the expert load of a random router on the same tokens, and the
  task accuracy (of a task model)."""
  from jax_ep import evaluate

  tokens = evaluate.routed_tokens(prompts, gen)
  out = {"random_load_max_mean": evaluate.random_router_imbalance(engine, tokens, seed)}
  if answers is not None:
    out["task_accuracy"] = evaluate.accuracy(gen, answers)
  return out


def _deployment(num_devices: int):
  dep = deployments.resolve(_DEPLOYMENT.value, num_devices)
  overrides = {"stages": _STAGES.value, "expert": _EXPERT.value, "tp": _TP.value,
               "placement": _PLACEMENT.value, "microbatches": _MICRO.value,
               "decode_groups": _GROUPS.value, "tokens_per_call": _PER_CALL.value,
               "prefill_chunk": _PREFILL_CHUNK.value,
               "kernels": _KERNELS.value, "capacity_factor": _CAPACITY.value,
               "dropless": _DROPLESS.value}
  return dataclasses.replace(dep, **{k: v for k, v in overrides.items() if v is not None})


def _check_flags():
  """What can be wrong with the flags alone, before any device or compile."""
  from jax_ep.config import ConfigError
  from jax_ep.output import check_output_path

  if _SIMULATE.value < -1:
    runtime.simulate_devices(_SIMULATE.value)  # raises, saying what to use
  for flag in (_BATCH, _PROMPT_LEN, _NEW, _DEVICES):
    if flag.value is not None and flag.value < 1:
      raise ConfigError(f"--{flag.name}={flag.value} must be a positive integer.")
  if distributed.resolve(_COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value).process_id == 0:  # only process 0 writes it
    check_output_path(_OUTPUT.value)


def _batch(dep) -> int:
  return dep.default_batch(8) if _BATCH.value is None else _BATCH.value


def _memory_candidates(cfg):
  """Presets (not the seed slices: they have their own models) that could serve `cfg`."""
  return {k: d for k, d in deployments.PRESETS.items() if k not in deployments.SLICES}


def _generate(profile_dir):
  import jax
  import numpy as np

  from jax_ep import decode, memory, numerics, placement
  from jax_ep.engine import Engine

  cfg, task = _checkpoint_model()
  dep = _deployment(len(jax.devices()))
  logging.info("process %d of %d, %d devices (%s)", jax.process_index(), jax.process_count(),
               len(jax.devices()), jax.devices()[0].platform)
  name = "(checkpoint)" if _CHECKPOINT.value else _CONFIG.value
  _say(f"model {name}: {cfg.num_layers} layers x {cfg.num_experts} experts, "
       f"top-{cfg.top_k}, {cfg.dtype}; deployment {dep.describe()}")
  watch = numerics.LayerWatch() if _CHECK_NUMERICS.value else None
  engine = Engine(cfg, dep, watch=watch)
  batch, new, answers = _batch(dep), _NEW.value, None
  if task is not None:  # held-out task prompts; the answer's length is the task's
    prompts, answers = task.eval_set(_SEED.value, batch)
    new = task.digits
    if _PROMPT_LEN.present or _NEW.present:
      _say(f"  --prompt_len and --max_new_tokens are ignored: the prompts are the task's "
           f"({prompts.shape[1]} tokens), the answers {new} tokens")
  else:
    prompts = np.random.RandomState(_SEED.value).randint(0, cfg.vocab_size,
                                                         (batch, _PROMPT_LEN.value))
  max_len = min(cfg.max_seq_len, prompts.shape[1] + new)
  # Everything that can be wrong with the request is checked before anything compiles.
  decode.check_request(engine, prompts, new, _TEMPERATURE.value, max_len)
  if _CHECK_MEMORY.value:
    platform = jax.devices()[0].platform
    fp = memory.footprint(cfg, dep, len(prompts), prompts.shape[1], max_len, platform)
    memory.check(fp, memory.budget_for_devices(jax.devices()[:dep.num_devices]),
                 candidates=_memory_candidates(cfg), platform=platform,
                 what=f"generate --config={name}")
  distributed.check_same("run", distributed.fields(model=cfg, deployment=dep, prompts=prompts),
                         _DIST_TIMEOUT.value)
  if _DRY_RUN.value:
    _say(placement.format_table(cfg, dep, placement.rows(cfg, dep, jax.devices(), len(prompts))))
    return cfg, dep, None, {}
  if _CHECKPOINT.value:
    from jax_ep import checkpoint

    params = checkpoint.restore(_CHECKPOINT.value, engine)
  else:
    params = engine.init_params(_SEED.value)
  numerics.check_finite(params, "weights")
  profile_dir = profile_dir if distributed.is_primary() else None
  if profile_dir:
    jax.profiler.start_trace(profile_dir)
  try:
    gen = decode.generate(engine, params, prompts, new, temperature=_TEMPERATURE.value,
                          seed=_SEED.value, max_len=max_len, synced_steps=max(new // 4, 1),
                          log=lambda m: _say("  " + m))
  finally:
    if profile_dir:
      jax.profiler.stop_trace()
  if watch is not None:
    watch.check()
  extra = (_checkpoint_report(engine, params, prompts, answers, gen, _SEED.value)
           if _CHECKPOINT.value else {})
  return cfg, dep, gen, extra


def _plan():
  """`jax-ep plan`: the memory table and the device holdings, without a GPU."""
  from configs import load_model
  from jax_ep import memory

  cfg = load_model(_CONFIG.value)
  base = deployments.with_groups(_DEPLOYMENT.value)[0]
  n = _DEVICES.value or (deployments.PRESETS[base].num_devices
                         if base in deployments.PRESETS else 8)
  dep = _deployment(n)
  if dep.num_devices > n:
    from jax_ep.config import ConfigError

    raise ConfigError(f"{dep.describe()} needs {dep.num_devices} devices; --devices={n}.")
  batch = _batch(dep)
  kind = _DEVICE_KIND.value.lower()
  platform = "cpu" if kind == "cpu" else "gpu"
  max_len = min(cfg.max_seq_len, _PROMPT_LEN.value + _NEW.value)  # as generate's
  fp = memory.footprint(cfg, dep, batch, _PROMPT_LEN.value, max_len, platform)
  budget = memory.budget_for_kind(kind, dep.num_devices, _MEM_FRACTION.value)
  print(f"model {_CONFIG.value}: {cfg.num_layers} layers x {cfg.num_experts} experts, "
        f"top-{cfg.top_k}, {cfg.dtype}; deployment {dep.describe()}; batch {batch}, prompt "
        f"{_PROMPT_LEN.value}, {_NEW.value} new tokens\n")
  print(memory.format_footprint(fp, budget))
  if not memory.fits(fp, budget):
    try:
      memory.check(fp, budget, candidates=_memory_candidates(cfg), platform=platform,
                   what="plan")
    except Exception as e:  # noqa: BLE001 - the advice, printed rather than raised
      print(flag_message(str(e)))
  print("\nWhich device holds what (ranges are inclusive):\n")
  print(memory.format_holdings(cfg, dep, batch))
  if _COMPILE.value:
    runtime.simulate_devices(dep.num_devices)
    from jax_ep.engine import Engine

    print(f"\nXLA's bytes per device, compiled for {dep.num_devices} simulated CPU devices "
          "(the CPU backend's buffer assignment; a GPU's differs):\n")
    for name, m in memory.compiled_memory(Engine(cfg, dep), batch, _PROMPT_LEN.value,
                                          max_len).items():
      print(f"  {name:<8} " + ", ".join(f"{k} {v / memory.GiB:.3f} GiB" for k, v in m.items()))
  return 0


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: jax-ep {{{','.join(COMMANDS)}}} [--flags]; see --help.")
  if _DRY_RUN.value and argv[1] != "generate":
    raise app.UsageError("--dry_run is for generate (jax-ep generate --dry_run).")
  _check_flags()
  if argv[1] == "plan":
    return _plan()
  if argv[1] == "predict":
    return _predict()
  runtime.simulate_devices(_SIMULATE.value)
  runtime.set_xla_flags(_OVERLAP.value)
  _setup_processes(argv[1])
  runtime.quiet_library_logs()
  if argv[1] == "bench":
    return _bench()
  if argv[1] != "generate":
    return {"train": _train, "import-hf": _import_hf, "export-hf": _export_hf}[argv[1]]()
  cfg, dep, gen, extra = _generate(_PROFILE.value)
  if gen is None or not distributed.is_primary():  # a dry run; or not process 0
    return 0
  load = gen.load_LxE
  imbalance = gen.imbalance
  load_row = f"{imbalance:.2f}" + (f" (random router: {extra['random_load_max_mean']:.2f})"
                                   if "random_load_max_mean" in extra else "")
  rows = [("deployment", dep.describe()), ("batch x new tokens", f"{gen.batch} x {gen.steps + 1}"),
          ("compile", f"{gen.compile_s:.2f} s"), ("prefill", f"{gen.prefill_s * 1e3:.1f} ms"),
          ("TPOT (back-to-back mean)", f"{gen.tpot_ms:.3f} ms"),
          ("TPOT (synced median)", f"{gen.tpot_synced_ms:.3f} ms"), ("TPS", f"{gen.tps:,.0f}"),
          ("decode groups in flight", gen.groups), ("expert load max/mean", load_row),
          ("experts given no token", f"{int((load == 0).sum(axis=1).max())} of "
           f"{load.shape[1]} (the worst layer)"),
          ("tokens dropped", f"{gen.dropped}" + ("" if dep.dropless else
                                                 f" (capacity factor {dep.capacity_factor})"))]
  if "task_accuracy" in extra:
    rows.append(("task accuracy (exact match)", f"{extra['task_accuracy']:.3f}"))
  for k, v in rows:
    print(f"  {k:<28} {v}")
  print(f"  first sequence: {gen.tokens[0].tolist()}")
  if _OUTPUT.value:
    from jax_ep.output import write_json

    write_json(_OUTPUT.value, {
        "tokens": gen.tokens.tolist(), "config": dataclasses.asdict(cfg),
        "deployment": dataclasses.asdict(dep), "tps": gen.tps, "tpot_ms": gen.tpot_ms,
        "tpot_synced_ms": gen.tpot_synced_ms, "compile_s": gen.compile_s,
        "prefill_s": gen.prefill_s, "step_s": gen.step_s, "load_LxE": load.tolist(),
        "dropped": gen.dropped, "groups": gen.groups, "load_max_mean": imbalance,
        **extra})
    print(f"  wrote {_OUTPUT.value}")
  return 0


HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")


def print_help() -> None:
  """The commands and every flag of jax-ep (absl's --help lists the flags of the calling
  module only: none for the console script, and exits 1)."""
  print(__doc__)
  print(flags.FLAGS.module_help(sys.modules[__name__]))


def run():
  """Console-script entry point."""
  from jax_ep.config import ConfigError

  if any(a in HELP_FLAGS for a in sys.argv[1:]):
    print_help()
    sys.exit(0)
  try:
    app.run(main)
  except ConfigError as e:
    print(f"jax-ep: error: {flag_message(str(e))}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
