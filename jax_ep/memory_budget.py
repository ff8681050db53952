"""What a device can hold, and whether a deployment's footprint (memory.py) fits it.

A budget is the bytes each device may use: a GPU kind's memory times the allocator's
fraction, the allocator's own limit on the GPUs present, or (CPU devices) this host's
memory, which its devices share. A run that does not fit is refused before anything is
allocated, naming the largest batch and the smallest deployment that fit.
"""

from __future__ import annotations

import dataclasses
import math
import os

from jax_ep.config import ConfigError, count
from jax_ep.memory import Footprint, footprint

GiB = 1 << 30
MiB = 1 << 20

# --- what a device can hold --------------------------------------------------------------

# Device memory as nvidia-smi's memory.total reports it (MiB); the allocator gets
# `mem_fraction` of it (jax preallocates 75% by default; XLA_PYTHON_CLIENT_MEM_FRACTION or
# XLA_CLIENT_MEM_FRACTION changes that). On a GPU the allocator's own limit
# (Device.memory_stats()["bytes_limit"]) is used instead of this table.
DEVICE_MEMORY_MIB = {
    "h100": 81559,  # H100 80GB HBM3 (SXM)
    "h200": 143771,  # H200 141GB HBM3e (KINDS.md: nvidia-smi on the lent H200s)
    "a100": 81920,  # A100 80GB
    "a100_80": 81920,
    "a100_40": 40960,
}
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Budget:
  """Bytes each device may use or, `shared` (CPU devices: one host's memory), bytes that
  the devices of a deployment share: their footprints add up."""

  bytes: float
  source: str
  shared: bool = False
  name: str = "device"


def mem_fraction() -> float:
  """The share of a GPU's memory jax's allocator takes (its environment variables)."""
  for var in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
    if os.environ.get(var):
      return float(os.environ[var])
  return DEFAULT_MEM_FRACTION


def host_memory_bytes() -> int:
  """Host memory a process can still take: MemAvailable, or the cgroup limit if lower."""
  avail = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
  except OSError:
    pass
  if avail is None:
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        limit = f.read().strip()
      if limit.isdigit() and int(limit) < avail:
        avail = int(limit)
    except OSError:
      continue
  return avail


def budget_for_kind(kind: str, num_devices: int, fraction: float | None = None) -> Budget:
  """A device kind by name (DEVICE_MEMORY_MIB, or "cpu": this host's memory)."""
  kind = kind.lower()
  if kind == "cpu":
    host = host_memory_bytes()
    return Budget(host, "this host's available memory, shared by its CPU devices",
                  shared=True, name="cpu")
  if kind not in DEVICE_MEMORY_MIB:
    raise ConfigError(f"--device_kind={kind!r} is unknown; use cpu or one of "
                      f"{sorted(DEVICE_MEMORY_MIB)}.")
  fraction = mem_fraction() if fraction is None else fraction
  if not 0 < fraction <= 1:
    raise ConfigError(f"--mem_fraction={fraction} must be in (0, 1].")
  total = DEVICE_MEMORY_MIB[kind] * MiB
  return Budget(total * fraction, f"{kind}: {total / GiB:.1f} GiB x memory fraction "
                f"{fraction:g}", name=kind)


def _local_device(devices):
  """The first of `devices` that this process addresses (all of them in one process), or
  where it addresses none of them, its own first device (of the same kind on a cluster)."""
  import jax

  here = jax.process_index()
  return next((d for d in devices if getattr(d, "process_index", here) == here),
              jax.local_devices()[0])


def budget_for_devices(devices) -> Budget:
  """What the devices present can hold: the allocator's limit on a GPU, host memory on
  the CPU. The allocator is asked on one of this process's own devices: on a process
  other than 0 `devices[0]` is another process's, whose memory this one cannot read."""
  d = _local_device(devices)
  if d.platform == "cpu":
    return budget_for_kind("cpu", len(devices))
  stats = d.memory_stats() if hasattr(d, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return Budget(free, f"{d.device_kind}: allocator limit {stats['bytes_limit'] / GiB:.1f} GiB"
                  f", {stats.get('bytes_in_use', 0) / GiB:.1f} GiB in use", name=d.device_kind)
  kind = next((k for k in DEVICE_MEMORY_MIB if k in d.device_kind.lower().replace(" ", "")),
              None)
  if kind is None:
    return Budget(math.inf, f"{d.device_kind}: memory unknown (not checked)", name=d.device_kind)
  return budget_for_kind(kind, len(devices))


# --- whether a footprint fits, and what would ------------------------------------------


def need_bytes(fp: Footprint, budget: Budget, held: float = 0.0) -> float:
  """Bytes `fp` takes from `budget` (per device, or the whole host when shared), with
  `held` bytes per device already taken (weights of another deployment)."""
  per_device = fp.total + held
  return per_device * fp.dep.num_devices if budget.shared else per_device


def fits(fp: Footprint, budget: Budget, held: float = 0.0) -> bool:
  """Whether `fp`, beside `held` bytes already on each of its devices, fits `budget`."""
  return need_bytes(fp, budget, held) <= budget.bytes


def format_bytes(nbytes: int, scale: int | None = None) -> str:
  """GiB for what is large, MiB or bytes for what would read 0.00 GiB (the tiny models);
  the unit is chosen by `scale` (the largest figure beside it) when given, so that one
  line keeps one unit."""
  scale = nbytes if scale is None else scale
  if scale < MiB // 10:
    return f"{int(nbytes):,} bytes"
  unit, name = (GiB, "GiB") if scale >= GiB // 10 else (MiB, "MiB")
  # What the line's unit rounds to nothing, but is not: "<0.01", not "0.00".
  return f"<0.01 {name}" if 0 < nbytes < unit / 200 else f"{nbytes / unit:.2f} {name}"


def _need(fp: Footprint, budget: Budget, scale: int | None) -> str:
  if budget.shared:
    each = f" ({fp.dep.num_devices} devices x {format_bytes(fp.total, scale)})" \
        if fp.dep.num_devices > 1 else ""
    return f"{format_bytes(need_bytes(fp, budget), scale)} of host memory{each}"
  return f"{format_bytes(fp.total, scale)} per device"


def _have(budget: Budget, scale: int | None) -> str:
  if budget.shared:
    return f"{format_bytes(budget.bytes, scale)} available on this host"
  return f"{format_bytes(budget.bytes, scale)} usable per device"


def summary(fp: Footprint, budget: Budget) -> str:
  """One line: what `budget` offers, what `fp` needs of it, and whether it fits."""
  if math.isinf(budget.bytes):  # a device kind whose memory is not known
    return f"needs {_need(fp, budget, None)}; {budget.source}."
  # Each figure in its own unit: the budget is GiB where a tiny model needs MiB.
  return (f"Budget: {_have(budget, None)} ({budget.source}); needs {_need(fp, budget, None)}: "
          + ("fits." if fits(fp, budget) else "DOES NOT FIT."))


def largest_batch(cfg, dep, batch, prompt_len, max_len, budget, platform) -> int | None:
  """The largest valid batch <= `batch` whose footprint fits (a bisection over the
  multiples of dep.min_batch: a footprint grows with the batch), or None."""
  step = dep.min_batch

  def ok(k):
    return fits(footprint(cfg, dep, k * step, prompt_len, max_len, platform), budget)

  lo, hi = 0, batch // step  # ok(lo) (none is always "fine"); the answer is in [lo, hi]
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
  return lo * step or None


def smallest_fitting(cfg, batch, prompt_len, max_len, budget, platform, candidates):
  """(name, deployment, footprint) of the candidate with fewest devices that fits."""
  for name, dep in sorted(candidates.items(), key=lambda kv: kv[1].num_devices):
    try:
      fp = footprint(cfg, dep, batch, prompt_len, max_len, platform)
    except ConfigError:
      continue
    if fits(fp, budget):
      return name, dep, fp
  return None


def plan_kind(device) -> str | None:
  """The `jax-ep plan --device_kind` of a jax device ("cpu", "h200", ...), or None where
  DEVICE_MEMORY_MIB has no such kind."""
  if device.platform == "cpu":
    return "cpu"
  kind = str(getattr(device, "device_kind", "")).lower()
  if "a100" in kind:  # "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe"
    return "a100_40" if "40gb" in kind.replace(" ", "") else "a100_80"
  return next((k for k in ("h100", "h200") if k in kind), None)


def check_beside_weights(fp: Footprint, budget: Budget) -> None:
  """Raises ConfigError unless what a generate call allocates beside the weights already
  on its devices (the KV cache, the ring's state, the working set) fits what `budget`
  has left: decode.generate's check, made when the parameters are placed already."""
  need = need_bytes(fp, budget, held=-fp.weight_total)
  if need <= budget.bytes:
    return
  scale = int(need)
  where = "of host memory" if budget.shared else "per device"
  raise ConfigError(
      f"this generate call does not fit beside its weights: {fp.dep.describe()} with batch "
      f"{fp.batch} and a cache of {fp.length} positions needs {format_bytes(need, scale)} "
      f"{where} more (KV cache {format_bytes(fp.kv_cache, scale)} of it), "
      f"{_have(budget, scale)} ({budget.source}). Pass fewer sequences or a shorter max_len, "
      "or check_memory=False to run it anyway.")


def check(fp: Footprint, budget: Budget, *, candidates=None, platform: str = "gpu",
          what: str = "", plan_command: str = "") -> None:
  """Raises ConfigError if `fp` does not fit `budget`, naming the smallest deployment
  (among `candidates`, name -> DeploymentConfig) and the largest batch that fit.
  `plan_command`: the `jax-ep plan` command line that plans this same run, for the
  message (else it says `jax-ep plan` in general)."""
  if fits(fp, budget):
    return
  cfg, dep = fp.cfg, fp.dep
  biggest = max(fp.rows()[:-1], key=lambda row: row[1])
  scale = int(need_bytes(fp, budget))  # one unit for the line: the need's
  lines = [f"{what or 'this run'} does not fit: {dep.describe()} with batch {fp.batch} needs "
           f"{_need(fp, budget, scale)} ({biggest[0]}: {format_bytes(biggest[1], scale)}), "
           f"{_have(budget, scale)} ({budget.source})."]
  b = largest_batch(cfg, dep, fp.batch, fp.prompt_len, fp.max_len, budget, platform)
  if b:
    lines.append(f"--batch={b} fits this deployment.")
  if candidates and not budget.shared:
    found = smallest_fitting(cfg, fp.batch, fp.prompt_len, fp.max_len, budget, platform,
                             candidates)
    if found:
      name, d, f = found
      lines.append(f"The smallest deployment that fits batch {fp.batch}: --deployment={name} "
                   f"({count(d.num_devices, 'device')} of {format_bytes(f.total)}).")
  planning = what == "plan"  # `jax-ep plan` itself: it prints the table, runs nothing
  if len(lines) == 1:
    lines.append("Neither a smaller batch nor another deployment fits: use a smaller model "
                 "(--config) or devices with more memory"
                 + ("." if planning else
                    f"; `{plan_command or 'jax-ep plan'}` prints the table."))
  if not planning:
    lines.append("(--nocheck_memory runs it anyway.)")
  raise ConfigError(" ".join(lines))
