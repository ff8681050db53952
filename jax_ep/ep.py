"""Every collective of jax_ep, each meant to run inside jax.shard_map.

The mesh has three axes (see mesh.py): `stage` (pipeline), `expert` (expert
parallel; attention is data parallel over it) and `tp` (tensor parallel). A
`Parallel` value says how large each is for the running deployment; collectives
over an axis of size 1 are skipped, so the same model code runs on one device
(outside shard_map) and on any mesh. Arrays local to one device end in `_`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_ep import routing
from jax_ep.config import DeploymentConfig, capacity, capacity_buckets
from jax_ep.experts import expert_mlp

STAGE, EXPERT, TP = "stage", "expert", "tp"
AXES = (STAGE, EXPERT, TP)


@dataclasses.dataclass(frozen=True)
class Parallel:
  """Axis sizes and MoE options as seen from inside shard_map; all 1 means one device."""

  stage: int = 1
  expert: int = 1
  tp: int = 1
  placement: str = "ep"
  capacity_factor: float = 2.0
  dropless: bool = True
  moe_chunks: int = 1

  @classmethod
  def of(cls, dep: DeploymentConfig) -> Parallel:
    return cls(dep.stages, dep.expert, dep.tp, dep.placement, dep.capacity_factor,
               dep.dropless, dep.moe_chunks)

  def _live(self, *names):
    sizes = {STAGE: self.stage, EXPERT: self.expert, TP: self.tp}
    return tuple(n for n in names if sizes[n] > 1)

  @property
  def ep_axes(self) -> tuple[str, ...]:
    """Axes one layer's experts are sharded over, and tokens exchanged across."""
    return self._live(EXPERT, TP) if self.placement == "ep" else self._live(EXPERT)

  @property
  def ep_size(self) -> int:
    return self.expert * (self.tp if self.placement == "ep" else 1)

  @property
  def split_tokens_over_tp(self) -> bool:
    """Tokens are replicated over tp but experts are spread over it: each tp rank
    dispatches a distinct slice of them (the baseline's token exchange)."""
    return self.placement == "ep" and self.tp > 1

  @property
  def ffn_over_tp(self) -> bool:
    return self.placement == "tp" and self.tp > 1


ONE_DEVICE = Parallel()


# --- tensor parallel ---------------------------------------------------------------------


def psum_tp(x, par: Parallel):
  """All-reduce of partial sums over tp (after attention's output projection)."""
  return jax.lax.psum(x, TP) if par.tp > 1 else x


def tp_index(par: Parallel):
  return jax.lax.axis_index(TP) if par.tp > 1 else 0


# --- pipeline ----------------------------------------------------------------------------


def stage_index(par: Parallel):
  return jax.lax.axis_index(STAGE) if par.stage > 1 else 0


def to_next_stage(x, par: Parallel):
  """Sends this stage's activations to the next stage (the last one's go nowhere)."""
  if par.stage == 1:
    return x
  perm = [(s, s + 1) for s in range(par.stage - 1)]
  return jax.lax.ppermute(x, STAGE, perm)


def from_last_stage(x, par: Parallel):
  """Every stage gets the last stage's value of `x`."""
  if par.stage == 1:
    return x
  is_last = jax.lax.axis_index(STAGE) == par.stage - 1
  return jax.lax.psum(jnp.where(is_last, x, jnp.zeros_like(x)), STAGE)


def psum_batch(x, par: Parallel):
  """Sums per-device statistics over the devices that hold different tokens."""
  axes = (EXPERT, TP) if par.split_tokens_over_tp else (EXPERT,)
  axes = par._live(*axes)
  return jax.lax.psum(x, axes) if axes else x


# --- expert parallel ---------------------------------------------------------------------


class MoEStats(NamedTuple):
  load_E: jax.Array  # int32, (token, pick) pairs this device routed to each expert
  dropped: jax.Array  # int32 scalar, pairs dropped for capacity (0 when dropless)
  rounds: jax.Array  # int32 scalar, exchange rounds run (1 unless some expert overflowed)


def _exchange(buf_ExCxD_, par: Parallel):
  """all_to_all over the expert axes: buffer [E, C, D] by destination expert in,
  [E_local, sources x C, D] for this device's experts out."""
  e, c, d = buf_ExCxD_.shape
  if not par.ep_axes:
    return buf_ExCxD_
  recv_ = jax.lax.all_to_all(buf_ExCxD_, par.ep_axes, 0, 0, tiled=True)
  e_local = e // par.ep_size
  recv_ = recv_.reshape(par.ep_size, e_local, c, d).transpose(1, 0, 2, 3)
  return recv_.reshape(e_local, par.ep_size * c, d)


def _return(out_ElxNxD_, par: Parallel):
  """Inverse of _exchange: each source gets back its [E, C, D] results."""
  if not par.ep_axes:
    return out_ElxNxD_
  e_local, n, d = out_ElxNxD_.shape
  c = n // par.ep_size
  out_ = out_ElxNxD_.reshape(e_local, par.ep_size, c, d).transpose(1, 0, 2, 3)
  out_ = out_.reshape(par.ep_size * e_local, c, d)
  return jax.lax.all_to_all(out_, par.ep_axes, 0, 0, tiled=True)


def moe(x_TxD_, w_router_DxE, w_up_ExDxF_, w_down_ExFxD_, w_gate_ExDxF_, *, top_k: int,
        par: Parallel, active=True) -> tuple[jax.Array, MoEStats]:
  """Routes this device's tokens to their experts wherever they live, and back.

  Per round: gate -> pack a static [E, C, D] buffer by destination expert ->
  all_to_all -> local experts as one batched einsum -> all_to_all back -> combine.
  Every chunk's exchange is straight-line code, so XLA's scheduler can overlap one
  chunk's exchange with another's expert compute.

  Dropless (default): the longest (source, expert) queue, agreed by every device,
  picks the smallest of a few static capacities (config.capacity_buckets: 1x to 4x
  the balanced share C, at most config.MAX_BUCKET_SLOTS) that holds it, through
  lax.switch, so an unlucky step costs a larger buffer, not a second pass over the
  expert weights. Past the largest, a while loop runs further rounds of it until
  every token is served.
  Otherwise overflow past C is dropped and counted.

  Args:
    x_TxD_: this device's tokens (replicated over tp).
    w_router_DxE: the whole router (every device routes its own tokens).
    w_*_Ex.._: this device's experts; with `ffn_over_tp`, F is this device's slice.
    active: False in a pipeline bubble: the tokens are stand-ins, so their load
      neither adds rounds nor counts as dropped.
  """
  num_experts = w_router_DxE.shape[1]
  total, real_T = x_TxD_.shape[0], None
  if par.split_tokens_over_tp:
    # Pad to a multiple of tp so every rank gets an equal slice (a decode step may have
    # fewer tokens than tp). Padding rows come after every real token, so they queue last
    # and take no real token's slot; they are kept out of the load, rounds and drops.
    t = -(-total // par.tp)
    x_TxD_ = jnp.pad(x_TxD_, ((0, t * par.tp - total), (0, 0)))
    x_TxD_ = jax.lax.dynamic_slice_in_dim(x_TxD_, tp_index(par) * t, t)
    real_T = tp_index(par) * t + jnp.arange(t) < total
  tokens, dim = x_TxD_.shape
  chunks = math.gcd(par.moe_chunks, tokens)
  chunk = tokens // chunks
  cap = capacity(chunk, num_experts, top_k, par.capacity_factor)

  with jax.named_scope("gate"):
    logits_TxE = x_TxD_.astype(jnp.float32) @ w_router_DxE.astype(jnp.float32)
    weights_TxK, experts_TxK = routing.top_k_gate(logits_TxE, top_k)
    weights_NxCxK = weights_TxK.reshape(chunks, chunk, top_k)
    experts_NxCxK = experts_TxK.reshape(chunks, chunk, top_k)
    position_NxCxK, load_NxE = jax.vmap(routing.assign_slots, (0, None))(experts_NxCxK,
                                                                         num_experts)
    if real_T is not None:
      picks_NxCxKxE = jax.nn.one_hot(experts_NxCxK, num_experts, dtype=jnp.int32)
      load_NxE = (picks_NxCxKxE * real_T.reshape(chunks, chunk, 1, 1)).sum((1, 2))
  x_NxCxD = x_TxD_.reshape(chunks, chunk, dim)

  def expert_compute(buf_ExCxD_):
    recv_ElxNxD_ = _exchange(buf_ExCxD_, par)
    with jax.named_scope("experts"):
      out_ = expert_mlp(recv_ElxNxD_, w_up_ExDxF_, w_down_ExFxD_, w_gate_ExDxF_)
      if par.ffn_over_tp:
        out_ = jax.lax.psum(out_, TP)
    return _return(out_, par)

  def one_round(r, n, cap):
    slot_TxK, _ = routing.slot_indices(experts_NxCxK[n], position_NxCxK[n], r, cap,
                                       num_experts)
    with jax.named_scope("dispatch"):
      buf_ = routing.dispatch(x_NxCxD[n], slot_TxK, num_experts * cap)
      buf_ = buf_.reshape(num_experts, cap, dim)
    out_ = expert_compute(buf_).reshape(num_experts * cap, dim)
    with jax.named_scope("combine"):
      return routing.combine(out_, slot_TxK, weights_NxCxK[n])

  load_NxE = jnp.where(active, load_NxE, 0)
  most = load_NxE.max()
  if par.dropless:
    # Every device of the exchange (the expert axes, and tp, whose ranks share the all_to_all
    # or the psum) must take the same branch and run the same rounds; other stages need not.
    group = par._live(EXPERT, TP)
    if group:
      most = jax.lax.pmax(most, group)
    caps = capacity_buckets(cap, chunk)

    def fits(c):  # one round holds every queue
      return lambda: ([one_round(0, n, c) for n in range(chunks)], jnp.ones((), jnp.int32))

    def overflow():  # the largest capacity, as many rounds as the longest queue needs
      c = caps[-1]
      rounds = (most + c - 1) // c

      def more(carry):
        r, ys = carry
        return r + 1, [y + one_round(r, n, c) for n, y in enumerate(ys)]

      start = jnp.ones((), jnp.int32)
      ys = [one_round(0, n, c) for n in range(chunks)]
      _, ys = jax.lax.while_loop(lambda carry: carry[0] < rounds, more, (start, ys))
      return ys, rounds.astype(jnp.int32)

    branch = jnp.sum(jnp.asarray(caps[:-1]) < most)  # the first capacity >= most
    with jax.named_scope("exchange"):
      y_chunks, rounds = jax.lax.switch(branch, [fits(c) for c in caps[:-1]] + [overflow])
    dropped = jnp.zeros((), jnp.int32)
  else:
    y_chunks = [one_round(0, n, cap) for n in range(chunks)]
    rounds = jnp.ones((), jnp.int32)
    dropped = jnp.maximum(load_NxE - cap, 0).sum().astype(jnp.int32)

  y_TxD_ = jnp.concatenate(y_chunks, axis=0).astype(x_TxD_.dtype)
  if par.split_tokens_over_tp:
    y_TxD_ = jax.lax.all_gather(y_TxD_, TP, axis=0, tiled=True)[:total]
  stats = MoEStats(load_NxE.sum(0).astype(jnp.int32), dropped,
                   jnp.maximum(rounds, 1).astype(jnp.int32))
  return y_TxD_, stats
