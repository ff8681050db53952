"""`jax-ep train`: train a small MoE on a checkable digit task (jax_ep/train.py, optax),
with orbax checkpoints in --workdir that `jax-ep generate --checkpoint` decodes."""

from __future__ import annotations

from jax_ep.cli import flags


def check_memory(name: str, cfg, tc, device) -> None:
  """Refuses, before anything is allocated, a model whose training cannot fit the device."""
  from jax_ep import memory_budget, train
  from jax_ep.config import ConfigError

  parts = train.memory_bytes(cfg, tc)
  budget = memory_budget.budget_for_devices([device])
  need = sum(parts.values())
  if need <= budget.bytes:
    return

  def size(n):  # one unit for the line: the need's
    return memory_budget.format_bytes(n, need)

  terms = ", ".join(f"{k} {size(v)}" for k, v in parts.items())
  # A smaller batch shrinks only the logits: suggested where that would fit.
  batch = " or a smaller --batch" if need - parts["logits"] <= budget.bytes else ""
  raise ConfigError(
      f"training --config={name} needs at least {size(need)} on one device ({terms}), "
      f"{size(budget.bytes)} usable ({budget.source}). Training runs on one "
      f"device: train a small model (--config=tiny_task, tiny){batch}, and serve a large "
      "one from weights with generate --checkpoint. (--nocheck_memory runs it anyway.)")


def run():
  """Trains (or resumes) the --config model in --workdir."""
  import jax

  from jax_ep import tasks, train
  from jax_ep.presets import load_model

  flags.need("train", flags.WORKDIR)
  cfg = load_model(flags.CONFIG.value)
  tc = train.TrainConfig(steps=flags.STEPS.value,
                         batch=flags.BATCH.value or train.TrainConfig.batch,
                         learning_rate=flags.LEARNING_RATE.value, seed=flags.SEED.value,
                         task=tasks.Task(flags.TASK.value, flags.TASK_DIGITS.value))
  if flags.CHECK_MEMORY.value:
    check_memory(flags.CONFIG.value, cfg, tc, jax.local_devices()[0])
  print(f"train {flags.CONFIG.value} ({cfg.num_layers} layers x {cfg.num_experts} experts, top-"
        f"{cfg.top_k}, {cfg.dtype}) on {tc.task.name} of {tc.task.digits} digits: {tc.steps} "
        f"steps of {tc.batch}, on {jax.local_devices()[0]}; checkpoints in {flags.WORKDIR.value}",
        flush=True)
  result = train.run(cfg, tc, flags.WORKDIR.value, save_every=flags.SAVE_EVERY.value,
                     log=lambda m: print("  " + m, flush=True))
  print(f"  done in {result.seconds:.1f} s; `jax-ep generate --checkpoint={flags.WORKDIR.value}` "
        "decodes the task on any deployment")
  return 0
