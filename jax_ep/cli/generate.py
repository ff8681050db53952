"""`jax-ep generate`: prefill prompts and decode them on a deployment, checked before
anything compiles; report TPS, TPOT and the expert load (and, for a checkpoint's task
model, its accuracy), and write them with the tokens to --output."""

from __future__ import annotations

import dataclasses
import sys

from absl import logging

from jax_ep import distributed, presets
from jax_ep.cli import flags
from jax_ep.config import ConfigError, count


def _say(message: str):
  """Progress and results: printed by process 0 only."""
  if distributed.is_primary():
    print(message, flush=True)


def _checkpoint_model():
  """(config, trained task or None) for generate: the checkpoint's, or the --config preset."""
  from jax_ep import evaluate
  from jax_ep.presets import load_model

  if not flags.CHECKPOINT.value:
    return load_model(flags.CONFIG.value), None
  named = load_model(flags.CONFIG.value) if flags.CONFIG.present else None
  m = evaluate.open_model(flags.CHECKPOINT.value, named)
  print(f"checkpoint {flags.CHECKPOINT.value}: step {m.step}"
        + (f", trained on {m.task.name} of {m.task.digits} digits" if m.task else ""))
  return m.cfg, m.task


def _checkpoint_report(engine, params, prompts, answers, gen, seed):
  """For generate's report: the expert load of the random weights of --seed (their router)
  on the same tokens, and the task accuracy (of a task model)."""
  from jax_ep import evaluate

  tokens = evaluate.routed_tokens(prompts, gen)
  out = {"random_load_max_mean": evaluate.random_router_imbalance(engine, tokens, seed)}
  if answers is not None:
    out["task_accuracy"] = evaluate.accuracy(gen, answers)
  return out


def agree_on_memory(refusal: ConfigError | None, timeout_s: int) -> None:
  """Every process checks its own devices' free memory, which can differ: where one
  refuses and another would go on, the others would wait out --distributed_timeout_s for
  it. So the verdicts are exchanged first; a process that refused raises its own reason,
  the others one naming the processes that refused."""
  verdict = "fits" if refusal is None else "does not fit"
  try:
    distributed.check_same(
        "memory check", {"memory": verdict}, timeout_s,
        hint="Each process checks its own devices' free memory: free memory on the devices "
             "of the processes that refused (their logs say what they need), or run with "
             "--nocheck_memory.")
  except ConfigError:
    if refusal is None:
      raise
  if refusal is not None:
    raise refusal


def _generate(profile_dir):
  """(model, deployment, decode.Generation or None for a dry run, the checkpoint's report)."""
  import jax
  import numpy as np

  from jax_ep import decode, memory, memory_budget, numerics, placement
  from jax_ep.engine import Engine

  cfg, task = _checkpoint_model()
  dep = flags.deployment_for(len(jax.devices()))
  flags.check_model(cfg, dep, checkpoint=bool(flags.CHECKPOINT.value))
  same = presets.names_of(cfg)
  flags.note_slice_model(same, flags.CONFIG.value if not flags.CHECKPOINT.value else (
      same or ["the checkpoint's model"])[0])
  flags.note_unread_expert_blocks(dep, jax.default_backend())
  logging.info("process %d of %d, %d devices (%s)", jax.process_index(), jax.process_count(),
               len(jax.devices()), jax.devices()[0].platform)
  name = flags.CONFIG.value
  if flags.CHECKPOINT.value:
    name = (f"{' = '.join(same)} (the checkpoint's)" if same
            else "of the checkpoint (no preset's)")
  _say(f"model {name}: {cfg.num_layers} layers x {cfg.num_experts} experts, "
       f"top-{cfg.top_k}, {cfg.dtype}; deployment {dep.describe()}")
  watch = numerics.LayerWatch() if flags.CHECK_NUMERICS.value else None
  engine = Engine(cfg, dep, watch=watch)
  batch = flags.batch_for(dep, say=distributed.is_primary())
  new, prompt_len = flags.NEW.value, flags.PROMPT_LEN.value
  if task is not None:  # held-out task prompts; the answer's length is the task's
    new, prompt_len = task.digits, task.prompt_len
    if flags.PROMPT_LEN.present or flags.NEW.present:
      _say(f"  --prompt_len and --max_new_tokens are ignored: the prompts are the task's "
           f"({prompt_len} tokens), the answers {new} tokens")
  max_len = decode.default_max_len(engine, prompt_len, new)
  # Everything that can be wrong with the request is checked before anything compiles,
  # and what its sizes alone refuse (memory too) before its prompts are built.
  decode.check_request_shape(engine, batch, prompt_len, new, flags.TEMPERATURE.value, max_len)
  memory_note, refused = None, False
  if flags.CHECK_MEMORY.value:
    platform = jax.devices()[0].platform
    fp = memory.footprint(cfg, dep, batch, prompt_len, max_len, platform)
    budget = memory_budget.budget_for_devices(list(engine.mesh.devices.flat))
    try:
      memory_budget.check(
          fp, budget,
          candidates=flags.memory_candidates(), platform=platform,
          what=(f"generate --checkpoint={flags.CHECKPOINT.value}"
                if flags.CHECKPOINT.value else f"generate --config={name}"),
          plan_command=_plan_command(batch, prompt_len, new))
      refusal = None
    except ConfigError as e:
      refusal = e
    if flags.DRY_RUN.value:  # it allocates nothing, so it shows what does not fit here too
      memory_note = f"memory: the run itself would be refused here: {refusal}" if refusal else None
      refused = refusal is not None
    else:
      agree_on_memory(refusal, flags.DIST_TIMEOUT.value)
  if flags.DRY_RUN.value:  # a dry run builds no prompts: a huge batch's take long
    unused = [f"--{f.name}" for f in (flags.OUTPUT, flags.PROFILE) if f.value]
    if unused and distributed.is_primary():
      print(f"jax-ep generate: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} "
            "without effect with --dry_run: it runs no step, so it writes nothing.",
            file=sys.stderr, flush=True)
    distributed.check_same("run", distributed.fields(
        model=cfg, deployment=dep, prompts=f"{batch} x {prompt_len}"), flags.DIST_TIMEOUT.value)
    _say(placement.format_table(cfg, dep, placement.rows(cfg, dep, jax.devices(), batch)))
    if not flags.CHECK_MEMORY.value:
      memory_note = "memory: not checked (--nocheck_memory)"
    _say(memory_note or f"memory: {memory_budget.summary(fp, budget).replace('Budget: ', '')}")
    # As plan's: 1 where the run itself would be refused, so a pre-flight check can tell.
    return cfg, dep, None, {"refused": refused}
  if task is not None:
    prompts, answers = task.eval_set(flags.SEED.value, batch)
  else:
    prompts, answers = np.random.RandomState(flags.SEED.value).randint(
        0, cfg.vocab_size, (batch, prompt_len)), None
  # (decode.generate checks the prompts' ids: these are in the vocabulary by construction.)
  distributed.check_same("run", distributed.fields(model=cfg, deployment=dep, prompts=prompts),
                         flags.DIST_TIMEOUT.value)
  if flags.CHECKPOINT.value:
    from jax_ep import checkpoint

    params = checkpoint.restore(flags.CHECKPOINT.value, engine)
  else:
    params = engine.init_params(flags.SEED.value)
  numerics.check_finite(params, "weights")
  # The trace covers the decode calls timed back to back (decode.generate starts it after
  # the compiles, the prefill and the synced calls), on process 0 only.
  gen = decode.generate(engine, params, prompts, new, temperature=flags.TEMPERATURE.value,
                        seed=flags.SEED.value, max_len=max_len, synced_steps=max(
                            len(decode.decode_calls(new - 1, dep.tokens_per_call)) // 4, 1),
                        log=lambda m: _say("  " + m),
                        profile_dir=profile_dir if distributed.is_primary() else None,
                        check_memory=False)  # checked above, weights included, before allocating
  if watch is not None:
    watch.check()
  extra = (_checkpoint_report(engine, params, prompts, answers, gen, flags.SEED.value)
           if flags.CHECKPOINT.value else {})
  return cfg, dep, gen, extra


def _report(cfg, dep, gen, extra):
  """The run's metrics printed, and written with the tokens to --output."""
  load = gen.load_LxE
  imbalance = gen.imbalance
  # The random weights of --seed are where a `jax-ep train --seed` run starts from.
  load_row = f"{imbalance:.2f}" + (
      f" (random weights of --seed={flags.SEED.value}: {extra['random_load_max_mean']:.2f})"
      if "random_load_max_mean" in extra else "")
  timed = bool(gen.step_s or gen.decode_steps)
  made = count(gen.steps + 1, "new token") + (" are" if gen.steps else " is")
  untimed = (f"not timed: {made} the prefill's and the ring's fill "
             f"(--max_new_tokens={gen.steps + 1}); give 3 or more to time a decode step")
  rows = [("deployment", dep.describe()), ("batch x new tokens", f"{gen.batch} x {gen.steps + 1}"),
          ("compile", f"{gen.compile_s:.2f} s"), ("prefill", f"{gen.prefill_s * 1e3:.1f} ms"),
          ("TPOT (back-to-back mean)", f"{gen.tpot_ms:.3f} ms" if timed else untimed),
          ("TPOT (synced median)", f"{gen.tpot_synced_ms:.3f} ms" if gen.step_s else "-"),
          ("TPS", f"{gen.tps:,.0f}" if timed else "-"),
          ("decode groups in flight", gen.groups), ("expert load max/mean", load_row),
          ("experts given no token", f"{int((load == 0).sum(axis=1).max())} of "
           f"{load.shape[1]} (the worst layer)"),
          ("expert picks dropped", f"{gen.dropped} (token x expert, all layers and steps)"
           + ("" if dep.dropless else f", capacity factor {dep.capacity_factor}"))]
  if "task_accuracy" in extra:
    rows.append(("task accuracy (exact match)", f"{extra['task_accuracy']:.3f}"))
  for k, v in rows:
    print(f"  {k:<28} {v}")
  print(f"  first sequence: {gen.tokens[0].tolist()}")
  if flags.OUTPUT.value:
    from jax_ep.output import write_json

    write_json(flags.OUTPUT.value, {
        "tokens": gen.tokens.tolist(), "config": dataclasses.asdict(cfg),
        "deployment": dataclasses.asdict(dep), "tps": gen.tps if timed else None,
        "tpot_ms": gen.tpot_ms if timed else None,
        "tpot_synced_ms": gen.tpot_synced_ms if gen.step_s else None, "compile_s": gen.compile_s,
        "prefill_s": gen.prefill_s, "step_s": gen.step_s, "load_LxE": load.tolist(),
        "dropped": gen.dropped, "groups": gen.groups, "load_max_mean": imbalance,
        **extra})
    print(f"  wrote {flags.OUTPUT.value}")


def _plan_command(batch: int, prompt_len: int, new: int) -> str:
  """The `jax-ep plan` command line that plans this generate run on these devices (the
  same deployment flags, resolved for as many devices), or "" where plan cannot (a
  checkpoint's model, a device kind it does not know)."""
  import jax

  from jax_ep import memory_budget

  kind = memory_budget.plan_kind(jax.devices()[0])
  if flags.CHECKPOINT.value or kind is None:
    return ""
  return " ".join([f"jax-ep plan --config={flags.CONFIG.value}", *flags.deployment_args(),
                   f"--devices={len(jax.devices())} --batch={batch} --prompt_len={prompt_len} "
                   f"--max_new_tokens={new} --device_kind={kind}"])


def run():
  """One generate run from the flags (a dry run stops after the checks)."""
  cfg, dep, gen, extra = _generate(flags.PROFILE.value)
  if gen is None:  # a dry run: 1 where process 0's run would be refused, as plan's status.
    # Process 0 alone: the others' early exit would stop its print under launch/local.py.
    return 1 if extra["refused"] and distributed.is_primary() else 0
  if distributed.is_primary():
    _report(cfg, dep, gen, extra)
  return 0

