"""Deployment presets: the seed's two (and its variants), and scaled-down meshes of each."""

from __future__ import annotations

import dataclasses

from jax_ep.config import ConfigError, DeploymentConfig, did_you_mean, natural_sort

SINGLE = DeploymentConfig()

# 16 GPUs: 2 pipeline stages x tensor parallel 8; each GPU holds 1/8 of its stage's
# attention (2 of 16 heads) and 4 whole experts (16 experts x 2 layers / 8).
SEED_BASELINE = DeploymentConfig(kind="baseline", stages=2, tp=8, placement="ep", microbatches=2)

# 64 GPUs: one MoE layer per stage (4 stages) x 16 experts, one expert per GPU; the
# seed's "expert axis of 64" is stage x expert here.
SEED_PROPOSED = DeploymentConfig(kind="proposed", stages=4, expert=16, microbatches=4)

# 128 GPUs: the same with each expert's MLP split over tp=2.
SEED_PROPOSED_TP2 = dataclasses.replace(SEED_PROPOSED, tp=2, placement="tp")

# The other reading (64 experts per layer, configs/seed_e64.py): a flat expert axis of 64,
# every layer on every device, one expert of each layer per device.
SEED_PROPOSED_E64 = DeploymentConfig(kind="proposed", stages=1, expert=64)


def _proposed(stages, expert, tp=1):
  return dataclasses.replace(SEED_PROPOSED, stages=stages, expert=expert, tp=tp,
                             microbatches=stages, placement="tp" if tp > 1 else "ep")


# Seed slices: on the GPUs we have, each GPU does the per-GPU work of seed_proposed with
# one group of 1024 in flight per stage (one expert of 1.07 GB, one layer's attention for
# 64 sequences, ~128 routed tokens, 2048 vocabulary columns), with a ring of one group per
# stage; only the head's rows differ: a slice's stage gathers 64 x its experts rows, not
# 1024. name -> (model preset in configs/, deployment).
ROWS_PER_GPU = 64
SLICES: dict[str, tuple[str, DeploymentConfig]] = {
    "slice_1x4": ("seed_slice_1x4", _proposed(1, 4)),
    "slice_2x2": ("seed_slice_2x2", _proposed(2, 2)),
    "slice_4x2": ("seed_slice_4x2", _proposed(4, 2)),
}


def slice_batch(dep: DeploymentConfig) -> int:
  """Sequences in flight on a slice: 64 per GPU of a stage, for each group."""
  return ROWS_PER_GPU * dep.expert * dep.groups


def _baseline(tp):
  return dataclasses.replace(SEED_BASELINE, tp=tp)


PRESETS: dict[str, DeploymentConfig] = {
    "single": SINGLE,
    "seed_baseline": SEED_BASELINE,
    "seed_proposed": SEED_PROPOSED,
    "seed_proposed_tp2": SEED_PROPOSED_TP2,
    "seed_proposed_e64": SEED_PROPOSED_E64,
    # Same shapes, fewer devices: stages first (up to the 4 layers), then experts.
    "proposed_1": dataclasses.replace(SINGLE, kind="proposed"),
    "proposed_2": _proposed(2, 1),
    "proposed_4": _proposed(4, 1),
    "proposed_8": _proposed(4, 2),
    "proposed_16": _proposed(4, 4),
    "proposed_64": SEED_PROPOSED,
    "proposed_128": SEED_PROPOSED_TP2,
    "baseline_1": dataclasses.replace(SINGLE, kind="baseline"),
    "baseline_2": _baseline(1),
    "baseline_4": _baseline(2),
    "baseline_8": _baseline(4),
    "baseline_16": SEED_BASELINE,
    **{name: dep for name, (_, dep) in SLICES.items()},
}


def mesh(name: str) -> DeploymentConfig:
  """"mesh:SxExT": a proposed-style deployment of any shape (S stages, E experts, T tp).

  Whole experts over expert (and tp, as the baseline's placement) when T = 1 or the
  expert axis is 1; each expert's MLP over tp otherwise. Decode groups: one per stage
  ("mesh:SxExT/G" through `resolve` sets G).
  """
  try:
    s, e, t = (int(v) for v in name.removeprefix("mesh:").split("x"))
  except ValueError:
    s = e = t = 0
  if min(s, e, t) < 1:
    raise ConfigError(f"{name!r}: write mesh:SxExT with whole numbers >= 1 (stages x experts "
                      "x tp), e.g. mesh:1x2x1 for expert parallelism over 2 devices.")
  return DeploymentConfig(kind="proposed", stages=s, expert=e, tp=t,
                          placement="tp" if t > 1 and e > 1 else "ep", microbatches=s)


def with_groups(name: str) -> tuple[str, int | None]:
  """"preset/G" -> (preset, G); a plain name -> (name, None)."""
  base, _, groups = name.partition("/")
  if not groups:
    return base, None
  if not groups.isdigit() or int(groups) < 1:
    raise ConfigError(f"{name!r}: after '/' give the number of decode groups, e.g. "
                      f"{base}/1 for one group in flight.")
  return base, int(groups)


RUN_ON = "run on (or simulate) one of those device counts"


def resolve(name: str, num_devices: int, counts: str = RUN_ON) -> DeploymentConfig:
  """A preset by name, by kind ("single", "baseline", "proposed") for `num_devices`, or
  a mesh shape ("mesh:SxExT", `mesh`).

  "name/G" sets the preset's decode groups to G (e.g. seed_proposed/1: one in flight).
  `counts` is the advice when a kind has no preset for `num_devices`.
  """
  name, groups = with_groups(name)
  dep = _resolve(name, num_devices, counts)
  return dep if groups is None else dataclasses.replace(dep, decode_groups=groups)


def _resolve(name: str, num_devices: int, counts: str) -> DeploymentConfig:
  if name.startswith("mesh:"):
    return mesh(name)
  if name in ("baseline", "proposed"):
    key = f"{name}_{num_devices}"
    if key not in PRESETS:
      sizes = sorted(int(k.split("_")[1]) for k in PRESETS if k.startswith(name + "_")
                     and k.split("_")[1].isdigit())
      fit = [n for n in sizes if n <= num_devices] or sizes[:1]
      raise ConfigError(f"no {name} preset for {num_devices} devices; presets exist for {sizes}: "
                        f"{counts}, or name a preset that uses fewer, e.g. {name}_{fit[-1]}.")
    return PRESETS[key]
  if name not in PRESETS:
    raise ConfigError(f"--deployment={name!r} is unknown; use baseline, proposed (sized to the "
                      f"devices), mesh:SxExT (any shape) or a preset: {natural_sort(PRESETS)}."
                      + did_you_mean(name, ["baseline", "proposed", *PRESETS]))
  return PRESETS[name]
