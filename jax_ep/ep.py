"""Every collective of jax_ep, each meant to run inside jax.shard_map.

The mesh has three axes (see mesh.py): `stage` (pipeline), `expert` (expert
parallel; attention is data parallel over it) and `tp` (tensor parallel). A
`Parallel` value says how large each is for the running deployment; collectives
over an axis of size 1 are skipped, so the same model code runs on one device
(outside shard_map) and on any mesh. Arrays local to one device end in `_`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_ep import routing
from jax_ep.config import DeploymentConfig
from jax_ep.kernels import combine as combine_kernel
from jax_ep.kernels import grouped_matmul
from jax_ep.mesh import EXPERT, STAGE, TP


@dataclasses.dataclass(frozen=True)
class Parallel:
  """Axis sizes and MoE options as seen from inside shard_map; all 1 means one device."""

  stage: int = 1
  expert: int = 1
  tp: int = 1
  placement: str = "ep"
  capacity_factor: float = 2.0
  dropless: bool = True
  kernels: str = "auto"
  expert_blocks: str = ""  # DeploymentConfig.expert_blocks
  head_gather: int = 1  # DeploymentConfig.head_gather (a one-device share's head)

  @classmethod
  def of(cls, dep: DeploymentConfig) -> Parallel:
    return cls(dep.stages, dep.expert, dep.tp, dep.placement, dep.capacity_factor,
               dep.dropless, dep.kernels, dep.expert_blocks, dep.head_gather)

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
  """Every stage gets the last stage's value of `x` (ints too): a masked sum over stages."""
  if par.stage == 1:
    return x
  is_last = jax.lax.axis_index(STAGE) == par.stage - 1
  return jax.lax.psum(jnp.where(is_last, x, jnp.zeros_like(x)), STAGE)


# --- head: vocabulary over expert x tp --------------------------------------------------


def vocab_axes(par: Parallel) -> tuple[str, ...]:
  """Axes the unembedding's vocabulary is split over (sharding.py): expert, then tp."""
  return par._live(EXPERT, TP)


def vocab_shard(par: Parallel):
  """This device's index among the vocabulary shards (expert major, tp minor)."""
  e = jax.lax.axis_index(EXPERT) if par.expert > 1 else 0
  return e * par.tp + tp_index(par)


def gather_batch(x_BxTxD_, par: Parallel):
  """Every device of a stage gets all its rows (the batch is split over expert): the
  head's input, so each vocabulary shard scores every row."""
  return jax.lax.all_gather(x_BxTxD_, EXPERT, axis=0, tiled=True) if par.expert > 1 else x_BxTxD_


def best_over_vocab(score_B, id_B, par: Parallel):
  """Each shard's best (score, id) per row -> the best over all shards: the token.

  Shards are gathered in vocabulary order, and argmax takes the first maximum, so a
  tie goes to the lowest id, as argmax over whole logits does.
  """
  axes = vocab_axes(par)
  if not axes:
    return id_B
  scores_VsxB = jax.lax.all_gather(score_B, axes, axis=0)
  ids_VsxB = jax.lax.all_gather(id_B, axes, axis=0)
  best_B = jnp.argmax(scores_VsxB, axis=0)
  return jnp.take_along_axis(ids_VsxB, best_B[None], axis=0)[0]


def psum_batch(x, par: Parallel):
  """Sums per-device statistics over the devices that hold different tokens."""
  axes = (EXPERT, TP) if par.split_tokens_over_tp else (EXPERT,)
  axes = par._live(*axes)
  return jax.lax.psum(x, axes) if axes else x


# --- expert parallel ---------------------------------------------------------------------


class MoEStats(NamedTuple):
  load_E: jax.Array  # int32, (token, pick) pairs this device routed to each expert
  dropped: jax.Array  # int32 scalar, pairs dropped for lack of buffer rows (0 when dropless)


def _exchange(buf_PxWxD_, par: Parallel):
  """all_to_all over the expert axes: block p of the send buffer goes to device p;
  block s of the result came from device s."""
  if not par.ep_axes:
    return buf_PxWxD_
  return jax.lax.all_to_all(buf_PxWxD_, par.ep_axes, 0, 0, tiled=True)


def kernels(par: Parallel) -> str:
  """The kernels for this backend: "pallas" on GPU, "xla" elsewhere, unless set."""
  if par.kernels != "auto":
    return par.kernels
  return "pallas" if jax.default_backend() == "gpu" else "xla"


def expert_impl(par: Parallel, d: int, f: int, swiglu: bool, pairs: bool = False) -> str:
  """kernels(par) for the expert MLP, falling back to XLA under "auto" when the kernel
  cannot tile D x F (grouped_matmul.mlp_supports); an explicit choice is kept."""
  impl = kernels(par)
  if par.kernels == "auto" and impl == "pallas" and grouped_matmul.mlp_supports(
      d, f, swiglu, par.expert_blocks, pairs):
    return "xla"
  return impl


def combine(y_RxD_, slot_TxK, weights_TxK, par: Parallel, dtype, rows: int):
  """routing.combine of y's first `rows` rows (slot == rows: nothing; y may hold padding
  past them), through the Pallas kernel where the kernels run and it tiles."""
  impl = kernels(par)
  if impl != "xla" and combine_kernel.supports(slot_TxK.shape[0], y_RxD_.shape[1]):
    return combine_kernel.combine(y_RxD_, slot_TxK, weights_TxK, rows=rows,
                                  interpret=impl == "interpret").astype(dtype)
  return routing.combine(y_RxD_[:rows], slot_TxK, weights_TxK).astype(dtype)


def moe(x_TxD_, w_router_DxE, w_in_ExDxN_, w_down_ExFxD_, *, top_k: int, par: Parallel,
        pairs: bool = False, active=True) -> tuple[jax.Array, MoEStats]:
  """Routes this device's tokens to their experts wherever they live, and back.

  gate -> pack a static [P, W, D] buffer by destination device (routing.py) ->
  all_to_all (with the [P, El] row counts) -> compact the received rows by local
  expert -> grouped expert MLP that computes only the real rows -> un-compact ->
  all_to_all back -> combine with the gate weights.

  Every shape is static and nothing branches on the routing: dropless (default), W
  is the worst case (routing.rows_per_destination), so a skewed step costs exchange
  bytes, not a host round trip or a second pass over the expert weights. Otherwise
  picks past W are dropped and counted.

  Args:
    x_TxD_: this device's tokens (replicated over tp).
    w_router_DxE: the whole router (every device routes its own tokens).
    w_in_ExDxN_, w_down_ExFxD_: this device's experts; with `ffn_over_tp`, F is this
      device's slice. w_in is the GELU MLP's up weight [El, D, F] or, with `pairs`,
      SwiGLU's up and gate weights interleaved [El, D, 2F] (groups.interleave_pairs).
    active: False in a pipeline bubble: the tokens are stand-ins; they take no rows,
      so the expert kernel skips them, and count no load.
  """
  num_experts = w_router_DxE.shape[1]
  total = x_TxD_.shape[0]
  valid_T = jnp.broadcast_to(jnp.asarray(active), (total,))
  if par.split_tokens_over_tp:
    # Each tp rank dispatches its own slice (a decode step may have fewer tokens than
    # tp: pad); padding rows are not tokens.
    t = -(-total // par.tp)
    x_TxD_ = jnp.pad(x_TxD_, ((0, t * par.tp - total), (0, 0)))
    x_TxD_ = jax.lax.dynamic_slice_in_dim(x_TxD_, tp_index(par) * t, t)
    valid_T = jnp.pad(valid_T, (0, t * par.tp - total))
    valid_T = jax.lax.dynamic_slice_in_dim(valid_T, tp_index(par) * t, t)
  tokens, dim = x_TxD_.shape
  p = par.ep_size
  e_local = num_experts // p
  rows = routing.rows_per_destination(tokens, top_k, e_local, p, par.capacity_factor,
                                      par.dropless)

  with jax.named_scope("gate"):
    logits_TxE = x_TxD_.astype(jnp.float32) @ w_router_DxE.astype(jnp.float32)
    weights_TxK, experts_TxK = routing.top_k_gate(logits_TxE, top_k)
    pack = routing.pack_by_destination(experts_TxK, valid_T, num_experts, p, rows)
  with jax.named_scope("dispatch"):
    send_ = routing.dispatch(x_TxD_, pack.slot_TxK, p * rows).reshape(p, rows, dim)
    recv_ = _exchange(send_, par).reshape(p * rows, dim)
    recv_PxEl = _exchange(pack.counts_PxEl, par)
  with jax.named_scope("experts"):
    if p > 1:
      comp = routing.compact_received(recv_PxEl, rows)
      x_RxD_ = routing.take_rows(recv_, comp.gather_R)
      group_sizes = comp.group_sizes_El
    else:  # the buffer is already one run per expert, nothing after the runs
      x_RxD_, group_sizes = recv_, recv_PxEl[0]
    # Balanced, a device receives as many rows as it sends picks (tokens x K).
    f = w_down_ExFxD_.shape[1]
    # With no exchange back, the combine reads the kernels' padded output in place (no
    # copy of a slice between the two kernels).
    in_place = p == 1 and not par.ffn_over_tp
    y_RxD_ = grouped_matmul.grouped_mlp(
        x_RxD_, group_sizes, w_in_ExDxN_, w_down_ExFxD_,
        impl=expert_impl(par, dim, f, pairs, pairs),
        blocks=grouped_matmul.mlp_blocks(dim, f, pairs, par.expert_blocks, pairs=pairs),
        expected_rows=tokens * top_k, padded=in_place, pairs=pairs)
    if par.ffn_over_tp:
      y_RxD_ = jax.lax.psum(y_RxD_, TP)
    if p > 1:
      y_RxD_ = routing.take_rows(y_RxD_, comp.back_R)
  with jax.named_scope("combine"):
    back_ = y_RxD_ if in_place else _exchange(y_RxD_.reshape(p, rows, dim), par).reshape(
        p * rows, dim)
    y_TxD_ = combine(back_, pack.slot_TxK, weights_TxK, par, x_TxD_.dtype, p * rows)
  if par.split_tokens_over_tp:
    y_TxD_ = jax.lax.all_gather(y_TxD_, TP, axis=0, tiled=True)[:total]
  return y_TxD_, MoEStats(pack.load_E, pack.dropped)
