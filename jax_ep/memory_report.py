"""What `jax-ep plan` prints: the footprint table (memory.py) against a budget
(memory_budget.py), which device holds what, and XLA's own bytes per device of the
compiled programs.
"""

from __future__ import annotations

import jax

from jax_ep import memory_budget
from jax_ep.config import DeploymentConfig, ModelConfig
from jax_ep.memory import Footprint, cache_len, prefill_chunk
from jax_ep.memory_budget import Budget, GiB
from jax_ep.mesh import EXPERT, STAGE, TP

# --- which device holds what -------------------------------------------------------------


def holdings(cfg: ModelConfig, dep: DeploymentConfig, batch: int) -> list[dict]:
  """One row per device (mesh order: tp fastest, then expert, then stage; mesh.py): its
  coordinates and the ranges of layers, experts of each layer, MLP columns, heads,
  vocabulary columns and sequences that it holds. Ranges are [start, stop)."""
  dep.check_model(cfg)
  per_stage = cfg.num_layers // dep.stages
  e_local = cfg.num_experts // dep.expert_shards
  heads = cfg.num_heads // dep.tp
  vocab = cfg.vocab_size // (dep.expert * dep.tp)
  rows = batch // dep.expert
  ffn_tp = dep.placement == "tp" and dep.tp > 1
  f = cfg.mlp_dim // dep.tp if ffn_tp else cfg.mlp_dim
  out = []
  for i in range(dep.num_devices):
    s, rest = divmod(i, dep.expert * dep.tp)
    e, t = divmod(rest, dep.tp)
    shard = e * dep.tp + t if dep.placement == "ep" else e
    out.append({
        "device": i, STAGE: s, EXPERT: e, TP: t,
        "layers": (s * per_stage, (s + 1) * per_stage),
        "experts": (shard * e_local, (shard + 1) * e_local),
        "mlp_columns": (t * f, (t + 1) * f) if ffn_tp else (0, cfg.mlp_dim),
        "heads": (t * heads, (t + 1) * heads),
        "vocab": ((e * dep.tp + t) * vocab, (e * dep.tp + t + 1) * vocab),
        "sequences": (e * rows, (e + 1) * rows),
    })
  return out


def _range(r) -> str:
  a, b = r
  return f"{a}" if b == a + 1 else f"{a}-{b - 1}"


def format_holdings(cfg: ModelConfig, dep: DeploymentConfig, batch: int) -> str:
  """holdings as a markdown table, ranges inclusive."""
  rows = holdings(cfg, dep, batch)
  head = "| device | stage, expert, tp | layers | experts (each layer) | MLP columns | heads | " \
         "vocabulary | sequences |"
  lines = [head, "| ---: | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['device']} | {r[STAGE]}, {r[EXPERT]}, {r[TP]} | {_range(r['layers'])} | "
                 f"{_range(r['experts'])} | {_range(r['mlp_columns'])} | {_range(r['heads'])} | "
                 f"{_range(r['vocab'])} | {_range(r['sequences'])} |")
  return "\n".join(lines)


# --- planned: the footprint table --------------------------------------------------------


def format_footprint(fp: Footprint, budget: Budget | None = None) -> str:
  """fp.rows() as a markdown table of GiB (MiB where the total is under 0.1 GiB, which
  would read 0.000 a row) and bytes; with `budget`, whether it fits."""
  unit, name = (GiB, "GiB") if fp.total >= GiB // 10 else (1 << 20, "MiB")
  lines = [f"| per device | {name} | bytes |", "| --- | ---: | ---: |"]
  lines += [f"| {k} | {v / unit:.3f} | {v:,} |" if counted else
            f"| {k} (not live with the largest of these three; not added) | ({v / unit:.3f}) | "
            f"({v:,}) |" for k, v, counted in fp.rows()]
  if budget is not None:
    lines += ["", memory_budget.summary(fp, budget)]
  return "\n".join(lines)


# --- measured: XLA's buffer assignment of the real programs ------------------------------


def compiled_memory(engine, batch: int, prompt_len: int, max_len: int) -> dict:
  """XLA's per-device bytes of generate's programs, compiled from shapes (nothing is
  allocated): {"prefill" | "decode": {"argument", "output", "alias", "temp"}}.

  The prefill program is the largest chunk's (decode.prefill_chunks), sampling the next
  token; decode is one ring period. On simulated CPU devices these are the CPU
  backend's figures: a GPU's fusions differ, its temporaries too.
  """
  import jax.numpy as jnp

  cfg, dep = engine.cfg, engine.dep
  dep.check_batch(batch)
  length = cache_len(max_len)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        engine.abstract_params, engine.param_shardings)
  cache = engine.abstract_cache(batch, length)
  chunk = prefill_chunk(cfg, dep, batch, prompt_len)
  tokens = jax.ShapeDtypeStruct((batch, chunk), jnp.int32, sharding=engine.tokens_sharding())
  key = jax.random.key(0)
  out = {}
  pre = engine.prefill_program(0.0, sample=True).lower(params, cache, tokens, jnp.int32(0), key)
  out["prefill"] = _stats(pre.compile().memory_analysis())
  state = engine.abstract_decode_state(batch, length)
  ring = engine.decode_program(batch, dep.ring_period, 0.0).lower(params, state, key)
  out["decode"] = _stats(ring.compile().memory_analysis())
  return out


def _stats(m) -> dict:
  return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
          "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
