"""The jax-ep command line's flags, every one defined here once, whichever commands read it
(`jax-ep --help` lists this module's flags; a run over several processes checks that each
was given the same values); the configs the flags select; library messages rewritten to
name the flags that set the fields they name.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys

from absl import app, flags

from jax_ep.config import ConfigError
from jax_ep.kernels import groups
from jax_ep.perf import hardware
from jax_ep.presets import deployments, load_model, model_names

# --- the model, the deployment and the run (generate, bench, plan) ------------------------
CONFIG = flags.DEFINE_string("config", "tiny", "Model preset, a file in configs/: "
                             f"{', '.join(model_names())}.")
DEPLOYMENT = flags.DEFINE_string(
    "deployment", "proposed",
    "single, baseline or proposed (the preset for the device count), mesh:SxExT (stages x "
    "experts x tp, any shape), or a preset from configs/deployments.py: "
    f"{', '.join(sorted(deployments.PRESETS))}; '/G' after any sets its decode groups in "
    "flight.")
SIMULATE = flags.DEFINE_integer(
    "simulate_devices", -1,
    "Run on the CPU with N fake devices. -1 (default): the real GPUs when a GPU plugin is "
    "installed, else N of XLA_FLAGS=--xla_force_host_platform_device_count=N where set, "
    "or 8. 0: the real devices as they are.")
STAGES = flags.DEFINE_integer("stages", None, "Override the preset's pipeline stages.")
EXPERT = flags.DEFINE_integer("expert_axis", None, "Override the preset's expert axis size.")
TP = flags.DEFINE_integer("tp", None, "Override the preset's tensor-parallel size.")
PLACEMENT = flags.DEFINE_enum("placement", None, ["ep", "tp"],
                              "Override expert placement: ep = whole experts spread over "
                              "expert x tp; tp = each expert's MLP split over tp.")
MICRO = flags.DEFINE_integer("microbatches", None, "Override prefill's pipeline micro-batches.")
GROUPS = flags.DEFINE_integer(
    "decode_groups", None,
    "Decode groups in flight on the ring of stages (jax_ep/ring.py): G >= stages keeps every "
    "stage busy; 1 is one batch in flight; 0 (the presets): one per stage.")
PER_CALL = flags.DEFINE_integer(
    "tokens_per_call", None,
    "Tokens per sequence that one decode call generates (a loop of static trip count on "
    "the device, one host dispatch per call, as multi-step scheduling in servers); 1 (every "
    "preset's): a call per token.")
PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", None,
    "Prompt positions per prefill chunk (each chunk runs that many tokens of every "
    "sequence); 0 (every preset's): as many positions as keep a chunk within 32768 rows of the "
    "expert kernel's buffer per device (decode.PREFILL_ROWS_PER_DEVICE).")
KERNELS = flags.DEFINE_enum(
    "kernels", None, ["auto", "xla", "pallas", "interpret"],
    "The grouped expert matmul and decode attention: auto (the Pallas kernels on GPU, XLA "
    "elsewhere), xla, pallas, interpret (the kernels through Pallas' interpreter).")
EXPERT_BLOCKS = flags.DEFINE_string(
    "expert_blocks", None,
    "Change the grouped expert kernel's tile sizes (jax_ep/kernels/groups.py Blocks; "
    "benchmarks/NOTES.md has what each measured), as FIELD=VALUE pairs, comma-separated: "
    "'up.' or 'down.' before a field names one product of the expert MLP, none both; e.g. "
    "'up.tail_m=16,down.num_stages=3'. Fields: block_m, block_n, block_k, num_warps, "
    "num_stages, last_m, tail_m. The Pallas kernels only (--kernels).")


def _check_expert_blocks(spec: str | None) -> bool:
  """--expert_blocks parses (kernels/groups.py); the model-dependent checks come later."""
  try:
    groups.parse_blocks(spec or "")
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


flags.register_validator("expert_blocks", _check_expert_blocks)
CAPACITY = flags.DEFINE_float(
    "capacity_factor", None,
    "With --nodropless: send-buffer rows per destination device, relative to a balanced share.")
DROPLESS = flags.DEFINE_bool(
    "dropless", None,
    "Worst-case static exchange buffers, nothing dropped (every preset's); --nodropless: "
    "capacity_factor-sized buffers, overflow dropped and counted.")
SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, prompts and sampling.")
BATCH = flags.DEFINE_integer(
    "batch", None, "generate, plan: sequences decoded together; bench, predict: sequences "
    "decoded together, the seed's tokens per forward pass by default; train: sequences a "
    "training step.")
PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Tokens in each (random) prompt.")
NEW = flags.DEFINE_integer("max_new_tokens", 16, "generate, plan: tokens generated per "
                           "sequence; bench: tokens generated per sequence, setting the timed "
                           "steps instead of --steps, after the fill, --warmup and --synced "
                           "steps.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy; > 0 samples.")
OUTPUT = flags.DEFINE_string("output", None,
                             "Written only when the run succeeds; generate: a JSON file "
                             "of the generated tokens ([batch][new tokens]) and the metrics; "
                             "bench: the results JSON (the table beside it).")
PROFILE = flags.DEFINE_string("profile_dir", None,
                              "Write a jax.profiler trace of the decode steps timed back to back "
                              "here (not the compiles, the prefill or the synced steps).")
OVERLAP = flags.DEFINE_bool("xla_overlap", True,
                            "Turn on XLA's latency-hiding scheduler (async collectives "
                            "overlap compute on GPU; see jax_ep/runtime.py).")
CHECK_MEMORY = flags.DEFINE_bool(
    "check_memory", True,
    "generate, bench: refuse a run whose planned bytes per device (jax_ep/memory.py) "
    "exceed the device's memory, before allocating (--nocheck_memory runs it anyway); "
    "train: refuse a run whose bytes (jax_ep/train.py's lower bound) exceed the device's "
    "memory, before allocating (--nocheck_memory runs it anyway).")
CHECK_NUMERICS = flags.DEFINE_bool(
    "check_numerics", False,
    "generate: report every layer's non-finite outputs from inside the compiled programs and "
    "fail naming the first layer whose output was NaN or infinite (slower; off by default).")
SKIP_UNFIT = flags.DEFINE_bool(
    "skip_unfit", False,
    "bench: skip the deployments that cannot run here (devices, batch, memory) and run the "
    "rest; without it any such deployment is an error.")
DEVICES = flags.DEFINE_integer(
    "devices", None, "plan: devices to plan for; bench: use the first N devices.")
DEVICE_KIND = flags.DEFINE_string(
    "device_kind", "h100", "plan: the device whose memory to plan against: cpu (this host) or "
    "one of h100, h200, a100 (80 GB), a100_40, a100_80.")
MEM_FRACTION = flags.DEFINE_float(
    "mem_fraction", None, "plan: share of a GPU's memory jax's allocator takes.")
COMPILE = flags.DEFINE_bool(
    "compile", False, "plan: also compile generate's prefill and decode programs from shapes on "
    "N simulated CPU devices (nothing is allocated) and print XLA's bytes per device.")

# --- multi-process (jax_ep/distributed.py; launch/ has SLURM, mpirun and local launchers) ---
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0's jax.distributed coordinator, for a run over several processes "
    "(else JAX_EP_COORDINATOR, or found from SLURM / Open MPI).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes of a multi-process run (else JAX_EP_NUM_PROCESSES, "
    "SLURM_NTASKS, OMPI_COMM_WORLD_SIZE; 1 when none is set).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process, 0..num_processes-1 (else JAX_EP_PROCESS_ID, "
    "SLURM_PROCID, OMPI_COMM_WORLD_RANK).")
DIST_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_s", 300, "Seconds for all processes to join (and to agree on the "
    "run) before it fails with an error.")
DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "generate: check everything, print which process and device holds which "
    "layers, experts, heads, vocabulary columns and batch rows, and whether the run fits "
    "these devices' memory (a layout that does not fit is still printed), and exit without "
    "compiling: status 0 where the run would fit, 1 where it would be refused (as plan).")

# --- checkpoints, train, import-hf, export-hf (jax_ep/checkpoint.py, train.py, hf.py) ------
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None,
    "A checkpoint directory (what train or import-hf wrote as --workdir), its latest "
    "step; generate, bench: its weights are laid out on the deployment, and its model "
    "config is used (--config, if given, must name the same model); export-hf: the model "
    "and weights to write.")
WORKDIR = flags.DEFINE_string("workdir", None, "train: checkpoints go here, and a run found "
                              "here is resumed; import-hf: the checkpoint to write.")
STEPS = flags.DEFINE_integer("steps", 200, "train: optimizer steps in all (the learning-rate "
                             "schedule spans them: a run in --workdir resumes only with the "
                             "--steps it started with; to train longer use a fresh --workdir); "
                             "bench: decode steps timed back to back, TPOT is their mean.")
SAVE_EVERY = flags.DEFINE_integer("save_every", 50, "train: checkpoint every N steps (and at "
                                  "the end); 0: only at the end.")
LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-2, "train: AdamW's peak learning rate "
                                   "(warm-up, then cosine decay to a tenth of it).")
TASK = flags.DEFINE_enum("task", "reverse", ["reverse", "copy"],
                         "train: the digit task (jax_ep/tasks.py).")
TASK_DIGITS = flags.DEFINE_integer("task_digits", 6, "train: digits in each task prompt.")
SRC = flags.DEFINE_string("src", None, "import-hf: a Hugging Face Mixtral directory "
                          "(config.json and *.safetensors).")
DST = flags.DEFINE_string("dst", None, "export-hf: the directory to write (config.json and "
                          "safetensors shards); must not exist or be empty.")

# --- bench and predict (jax_ep/perf/: runner.py, report.py, tables.py) -------------------
KINDS = flags.DEFINE_list(
    "kinds", None, "bench: deployments (baseline and proposed: the seed's preset, or the "
    "scaled one for the devices present), preset names, mesh:SxExT, or seed "
    "slices (slice_1x4, slice_2x2, slice_4x2: their own model and batch); '/G' after any "
    "sets its decode groups in flight. Each model's deployments run the one with the most "
    "devices first (it creates the weights the others are laid out from).")
SHARE = flags.DEFINE_string(
    "share", None, "bench: also run one device's share of one decode group of this "
    "deployment, on one device: 'proposed/G' (= seed_proposed/G) or a tp=1 preset, /G "
    "optional. seed_proposed/1 (one group of 1024): 1 layer, 1 expert, 64 sequences, and its "
    "2048 of the 32768 vocabulary columns on its stage's 1024 rows; seed_proposed (its ring "
    "of 4 groups of 256): 16 sequences, 256 rows.")
SYNCED = flags.DEFINE_integer("synced", 5, "bench: decode steps before the timed ones, each "
                              "timed with a sync (median and p10-p90).")
WARMUP = flags.DEFINE_integer("warmup", 1, "bench: decode steps after the ring's fill, not "
                              "timed.")
PROBE_MIB = flags.DEFINE_integer(
    "probe_mib", None, "bench: bandwidth probe size in MiB; the all_to_all probe moves 1/64 of "
    "it.")
OUT_DIR = flags.DEFINE_string("out_dir", None, "bench: write seed_table.{json,md,png} here "
                              "(--output names the JSON instead).")
HARDWARE = flags.DEFINE_enum("hardware", "h100", sorted(hardware.HARDWARE),
                             "predict: GPU kind of the prediction (jax_ep/perf/hardware.py): "
                             "h100 at its datasheet's rates, h200 at rates measured on one "
                             "H200 (lower), so the two do not compare the GPU kinds.")
CONTEXT_LEN = flags.DEFINE_integer(
    "context_len", 128, "predict: KV cache positions each step reads. The seed does not say; "
    "128 keeps the step weight-bound as its text implies.")
CALIBRATION = flags.DEFINE_string(
    "calibration", None, "predict: a bench results JSON (jax-ep bench --out_dir): fit the "
    "efficiency factors to its runs before predicting.")
PLOT = flags.DEFINE_string("plot", None, "predict: write the EP scaling curve (1 to 256 GPUs) "
                           "to this PNG.")

# DeploymentConfig fields -> the flags that set them; ConfigError messages are rewritten
# with these, so they name what the user typed (--expert_axis, not DeploymentConfig.expert).
FLAG_OF_FIELD = {"stages": "stages", "expert": "expert_axis", "tp": "tp",
                 "placement": "placement", "microbatches": "microbatches",
                 "decode_groups": "decode_groups", "tokens_per_call": "tokens_per_call",
                 "prefill_chunk": "prefill_chunk", "prompt_len": "prompt_len",
                 "kernels": "kernels", "expert_blocks": "expert_blocks",
                 "capacity_factor": "capacity_factor",
                 "dropless": "dropless", "batch": "batch", "max_new_tokens": "max_new_tokens",
                 "temperature": "temperature"}
# Fields also rewritten where a message names them bare ("batch=6 is not divisible");
# placement= and microbatches= also appear in DeploymentConfig.describe(), kept as is.
_BARE_FIELDS = ("stages", "tp", "decode_groups", "prefill_chunk", "capacity_factor", "batch",
                "max_new_tokens", "temperature", "prompt_len", "kernels")


def flag_message(message: str, reads: frozenset[str] | None = None) -> str:
  """A library message with config fields written as the CLI flags that set them; with
  `reads` (the flags of the command that failed) only as those, the others left as
  fields (bench sets its meshes by --kinds, not --stages)."""
  def sub(m):
    flag = FLAG_OF_FIELD[m.group(2)]
    if reads is not None and flag not in reads:
      return f"{m.group(2)}="
    return f"--{flag}="

  fields = "|".join(sorted(FLAG_OF_FIELD, key=len, reverse=True))
  message = re.sub(rf"(DeploymentConfig\.)({fields})=", sub, message)
  bare = "|".join(sorted(_BARE_FIELDS, key=len, reverse=True))
  return re.sub(rf"(?<![\w.-])()({bare})=", sub, message)


def note_unread_expert_blocks(dep, backend: str) -> None:
  """On stderr: --expert_blocks given where the experts run XLA's path (no kernel reads it)."""
  if EXPERT_BLOCKS.value and (dep.kernels == "xla" or (dep.kernels == "auto"
                                                       and backend != "gpu")):
    print(f"jax-ep: --expert_blocks={EXPERT_BLOCKS.value} is without effect: the experts run "
          f"XLA's path here (--kernels={dep.kernels} on {backend}); only the Pallas kernels "
          "read it (a GPU, or --kernels=interpret).", file=sys.stderr, flush=True)


def need(command: str, *flag_holders):
  """A usage error naming the flags of these that are not set, and all that `command`
  needs."""
  missing = [f"--{f.name}" for f in flag_holders if not f.value]
  if missing:
    every = " and ".join(f"--{f.name}" for f in flag_holders)
    raise app.UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         f"required here: jax-ep {command} needs {every}.")


def _overrides() -> dict:
  """DeploymentConfig field -> the flag that overrides the preset's (deployment_for)."""
  return {"stages": STAGES, "expert": EXPERT, "tp": TP, "placement": PLACEMENT,
          "microbatches": MICRO, "decode_groups": GROUPS, "tokens_per_call": PER_CALL,
          "prefill_chunk": PREFILL_CHUNK, "kernels": KERNELS, "expert_blocks": EXPERT_BLOCKS,
          "capacity_factor": CAPACITY, "dropless": DROPLESS}


def deployment_args() -> list[str]:
  """--deployment and the overrides given, as a command line of another jax-ep command
  that resolves the same deployment would take them (shell-quoted)."""
  given = [DEPLOYMENT, *(f for f in _overrides().values() if f.present)]
  return [shlex.quote(f.serialize()) for f in given]


def deployment_for(num_devices: int, counts: str = deployments.RUN_ON):
  """The --deployment preset for `num_devices` devices with the mesh flags' overrides
  (`counts`: the advice where --deployment's kind has no preset for that many)."""
  dep = deployments.resolve(DEPLOYMENT.value, num_devices, counts)
  dep = dataclasses.replace(dep, **{k: f.value for k, f in _overrides().items()
                                    if f.value is not None})
  mesh_flags = (STAGES, EXPERT, TP, PLACEMENT, MICRO, GROUPS)
  dep = dataclasses.replace(dep, name=" ".join(
      [DEPLOYMENT.value] + [f"--{f.name}={f.value}" for f in mesh_flags if f.value is not None]))
  if CAPACITY.value is not None and dep.dropless:
    print(f"jax-ep: --capacity_factor={CAPACITY.value} is without effect: dropless buffers (the "
          "default) hold every pick; --nodropless sizes them by it.", file=sys.stderr, flush=True)
  return dep


def note_slice_model(models: list[str], model: str) -> None:
  """Says on stderr when --deployment is a seed slice's mesh and the run's model (`model`,
  equal to the presets `models`) is not that slice's model."""
  base = deployments.with_groups(DEPLOYMENT.value)[0]
  if base in deployments.SLICES and deployments.SLICES[base][0] not in models:
    print(f"jax-ep: --deployment={base} is the mesh of the seed slice "
          f"--config={deployments.SLICES[base][0]} (`jax-ep bench --kinds={base}` runs the "
          f"two together); this run lays out {model} on it.", file=sys.stderr, flush=True)


def check_model(cfg, dep, checkpoint: bool = False) -> None:
  """dep.check_model(cfg); its ConfigError also names the model presets `dep` lays out
  (or, for a `checkpoint`'s model, which no --config changes, that the deployment must)."""
  try:
    dep.check_model(cfg)
  except ConfigError as e:
    fit = []
    for name in model_names():
      try:
        dep.check_model(load_model(name))
        fit.append(name)
      except ConfigError:
        pass
    if checkpoint:
      hint = (" The checkpoint fixes the model: use a deployment that divides it "
              "(`jax-ep generate --help` lists them under --deployment).")
    else:
      hint = f" Model presets this deployment takes: --config={', '.join(fit)}." if fit else ""
    base = deployments.with_groups(DEPLOYMENT.value)[0] if DEPLOYMENT.present else ""
    if base.startswith("mesh:"):
      hint += (f" (--deployment={base}: its S, E and T are --stages, --expert_axis and "
               "--tp.)")
    raise ConfigError(f"{e}{hint}") from None


DEFAULT_BATCH = 8


def batch_for(dep, say: bool = True) -> int:
  """--batch, else generate's and plan's default: 8, rounded up to a batch `dep` splits
  (said on stderr when rounded and `say`: process 0 only, of several)."""
  if BATCH.value is not None:
    return BATCH.value
  batch = dep.default_batch(DEFAULT_BATCH)
  if batch != DEFAULT_BATCH and say:
    print(f"jax-ep: --batch not given: {batch}, the least batch of at least {DEFAULT_BATCH} "
          f"that {dep.name or dep.kind} splits (its expert axis x micro-batches and "
          "decode groups).", file=sys.stderr, flush=True)
  return batch


def memory_candidates() -> dict:
  """Presets that a refusal for memory may suggest: not the seed slices (their own models)."""
  return {k: d for k, d in deployments.PRESETS.items() if k not in deployments.SLICES}
