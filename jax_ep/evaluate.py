"""A checkpoint's model on a deployment: its task accuracy (greedy decoding), and its
per-expert load beside that of random weights' router on the same tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep import checkpoint, tasks
from jax_ep.config import ConfigError, ModelConfig
from jax_ep.decode import Generation
from jax_ep.engine import Engine
from jax_ep.routing import load_imbalance


@dataclasses.dataclass(frozen=True)
class CheckpointModel:
  cfg: ModelConfig
  task: tasks.Task | None  # the task it was trained on, if any
  step: int


def open_model(directory: str, config: ModelConfig | None = None,
               flag: str = "--config") -> CheckpointModel:
  """The model a checkpoint holds. `config` (a preset the user named) must be that model
  (ConfigError naming the fields and `flag` otherwise)."""
  with checkpoint.Checkpointer(directory) as ckpt:
    meta = ckpt.meta()
    cfg = ckpt.config()
  if config is not None:
    checkpoint.check_model(meta["model"], config, f"--checkpoint={directory}",
                           f"{flag} names another model: leave {flag} out to use the "
                           "checkpoint's.")
    cfg = dataclasses.replace(cfg, max_seq_len=config.max_seq_len)
  train = meta.get("train")
  task = tasks.Task.from_dict(train["task"]) if train else None
  return CheckpointModel(cfg, task, int(meta["step"]))


def accuracy(gen: Generation, answers_BxO: np.ndarray) -> float:
  """Exact match of the first n generated tokens with the answers."""
  n = answers_BxO.shape[1]
  if gen.tokens.shape[1] < n:
    raise ConfigError(f"generated {gen.tokens.shape[1]} tokens; the task's answers have {n}.")
  return tasks.exact_match(gen.tokens[:, :n], answers_BxO)


def routed_tokens(prompts_BxT: np.ndarray, gen: Generation) -> np.ndarray:
  """The tokens a generation routed: the prompts (prefill) and every generated token but
  the last (each decode step's input)."""
  return np.concatenate([np.asarray(prompts_BxT), gen.tokens[:, :-1]], axis=1)


def expert_load(engine: Engine, params, tokens_BxT: np.ndarray) -> np.ndarray:
  """Per-expert picks [L, E] of one forward pass over `tokens_BxT` from position 0."""
  tokens = jax.device_put(engine.check_tokens(tokens_BxT), engine.tokens_sharding())
  cache = engine.init_cache(tokens.shape[0], tokens.shape[1])
  _, _, stats = engine.logits_program()(params, cache, tokens, jnp.int32(0))
  return np.asarray(stats.load_E)


def random_router_imbalance(engine: Engine, tokens_BxT: np.ndarray, seed: int = 0) -> float:
  """Load max/mean of the same model shape with random weights (Engine.init_params) on
  the same tokens: what an untrained router does with them."""
  return float(load_imbalance(expert_load(engine, engine.init_params(seed), tokens_BxT)))
