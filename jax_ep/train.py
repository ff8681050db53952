"""Training a small MoE model on a digit task (tasks.py) with optax, on one device.

The model is the single-device Transformer (model.py) with ep.moe on one device and
XLA kernels: the top-k gate is differentiable through its weights, so the router
learns from the task loss through the combine, and from the load-balancing loss
(Switch/GShard: E * sum_e f_e * p_e per layer, f_e the fraction of picks that went to
expert e, p_e its mean router probability). AdamW with warm-up and cosine decay,
gradients clipped by global norm. Checkpoints (checkpoint.py) hold the parameters, the
optimizer state and the step, which is also the data position: batch s is a function
of (seed, s), so a run resumed from step s continues bitwise as it would have.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_ep import checkpoint, ep, memory, routing, tasks
from jax_ep.config import ConfigError, DeploymentConfig, ModelConfig
from jax_ep.model import Transformer, embed, head

# One device, XLA kernels: the Pallas kernels have no gradients.
PAR = dataclasses.replace(ep.ONE_DEVICE, kernels="xla")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that decides the numbers of a run (a resumed run must match it)."""

  steps: int = 200
  batch: int = 32
  learning_rate: float = 1e-2
  warmup_steps: int = 10
  end_lr_fraction: float = 0.1  # the cosine decays to this fraction of learning_rate
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  # Weight of the load-balancing loss. 0.1 (Switch used 0.01) brings tiny_task's worst
  # layer from 1.6 x the mean load with random weights to about 1.3, at no cost in accuracy.
  balance_coef: float = 0.1
  seed: int = 0  # initial weights and the data stream
  task: tasks.Task = tasks.Task()

  def __post_init__(self):
    for name in ("steps", "batch"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"--{name}={value!r} must be a positive integer.")
    if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
      raise ConfigError(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer.")
    for name in ("learning_rate", "clip_norm"):
      if not getattr(self, name) > 0:
        raise ConfigError(f"--{name}={getattr(self, name)} must be positive.")
    if not (self.weight_decay >= 0 and self.balance_coef >= 0):
      raise ConfigError("weight_decay and balance_coef must be non-negative.")

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "task": self.task.to_dict()}

  @classmethod
  def from_dict(cls, d: dict) -> TrainConfig:
    return cls(**{**d, "task": tasks.Task.from_dict(d["task"])})


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  warmup = min(tc.warmup_steps, tc.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, tc.learning_rate, warmup, tc.steps,
      end_value=tc.learning_rate * tc.end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                     optax.adamw(schedule, weight_decay=tc.weight_decay))


class TrainState(NamedTuple):
  params: dict  # the model's canonical parameters as a pure dict (layers stacked [L, ...])
  opt_state: optax.OptState
  step: jax.Array  # int32: steps done, and the next batch's index


def init_state(cfg: ModelConfig, tc: TrainConfig) -> TrainState:
  params = nnx.to_pure_dict(nnx.split(Transformer(cfg, nnx.Rngs(tc.seed)))[1])
  return TrainState(params, optimizer(tc).init(params), jnp.zeros((), jnp.int32))


@functools.cache
def _graphdef(cfg: ModelConfig):
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))[0]


def merge(cfg: ModelConfig, params: dict) -> Transformer:
  """The Transformer with these (pure dict) parameters."""
  return nnx.merge(_graphdef(cfg), checkpoint.to_state(cfg, params))


class Forward(NamedTuple):
  logits_BxTxV: jax.Array  # float32
  probs_LxTxE: jax.Array  # router probabilities of each layer's B x T tokens (float32)
  load_LxE: jax.Array  # int32 picks per expert


def forward(model: Transformer, tokens_BxT) -> Forward:
  """Transformer.__call__ from position 0 without a cache, keeping each layer's router
  probabilities (the balance loss needs them; ep.moe returns only the picks).

  It runs the same DecoderLayer pieces in the same order, and model_test checks it
  gives Transformer.__call__'s logits.
  """
  b, t = tokens_BxT.shape
  x = embed(model.embed_VxD[...], tokens_BxT)
  probs, loads = [], []
  for i in range(model.num_local_layers()):
    layer = model.layer(i)
    # An empty one-slot cache: from position 0 the tokens attend to each other only.
    heads, head_dim = layer.attn.wq_DxHxDh.shape[1:]
    k0 = jnp.zeros((b, heads, 1, head_dim), x.dtype)
    h, _, _ = layer.attn(layer.attn_norm(x), k0, k0, 0, PAR)
    x = x + h
    xn_TxD = layer.moe_norm(x).reshape(b * t, -1)
    logits_TxE = xn_TxD.astype(jnp.float32) @ layer.moe.w_router_DxE[...].astype(jnp.float32)
    probs.append(jax.nn.softmax(logits_TxE, axis=-1))
    y, stats = layer.moe(xn_TxD, PAR)
    loads.append(stats.load_E)
    x = x + y.reshape(x.shape)
  logits = head(x, model.final_norm.scale_D[...], model.unembed_DxV[...], model.final_norm.eps)
  return Forward(logits, jnp.stack(probs), jnp.stack(loads))


def balance_loss(probs_LxTxE, load_LxE, top_k: int):
  """E * sum_e f_e * p_e per layer, averaged over layers (1 when perfectly balanced).

  f (the fraction of picks per expert) is a count and carries no gradient; p does.
  """
  n, e = probs_LxTxE.shape[1:]
  f_LxE = load_LxE.astype(jnp.float32) / (n * top_k)
  p_LxE = jnp.mean(probs_LxTxE, axis=1)
  return jnp.mean(e * jnp.sum(f_LxE * p_LxE, axis=-1))


def loss_and_metrics(cfg: ModelConfig, tc: TrainConfig, params, seq_BxT):
  out = forward(merge(cfg, params), seq_BxT[:, :-1])
  targets = seq_BxT[:, 1:]
  mask = tc.task.answer_mask()[None, :]
  logp = jax.nn.log_softmax(out.logits_BxTxV, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  ce = jnp.sum(nll * mask) / (mask.sum() * seq_BxT.shape[0])
  bal = balance_loss(out.probs_LxTxE, out.load_LxE, cfg.top_k)
  right = (jnp.argmax(out.logits_BxTxV, axis=-1) == targets) | ~mask
  metrics = {"loss": ce, "balance": bal, "accuracy": jnp.mean(jnp.all(right, axis=1)),
             "token_accuracy": 1 - jnp.sum(~right) / (mask.sum() * seq_BxT.shape[0]),
             "load_max_mean": routing.load_imbalance(out.load_LxE)}
  return ce + tc.balance_coef * bal, metrics


# optax.global_norm is deprecated for optax.tree.norm, which older optax lacks.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def train_step(cfg: ModelConfig, tc: TrainConfig, state: TrainState):
  """One AdamW step on batch `state.step`. Returns the next state and the metrics."""
  seq = tc.task.train_batch(tc.seed, state.step, tc.batch)
  grad_fn = jax.value_and_grad(functools.partial(loss_and_metrics, cfg, tc), has_aux=True)
  (_, metrics), grads = grad_fn(state.params, seq)
  metrics["grad_norm"] = _tree_norm(grads)
  updates, opt_state = optimizer(tc).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(params, opt_state, state.step + 1), metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def evaluate(cfg: ModelConfig, tc: TrainConfig, params, seq_BxT):
  """Metrics on given sequences (no update): accuracy is the greedy exact match."""
  return loss_and_metrics(cfg, tc, params, seq_BxT)[1]


EVAL_BATCH = 256


@dataclasses.dataclass
class Result:
  state: TrainState
  metrics: dict  # held-out metrics of the final parameters
  random_metrics: dict  # the same for the initial (random) parameters
  resumed_from: int | None
  seconds: float


def bar(done: int, total: int, width: int = 24) -> str:
  full = width * done // max(total, 1)
  return "[" + "#" * full + "." * (width - full) + f"] {done}/{total}"


def memory_bytes(cfg: ModelConfig, tc: TrainConfig) -> dict[str, int]:
  """A lower bound on the bytes `run` holds on its one device, by part: the weights, the
  random weights kept for the report, their gradients, AdamW's two moments (all in the
  weights' dtype), and the float32 logits of a batch; activations come on top."""
  w = sum(memory.weight_bytes(cfg, DeploymentConfig()).values())
  logits = tc.batch * tc.task.seq_len * cfg.vocab_size * 4
  return {"weights": w, "random weights (report)": w, "gradients": w,
          "AdamW moments": 2 * w, "logits": logits}


def run(cfg: ModelConfig, tc: TrainConfig, workdir: str | None, *, save_every: int = 0,
        log_every: int = 0, stop_after: int | None = None,
        log: Callable[[str], None] | None = print) -> Result:
  """Trains `cfg` on `tc.task` for tc.steps steps, resuming from `workdir`'s latest
  checkpoint if it has one (made with the same configs; ConfigError otherwise).

  Checkpoints every `save_every` steps and where it ends. `stop_after` ends the run
  early after that many steps of this call (a run to be resumed later).
  """
  log = log or (lambda _: None)
  tc.task.check_vocab(cfg.vocab_size, cfg.max_seq_len)
  if save_every < 0:
    raise ConfigError(f"--save_every={save_every} must be >= 0 (0: only at the end).")
  t_start = time.perf_counter()
  ckpt = checkpoint.Checkpointer(workdir, create=True) if workdir else None
  try:
    # What a resume would refuse (another model, other settings) is refused before the
    # model is initialised.
    resumed_from = ckpt.latest_step() if ckpt is not None else None
    if resumed_from is not None:
      _check_resume(ckpt, cfg, tc, resumed_from)
    # Committed to one device, as restored arrays are, so a resumed run hits the same
    # compiled step (jit's cache tells committed arrays from uncommitted ones).
    state = jax.device_put(init_state(cfg, tc), jax.local_devices()[0])
    random_params = jax.tree.map(jnp.copy, state.params)
    if resumed_from is not None:
      state = _restore(ckpt, cfg, resumed_from, state)
      log(f"resumed from step {resumed_from} in {workdir}")
    step = int(state.step)
    end = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
    log_every = log_every or max(1, tc.steps // 10)
    first, t0 = step + 1, time.perf_counter()
    saving = 0.0  # seconds in checkpoint saves since t0: not training, left out of the rate
    while step < end:
      state, metrics = train_step(cfg, tc, state)
      step += 1
      if step == first:  # the first step compiled: time the others
        jax.block_until_ready(metrics)
        log(f"first step (compiling the training step) in {time.perf_counter() - t0:.1f} s")
        t0, saving = time.perf_counter(), 0.0
      if step % log_every == 0 or step == end:
        m = {k: float(v) for k, v in metrics.items()}
        rate = (step - first) / max(time.perf_counter() - t0 - saving, 1e-9)
        log(f"{bar(step, tc.steps)} loss {m['loss']:.4f} acc {m['accuracy']:.3f} "
            f"balance {m['balance']:.3f} load max/mean {m['load_max_mean']:.2f}"
            + (f" ({rate:.1f} steps/s)" if step > first else ""))  # none timed yet
      if ckpt is not None and ((save_every and step % save_every == 0) or step == end):
        jax.block_until_ready(state)  # the step's own time is not the save's
        t_save = time.perf_counter()
        ckpt.save(step, cfg, state.params, opt_state=state.opt_state,
                  extra={"train": tc.to_dict()})
        saving += time.perf_counter() - t_save
    if ckpt is not None:
      ckpt.wait()
  finally:
    if ckpt is not None:
      ckpt.close()
  seq = tc.task.eval_batch(tc.seed, EVAL_BATCH)
  final = {k: float(v) for k, v in evaluate(cfg, tc, state.params, seq).items()}
  rand = {k: float(v) for k, v in evaluate(cfg, tc, random_params, seq).items()}
  log(f"held-out {tc.task.name} of {tc.task.digits} digits: accuracy {final['accuracy']:.3f} "
      f"(random weights {rand['accuracy']:.3f}); expert load max/mean {final['load_max_mean']:.2f}"
      f" (its initial weights {rand['load_max_mean']:.2f})")
  return Result(state, final, rand, resumed_from, time.perf_counter() - t_start)


def _check_resume(ckpt, cfg: ModelConfig, tc: TrainConfig, step: int) -> None:
  """Raises ConfigError unless `step` of `ckpt` is a training run of `cfg` with `tc`."""
  meta = ckpt.meta(step)
  saved = meta.get("train")
  if saved is None:
    raise ConfigError(f"{ckpt.directory} holds a checkpoint without training state (an "
                      "import?); train in a new --workdir.")
  checkpoint.check_model(meta["model"], cfg, f"--workdir={ckpt.directory}",
                         "Resume it with the --config it was trained with, or train this "
                         "model in a new --workdir.")
  want = tc.to_dict()
  diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in want.items() if saved.get(k) != v]
  if diff:
    raise ConfigError(f"--workdir={ckpt.directory} holds a run with other settings: "
                      f"{', '.join(diff)}; resume with the same flags or use a new --workdir.")


def _restore(ckpt, cfg: ModelConfig, step: int, state: TrainState) -> TrainState:
  """`state` with the params and optimizer state of `ckpt`'s `step`."""
  targets = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                         {checkpoint.PARAMS: state.params, checkpoint.OPT_STATE: state.opt_state})
  out = ckpt.restore(step, cfg, targets)
  return TrainState(out[checkpoint.PARAMS], out[checkpoint.OPT_STATE],
                    jax.device_put(jnp.int32(step), state.step.sharding))

