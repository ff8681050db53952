"""`jax-ep plan`: bytes per device of a deployment and which device holds what, planned
against a device kind's memory without any GPU (jax_ep/memory.py). Exits 1 when the
deployment does not fit (after printing the whole plan), so scripts can test it."""

from __future__ import annotations

import sys

from jax_ep import presets, runtime
from jax_ep.cli import flags
from jax_ep.presets import deployments


def run():
  """`jax-ep plan`: the memory table and the device holdings, without a GPU; 1 when the
  deployment does not fit the device kind's memory, else 0."""
  from jax_ep import memory, memory_budget, memory_report
  from jax_ep.presets import load_model

  cfg = load_model(flags.CONFIG.value)
  # --devices, else the preset's or mesh:SxExT's own count (8 for "proposed"/"baseline").
  n = flags.DEVICES.value or deployments.resolve(flags.DEPLOYMENT.value, 8).num_devices
  dep = flags.deployment_for(n, counts="plan for one of those device counts (--devices)")
  if dep.num_devices > n:
    from jax_ep.config import ConfigError

    given = (f"--devices={n}" if flags.DEVICES.present else
             f"{n} devices (--deployment={flags.DEPLOYMENT.value}'s count without --devices)")
    raise ConfigError(f"{dep.describe()} needs {dep.num_devices} devices; the plan is for "
                      f"{given}: pass --devices={dep.num_devices}.")
  if flags.DEVICES.present and dep.num_devices < n:  # generate, too, takes the first ones
    print(f"jax-ep plan: {flags.DEPLOYMENT.value} (stage {dep.stages} x expert {dep.expert} x "
          f"tp {dep.tp}) uses {dep.num_devices} of the "
          f"--devices={n}; the plan is for those {dep.num_devices}.", file=sys.stderr)
  flags.check_model(cfg, dep)
  flags.note_slice_model(presets.names_of(cfg), flags.CONFIG.value)
  batch = flags.batch_for(dep)
  kind = flags.DEVICE_KIND.value.lower()
  platform = "cpu" if kind == "cpu" else "gpu"
  if platform == "cpu" and flags.MEM_FRACTION.value is not None:
    print(f"jax-ep plan: --mem_fraction={flags.MEM_FRACTION.value} is without effect with "
          "--device_kind=cpu: a CPU plan is against this host's available memory.",
          file=sys.stderr)
  max_len = min(cfg.max_seq_len, flags.PROMPT_LEN.value + flags.NEW.value)  # as generate's
  fp = memory.footprint(cfg, dep, batch, flags.PROMPT_LEN.value, max_len, platform)
  budget = memory_budget.budget_for_kind(kind, dep.num_devices, flags.MEM_FRACTION.value)
  print(f"model {flags.CONFIG.value}: {cfg.num_layers} layers x {cfg.num_experts} experts, "
        f"top-{cfg.top_k}, {cfg.dtype}; deployment {dep.describe()}; batch {batch}, prompt "
        f"{flags.PROMPT_LEN.value}, {flags.NEW.value} new tokens\n")
  print(memory_report.format_footprint(fp, budget))
  fits = memory_budget.fits(fp, budget)
  if not fits:
    try:
      memory_budget.check(fp, budget, candidates=flags.memory_candidates(), platform=platform,
                          what="plan")
    except Exception as e:  # noqa: BLE001 - the advice, printed rather than raised
      print(flags.flag_message(str(e)))
  print("\nWhich device holds what (ranges are inclusive):\n")
  print(memory_report.format_holdings(cfg, dep, batch))
  if flags.COMPILE.value:
    runtime.simulate_devices(dep.num_devices)
    from jax_ep.engine import Engine

    print(f"\nXLA's bytes per device, compiled for {dep.num_devices} simulated CPU devices "
          "(the CPU backend's buffer assignment; a GPU's differs):\n")
    for name, m in memory_report.compiled_memory(Engine(cfg, dep), batch, flags.PROMPT_LEN.value,
                                                 max_len).items():
      print(f"  {name:<8} " + ", ".join(f"{k} {memory_budget.format_bytes(v, max(m.values()))}"
                                        for k, v in m.items()))
  return 0 if fits else 1
