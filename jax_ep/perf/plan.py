"""What a benchmark runs: BenchSpec, the deployments planned for the devices present
(Plan, plan), one device's share of a deployment, and the sweep fitted to device memory
before anything is allocated (memory.py, memory_budget.py)."""

from __future__ import annotations

import dataclasses

import jax

from jax_ep.config import KINDS, ConfigError, DeploymentConfig, ModelConfig, count, did_you_mean
from jax_ep.perf.per_device import layout
from jax_ep.presets import deployments, load_model

SEED_PRESET = {"baseline": "seed_baseline", "proposed": "seed_proposed"}


class UnknownEntry(ConfigError):
  """A --kinds or --share entry that names no deployment (a typo): --skip_unfit, which runs
  what fits, is no fix for it."""


def _with_groups(name: str) -> tuple[str, int | None]:
  try:
    return deployments.with_groups(name)
  except ConfigError as e:
    raise UnknownEntry(str(e)) from None


def share_preset(name: str) -> str:
  """A --share value as a preset name: "proposed[/G]" is seed_proposed[/G], whatever the
  devices present (a share runs on one device); other presets as given."""
  base, groups = _with_groups(name)
  base = "seed_proposed" if base == "proposed" else base
  return base if groups is None else f"{base}/{groups}"


def share_presets() -> list[str]:
  """The presets a share can be taken of: tp = 1 and more than one device."""
  return sorted(n for n, d in deployments.PRESETS.items() if d.tp == 1 and d.num_devices > 1)


@dataclasses.dataclass(frozen=True)
class BenchSpec:
  """What to run. None means the platform's default (GPU: the seed; CPU: small)."""

  config: str | None = None  # model preset (configs/): GPU "seed", CPU "tiny"
  kinds: tuple[str, ...] = KINDS
  share: str | None = None  # "proposed[/G]" (= seed_proposed[/G]) or a preset: one device's share
  batch: int = 1024  # sequences in flight (slice presets set their own)
  prompt_len: int | None = None  # GPU 32, CPU 8
  steps: int | None = None  # decode steps timed back to back: GPU 20, CPU 4
  synced: int = 5  # decode steps before those, each timed with a sync (median, p10-p90)
  warmup: int = 1  # decode steps after the ring's fill, not timed
  num_devices: int | None = None  # use the first N devices (default: all)
  seed: int = 0
  probes: bool = True
  probe_mib: int | None = None  # copy probe size (GPU 4096, CPU 64); all_to_all 1/64 of it
  tokens_per_call: int = 1  # tokens per sequence per decode call (DeploymentConfig)
  expert_blocks: str = ""  # the expert kernel's tile changes (DeploymentConfig)
  skip_unfit: bool = False  # skip deployments that cannot run here instead of failing
  check_memory: bool = True  # refuse (or skip) what overflows a device (memory_budget.py)
  checkpoint: str | None = None  # the model and its weights from this checkpoint, not random


def platform_defaults(spec: BenchSpec, platform: str) -> BenchSpec:
  gpu = platform != "cpu"
  return dataclasses.replace(
      spec, config=spec.config or ("seed" if gpu else "tiny"),
      prompt_len=spec.prompt_len or (32 if gpu else 8), steps=spec.steps or (20 if gpu else 4))




@dataclasses.dataclass(frozen=True)
class Plan:
  name: str  # "single", "baseline", "proposed", "share:seed_proposed", "slice_2x2/1"
  method: str  # the table's words
  cfg: ModelConfig
  dep: DeploymentConfig
  batch: int
  preset: str
  note: str = ""
  share_of: DeploymentConfig | None = None  # the deployment whose one device this is
  model_name: str = ""  # the configs/ preset of cfg (weights are made once per model)


def _preset_for(kind: str, num_devices: int) -> tuple[str, str]:
  """The seed's preset if it fits the devices present, else the largest scaled one that does."""
  seed_name = SEED_PRESET[kind]
  need = deployments.PRESETS[seed_name].num_devices
  if num_devices >= need:
    return seed_name, ""
  sizes = sorted(int(k.split("_")[1]) for k in deployments.PRESETS
                 if k.startswith(kind + "_") and k.split("_")[1].isdigit())
  fit = [s for s in sizes if s <= num_devices]
  if not fit:
    raise ConfigError(f"no {kind} preset fits {num_devices} devices")
  name = f"{kind}_{fit[-1]}"
  if deployments.PRESETS[name].num_devices == 1:
    raise ConfigError(f"on 1 device the {kind} preset is the single-device run; "
                      "--share=seed_proposed/1 runs one device's share of seed_proposed "
                      "instead")
  return name, (f"the seed's {kind} needs {need} GPUs, {num_devices} present: scaled preset "
                f"{name} ({deployments.PRESETS[name].describe()})")


def parse_mesh(kind: str) -> DeploymentConfig:
  """"mesh:SxExT" or "mesh:SxExT/G" (configs/deployments.mesh; G: decode groups in flight,
  default one per stage). A malformed entry is an UnknownEntry."""
  base, groups = _with_groups(kind)
  try:
    dep = deployments.mesh(base)
  except ConfigError as e:
    raise UnknownEntry(f"--kinds entry {e}") from None
  return dep if groups is None else dataclasses.replace(dep, decode_groups=groups)


def share_config(cfg: ModelConfig, dep: DeploymentConfig, batch: int):
  """One device's share of `dep` as a one-device model and deployment: (ModelConfig,
  DeploymentConfig, batch).

  Its stage's layers, its experts of each (top-k capped at their number), the rows it
  attends for, the whole attention as the device holds it, and its vocabulary columns of
  the unembedding, which score every row of its stage (the deployment gathers them; the
  share's own rows stand in: DeploymentConfig.head_gather). The model's vocabulary is
  that shard's, so the embedding keeps only its rows (a lookup's cost does not depend on
  the table's size; the deployment replicates it).
  The share runs one group's rows once: the ring's micro-steps and the collectives are
  what the cost model (perf/cost.py) adds to turn it into the deployment's step. With
  top-k capped, the share's experts see fewer rows than the deployment's (64, not ~128,
  for seed_proposed: the seed slices give the exact per-GPU work).
  """
  if dep.tp > 1:
    raise ConfigError(f"a share of a tp={dep.tp} deployment splits attention heads over tp, "
                      "which a one-device model cannot express (heads x head_dim = model_dim); "
                      f"take the share of a tp=1 preset: {', '.join(share_presets())}.")
  lay = layout(cfg, dep, batch)
  share = dataclasses.replace(cfg, num_layers=lay.layers, num_experts=lay.experts,
                              top_k=min(cfg.top_k, lay.experts),
                              vocab_size=cfg.vocab_size // lay.vocab_shards)
  one = dataclasses.replace(deployments.SINGLE, head_gather=lay.group_rows // lay.micro_rows,
                            tokens_per_call=dep.tokens_per_call,
                            expert_blocks=dep.expert_blocks)
  return share, one, lay.rows


def plan(cfg: ModelConfig, spec: BenchSpec, num_devices: int, log) -> tuple[list[Plan], list]:
  """The deployments to run on `num_devices`, and notes on those that cannot.

  A kind is single, baseline or proposed (the seed's preset, or the largest scaled one
  that fits), a preset name, mesh:SxExT, or a seed slice (slice_1x4, ...: its own model
  and batch, configs/deployments.py); "/G" after any of them sets the decode groups.
  """
  plans, skipped = [], []
  for kind in spec.kinds:
    try:
      note, model_cfg, model_name, batch = "", cfg, spec.config, spec.batch
      base, groups = _with_groups(kind)
      if base in SEED_PRESET:
        name, note = _preset_for(base, num_devices)
        dep = deployments.PRESETS[name]
      elif base.startswith("mesh:"):
        name, dep = base, parse_mesh(base)
      else:
        name, dep = base, _resolve(base, num_devices, "--kinds")
      if groups is not None:
        dep = dataclasses.replace(dep, decode_groups=groups)
      dep = dataclasses.replace(dep, tokens_per_call=spec.tokens_per_call,
                                expert_blocks=spec.expert_blocks)
      if base in deployments.SLICES:
        model_name = deployments.SLICES[base][0]
        model_cfg = load_model(model_name)
        batch = deployments.slice_batch(dep)
        note = (f"seed slice: each GPU does seed_proposed's per-GPU work ({model_name}, "
                f"{deployments.ROWS_PER_GPU} sequences per GPU per group, "
                f"{count(dep.groups, 'group')} in flight)")
      if dep.num_devices > num_devices:
        raise ConfigError(f"{name} needs {dep.num_devices} devices, {num_devices} present")
      dep.check_model(model_cfg)
      dep.check_batch(batch)
      label = {"single": "Single device", "baseline": "Baseline (TP x PP)",
               "proposed": "Proposed cross-node EP"}.get(base, base)
      if dep.stages > 1 or groups is not None:
        label += f", {dep.groups} group{'s' if dep.groups > 1 else ''} in flight"
      plans.append(Plan(kind, label, model_cfg, dep, batch, name, note, model_name=model_name))
    except ConfigError as e:
      skipped.append({"name": kind, "reason": str(e), "typo": isinstance(e, UnknownEntry)})
      if spec.skip_unfit:  # else the error names them all
        log(f"skip {kind}: {e}")
  if spec.share:
    name = spec.share
    try:
      name = share_preset(spec.share)
      if deployments.with_groups(name)[0] not in deployments.PRESETS:
        raise UnknownEntry(f"--share: {spec.share!r} is not a preset; use proposed/G "
                          f"(= seed_proposed/G) or one of {share_presets()}.")
      full = _resolve(name, num_devices, "--share")
      # One group on one device of `full` (the ring's micro-step on one device).
      try:
        share_cfg, share_dep, rows = share_config(
            cfg, dataclasses.replace(full, decode_groups=1, microbatches=1,
                                     tokens_per_call=spec.tokens_per_call,
                                     expert_blocks=spec.expert_blocks),
            spec.batch // full.groups)
      except ConfigError as e:
        raise ConfigError(f"--share={spec.share}: {e}") from None
      plans.append(Plan(f"share:{name}", f"One GPU's share of {name}", share_cfg,
                        share_dep, rows, name,
                        f"one device of {name} ({full.num_devices} GPUs) for one group of "
                        f"{spec.batch // full.groups}: {count(share_cfg.num_layers, 'layer')} x "
                        f"{count(share_cfg.num_experts, 'expert')}, top-{share_cfg.top_k}, {rows} "
                        f"sequences; its head: {share_cfg.vocab_size} of {cfg.vocab_size} "
                        f"vocabulary columns on the stage's {rows * share_dep.head_gather} "
                        "rows", share_of=full, model_name=spec.config))
    except ConfigError as e:
      skipped.append({"name": f"share:{name}", "reason": str(e),
                      "typo": isinstance(e, UnknownEntry)})
      if spec.skip_unfit:
        log(f"skip share {name}: {e}")
  return plans, skipped


def slice_share(params, cfg: ModelConfig, share: ModelConfig):
  """The share's parameters cut from a deployment layout (engine.py): stage 0's first
  `share.num_layers` local layers, experts 0..E_local-1, the first vocabulary shard.
  Slices only what the share keeps, so the full model is never copied (it may fill the
  device)."""

  def cut(path, leaf):
    name = next(n for n in reversed([str(getattr(k, "key", getattr(k, "name", k)))
                                     for k in path]) if n != "value")
    if name.startswith(("w_up_", "w_down_")):  # [N, E, ...]
      return leaf[:1, :share.num_experts]
    if name == "w_router_DxE":  # [N, D, E]
      return leaf[:1, :, :share.num_experts]
    return leaf[:1]

  layers = tuple(jax.tree_util.tree_map_with_path(cut, params["layers"][i])
                 for i in range(share.num_layers))
  v = share.vocab_size  # the first vocabulary shard (leaves keep their Variable types)
  return {**params, "layers": layers,
          "embed_VxD": jax.tree.map(lambda a: a[:v], params["embed_VxD"]),
          "unembed_DxV": jax.tree.map(lambda a: a[:, :v], params["unembed_DxV"])}



def decode_calls(spec: BenchSpec) -> int:
  """Decode calls of a run: the ring's fill, warm-up, synced and back-to-back calls."""
  return 1 + spec.warmup + spec.synced + spec.steps


def new_tokens(spec: BenchSpec) -> int:
  """Tokens per sequence of a run: prefill's, the fill's, then tokens_per_call a call."""
  return 2 + (decode_calls(spec) - 1) * spec.tokens_per_call




def footprint(p: Plan, spec: BenchSpec, platform: str):
  from jax_ep import memory

  # run_one's cache: prompt + the decode calls (+1 token from prefill, -1 already cached).
  return memory.footprint(p.cfg, p.dep, p.batch, spec.prompt_len,
                          spec.prompt_len + new_tokens(spec) - 1, platform)


def span_processes(plans: list[Plan], skipped: list, devices, log, skip_unfit: bool) -> list[Plan]:
  """With several processes every jit runs on all of them: the plans whose mesh does not
  reach a device of every process (the first N devices; a share's one) move to `skipped`."""
  processes = {d.process_index for d in devices}
  kept = []
  for p in plans:
    used = {d.process_index for d in devices[:p.dep.num_devices]}
    if used == processes:
      kept.append(p)
      continue
    reason = (f"{p.name} uses {count(p.dep.num_devices, 'device')}, of {len(used)} of the "
              f"{len(processes)} processes; a bench over several processes runs only "
              "deployments that span them all: run it in one process")
    skipped.append({"name": p.name, "reason": reason})
    if skip_unfit:
      log(f"skip {p.name}: {reason}")
  return kept


def _resolve(name: str, num_devices: int, flag: str) -> DeploymentConfig:
  """deployments.resolve, with an unknown name refused as the bench flag that gave it."""
  base = deployments.with_groups(name)[0]  # "preset/G" too
  if base not in deployments.PRESETS and base not in ("baseline", "proposed"):
    kinds = "single, baseline, proposed, mesh:SxExT[/G]" if flag == "--kinds" else "proposed"
    raise UnknownEntry(f"{flag}: {name!r} is not a kind or preset; use {kinds} or one of "
                      f"{sorted(deployments.PRESETS)}."
                      + did_you_mean(base, ["baseline", "proposed", *deployments.PRESETS]))
  return deployments.resolve(name, num_devices)


def fit_memory(plans: list[Plan], skipped: list, spec: BenchSpec, devices, log):
  """Drops (into `skipped`) the plans that overflow a device on their own; the kept plans
  and their footprints."""
  from jax_ep import memory_budget

  kept, footprints = [], {}
  for p in plans:
    fp = footprint(p, spec, devices[0].platform)
    budget = memory_budget.budget_for_devices(devices[:p.dep.num_devices])
    try:
      memory_budget.check(fp, budget, platform=devices[0].platform, what=f"bench {p.name}")
    except ConfigError as e:
      skipped.append({"name": p.name, "reason": str(e)})
      if spec.skip_unfit:
        log(f"skip {p.name}: {e}")
      continue
    kept.append(p)
    footprints[p.name] = fp
  return kept, footprints


def coexists(p: Plan, source: Plan, footprints: dict, devices) -> bool:
  """Whether `p` can be placed and run while the source's weights stay on the devices
  (device 0 holds a shard of both). Placing holds p's weights twice for a moment (the
  canonical copy and its layout, Engine.place_params)."""
  from jax_ep import memory, memory_budget

  if p.name not in footprints or source.name not in footprints:
    return True  # memory not checked
  fp = footprints[p.name]
  held = footprints[source.name].weight_total
  budget = memory_budget.budget_for_devices(devices[:p.dep.num_devices])
  placing = dataclasses.replace(fp, kv_cache=0, state=0, temporaries=0,
                                work=memory.WorkingSet(0, 0, 0, 0, 0))
  return memory_budget.fits(fp, budget, held=held) and memory_budget.fits(
      placing, budget, held=held + fp.weight_total)
