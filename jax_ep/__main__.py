"""The jax-ep command line: `jax-ep generate|bench|train|import-hf|export-hf [--flags]`
(also `python -m jax_ep`).

A thin shell: flags become configs once, here; the work is library calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

from absl import app, flags, logging

from jax_ep import runtime

COMMANDS = ("generate", "bench", "train", "import-hf", "export-hf")

_CONFIG = flags.DEFINE_string("config", "tiny", "Model preset: a file in configs/ (tiny, "
                              "tiny_e64, tiny_swiglu, seed, seed_e64, seed_swiglu, "
                              "seed_slice_1x4, seed_slice_2x2, seed_slice_4x2).")
_DEPLOYMENT = flags.DEFINE_string(
    "deployment", "proposed",
    "single, baseline or proposed (the preset for the device count), or a preset name from "
    "configs/deployments.py (seed_proposed, seed_proposed_tp2, seed_proposed_e64, "
    "seed_baseline, proposed_8, baseline_8, ...).")
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
_BATCH = flags.DEFINE_integer("batch", None, "Sequences decoded together (default: 8 for "
                              "generate; 1024 for bench, the seed's tokens per forward pass).")
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

# --- checkpoints, train, import-hf, export-hf (jax_ep/checkpoint.py, train.py, hf.py) ------
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None,
    "generate, bench, export-hf: a checkpoint directory (what train or import-hf wrote as "
    "--workdir); its latest step's weights are laid out on the deployment, and its model "
    "config is used (--config, if given, must name the same model).")
_WORKDIR = flags.DEFINE_string("workdir", None, "train: checkpoints go here, and a run found "
                               "here is resumed; import-hf: the checkpoint to write.")
_STEPS = flags.DEFINE_integer("steps", 200, "train: optimizer steps in all (a resumed run "
                              "continues to this many).")
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
  from configs import deployments

  dep = deployments.resolve(_DEPLOYMENT.value, num_devices)
  overrides = {"stages": _STAGES.value, "expert": _EXPERT.value, "tp": _TP.value,
               "placement": _PLACEMENT.value, "microbatches": _MICRO.value,
               "decode_groups": _GROUPS.value, "prefill_chunk": _PREFILL_CHUNK.value,
               "kernels": _KERNELS.value, "capacity_factor": _CAPACITY.value,
               "dropless": _DROPLESS.value}
  return dataclasses.replace(dep, **{k: v for k, v in overrides.items() if v is not None})


def _check_output_path(path):
  if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    raise app.UsageError(f"--output={path}: directory {os.path.dirname(path)!r} does not exist.")


def _write_json(path, payload):
  """Atomic: a temporary file in the same directory, renamed over the target."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(payload, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _generate(profile_dir):
  import jax
  import numpy as np

  from jax_ep import decode
  from jax_ep.config import ConfigError
  from jax_ep.engine import Engine

  for flag in (_BATCH, _PROMPT_LEN, _NEW):
    if flag.value is not None and flag.value < 1:
      raise ConfigError(f"--{flag.name}={flag.value} must be a positive integer.")
  cfg, task = _checkpoint_model()
  dep = _deployment(len(jax.devices()))
  logging.info("process %d of %d, %d devices (%s)", jax.process_index(), jax.process_count(),
               len(jax.devices()), jax.devices()[0].platform)
  name = "(checkpoint)" if _CHECKPOINT.value else _CONFIG.value
  print(f"model {name}: {cfg.num_layers} layers x {cfg.num_experts} experts, "
        f"top-{cfg.top_k}, {cfg.dtype}; deployment {dep.describe()}", flush=True)
  engine = Engine(cfg, dep)
  batch, new, answers = 8 if _BATCH.value is None else _BATCH.value, _NEW.value, None
  if task is not None:  # held-out task prompts; the answer's length is the task's
    prompts, answers = task.eval_set(_SEED.value, batch)
    new = task.digits
    if _PROMPT_LEN.present or _NEW.present:
      print(f"  --prompt_len and --max_new_tokens are ignored: the prompts are the task's "
            f"({prompts.shape[1]} tokens), the answers {new} tokens")
  else:
    prompts = np.random.RandomState(_SEED.value).randint(0, cfg.vocab_size,
                                                         (batch, _PROMPT_LEN.value))
  max_len = min(cfg.max_seq_len, prompts.shape[1] + new)
  # Everything that can be wrong with the request is checked before anything compiles.
  decode.check_request(engine, prompts, new, _TEMPERATURE.value, max_len)
  if _CHECKPOINT.value:
    from jax_ep import checkpoint

    params = checkpoint.restore(_CHECKPOINT.value, engine)
  else:
    params = engine.init_params(_SEED.value)
  if profile_dir:
    jax.profiler.start_trace(profile_dir)
  try:
    gen = decode.generate(engine, params, prompts, new, temperature=_TEMPERATURE.value,
                          seed=_SEED.value, max_len=max_len, synced_steps=max(new // 4, 1),
                          log=lambda m: print("  " + m, flush=True))
  finally:
    if profile_dir:
      jax.profiler.stop_trace()
  extra = (_checkpoint_report(engine, params, prompts, answers, gen, _SEED.value)
           if _CHECKPOINT.value else {})
  return cfg, dep, gen, extra


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: jax-ep {{{','.join(COMMANDS)}}} [--flags]; see --help.")
  _check_output_path(_OUTPUT.value)
  runtime.simulate_devices(_SIMULATE.value)
  runtime.set_xla_flags(_OVERLAP.value)
  runtime.quiet_library_logs()
  if argv[1] == "bench":
    from jax_ep import bench

    return bench.main_from_flags()
  if argv[1] != "generate":
    return {"train": _train, "import-hf": _import_hf, "export-hf": _export_hf}[argv[1]]()
  cfg, dep, gen, extra = _generate(_PROFILE.value)
  load = gen.load_LxE
  imbalance = gen.imbalance
  load_row = f"{imbalance:.2f}" + (f" (random router: {extra['random_load_max_mean']:.2f})"
                                   if "random_load_max_mean" in extra else "")
  rows = [("deployment", dep.describe()), ("batch x new tokens", f"{gen.batch} x {gen.steps + 1}"),
          ("compile", f"{gen.compile_s:.2f} s"), ("prefill", f"{gen.prefill_s * 1e3:.1f} ms"),
          ("TPOT (back-to-back mean)", f"{gen.tpot_ms:.3f} ms"),
          ("TPOT (synced median)", f"{gen.tpot_synced_ms:.3f} ms"), ("TPS", f"{gen.tps:,.0f}"),
          ("decode groups in flight", gen.groups), ("expert load max/mean", load_row),
          ("tokens dropped", gen.dropped)]
  if "task_accuracy" in extra:
    rows.append(("task accuracy (exact match)", f"{extra['task_accuracy']:.3f}"))
  for k, v in rows:
    print(f"  {k:<28} {v}")
  print(f"  first sequence: {gen.tokens[0].tolist()}")
  if _OUTPUT.value:
    _write_json(_OUTPUT.value, {
        "tokens": gen.tokens.tolist(), "config": dataclasses.asdict(cfg),
        "deployment": dataclasses.asdict(dep), "tps": gen.tps, "tpot_ms": gen.tpot_ms,
        "tpot_synced_ms": gen.tpot_synced_ms, "compile_s": gen.compile_s,
        "prefill_s": gen.prefill_s, "step_s": gen.step_s, "load_LxE": load.tolist(),
        "dropped": gen.dropped, "groups": gen.groups, "load_max_mean": imbalance,
        **extra})
    print(f"  wrote {_OUTPUT.value}")
  return 0


def run():
  """Console-script entry point."""
  from jax_ep.config import ConfigError

  try:
    app.run(main)
  except ConfigError as e:
    print(f"jax-ep: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
