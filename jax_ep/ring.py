"""Decode as a ring of stages with several groups of sequences in flight (in shard_map).

The batch of B sequences splits into G groups of Bg = B / G (DeploymentConfig.groups);
the ring's period is max(G, N) micro-steps for N stages. At micro-step t, stage s runs its
layers for group (t - s) mod max(G, N) (a real group if that is < G; otherwise it idles
on a stand-in: a bubble, which writes nothing and sends the experts nothing). Its
activations move to stage s + 1 with ppermute; the last stage's output goes through
the head, and the sampled tokens reach every stage, where stage 0 embeds them at the
group's next turn. Each group's KV cache stays on the stages that own its layers.

With G >= N every stage is busy every micro-step and each sequence gets a token every
G micro-steps; G = 1 is one batch in flight (each stage busy one micro-step in N).
Stage roles are masks (no lax.cond), and a call runs a static number of micro-steps,
so nothing syncs with the host between them.

Group g holds, on the device at expert index e, its rows g * Bl .. (g + 1) * Bl of that
device's B / E rows (Bl = B / (G * E)): global sequence e * B / E + g * Bl + r.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_ep import ep, model, sampling
from jax_ep.kv_cache import StagedKVCache, write_rows
from jax_ep.mesh import EXPERT


class DecodeState(NamedTuple):
  """What decoding carries from one call to the next: Engine.decode_state builds it after
  prefill, Engine.decode_program takes it (donated) and returns the next one. A pytree
  (Engine.decode_state_specs gives its PartitionSpecs); all but inflight_NxBgxD and the
  cache are replicated."""

  tokens_B: jax.Array  # int32: each sequence's next input token, global order
  pos_B: jax.Array  # int32: the position that token takes
  # The activations each stage receives next, over stage and expert (each device: its
  # [1, Bg / E, D]).
  inflight_NxBgxD: jax.Array
  micro_steps: jax.Array  # int32 scalar: micro-steps run since the ring started
  cache: StagedKVCache  # per local layer [N, B, H, S, Dh], over stage, expert and tp


class DecodeOutput(NamedTuple):
  """Per micro-step of a call (U of them): the tokens the last stage sampled, and for
  which group."""

  tokens_UxBg: jax.Array  # int32, in group order (expert-major: e * Bl + r)
  group_U: jax.Array  # int32
  valid_U: jax.Array  # bool: False while the ring fills (the first N - 1 micro-steps)


def group_ids(g, batch: int, groups: int, experts: int, xp=jnp):
  """Global sequence ids of group g, in its order (expert-major), [B / G] int32."""
  per_device, bl = batch // experts, batch // (groups * experts)
  e = xp.arange(experts, dtype=xp.int32)[:, None]
  return (e * per_device + g * bl + xp.arange(bl, dtype=xp.int32)[None, :]).reshape(-1)


def first_call_steps(groups: int, stages: int) -> int:
  """Micro-steps of the first call after prefill so that every group gets exactly one
  token: the period plus the fill, max(G, N) + min(G, N) - 1 = G + N - 1."""
  return groups + stages - 1


def _head_token(hg_, gids, pos, scale_D, unembed_DxV_, vocab0, temperature, key, norm_eps,
                par: ep.Parallel):
  """The next token of each gathered row, over this device's vocabulary columns and then
  all shards'. On a one-device share (par.head_gather > 1) the rows are scored that many
  times, the work of a device whose stage gathers that many devices' rows."""
  c = par.head_gather
  if c > 1:
    hg_, gids, pos = jnp.tile(hg_, (c, 1, 1)), jnp.tile(gids, c), jnp.tile(pos, c)
  logits_ = model.head(hg_, scale_D, unembed_DxV_, norm_eps)[:, 0]
  score, vid = sampling.local_best(logits_, vocab0, temperature, key, gids, pos)
  if c > 1:  # every copy picks the same token; the max takes each copy's pick
    score, vid = score[:vid.shape[0] // c], vid.reshape(c, -1).max(axis=0)
  return ep.best_over_vocab(score, vid, par)


def run(layers_, params_, state_: DecodeState, key, *, steps: int, groups: int, batch: int,
        temperature: float, norm_eps: float, par: ep.Parallel):
  """`steps` micro-steps of the ring on this device (inside shard_map).

  Args:
    layers_: this stage's layers (this device's shards).
    params_: the deployment params (embedding, final norm, this device's vocabulary
      columns of the unembedding).
    state_: DecodeState: inflight_NxBgxD is this device's [1, Bl, D], the cache this
      stage's, per local layer [1, B / E, H_local, S, Dh].
    key: the sampling key (temperature > 0); noise is keyed by sequence and position.
  Returns:
    (DecodeState, DecodeOutput, MoEStats summed over the micro-steps).
  """
  period = max(groups, par.stage)
  stage = ep.stage_index(par)
  e_index = jax.lax.axis_index(EXPERT) if par.expert > 1 else 0
  per_device = batch // par.expert
  bl = per_device // groups
  embed_VxD = params_["embed_VxD"][...]
  scale_D = params_["final_norm"]["scale_D"][...]
  unembed_DxV_ = params_["unembed_DxV"][...]
  vocab0 = ep.vocab_shard(par) * unembed_DxV_.shape[1]
  num_layers = len(layers_)
  num_experts = layers_[0].moe.w_router_DxE.shape[-1]

  def micro_step(i, carry):
    st, load_, dropped_, out = carry
    ks, vs = list(st.cache.k), list(st.cache.v)
    slot = (st.micro_steps - stage) % period
    valid = (slot < groups) & (st.micro_steps >= stage)
    g = jnp.minimum(slot, groups - 1)
    ids_ = group_ids(g, batch, groups, par.expert).reshape(par.expert, bl)[e_index]
    pos_ = st.pos_B[ids_]
    with jax.named_scope("embed"):
      fresh_ = model.embed(embed_VxD, st.tokens_B[ids_][:, None])
    h_ = jnp.where(stage == 0, fresh_, st.inflight_NxBgxD[0][:, None].astype(fresh_.dtype))
    for li, layer in enumerate(layers_):
      with jax.named_scope(f"layer{li}"):
        k_ = jax.lax.dynamic_slice_in_dim(ks[li][0], g * bl, bl, axis=0)
        v_ = jax.lax.dynamic_slice_in_dim(vs[li][0], g * bl, bl, axis=0)
        h_, k_new, v_new, stats = layer(h_, k_, v_, pos_, par, valid)
        ks[li] = write_rows(ks[li], 0, pos_, k_new, g * bl, valid)
        vs[li] = write_rows(vs[li], 0, pos_, v_new, g * bl, valid)
        load_ = load_.at[li].add(stats.load_E)
        dropped_ = dropped_.at[li].add(stats.dropped)
    # The head, on every stage (SPMD); the last stage's result is the one kept.
    last_slot = (st.micro_steps - (par.stage - 1)) % period
    last_valid = (last_slot < groups) & (st.micro_steps >= par.stage - 1)
    last_g = jnp.minimum(last_slot, groups - 1)
    with jax.named_scope("head"):
      hg_ = ep.gather_batch(h_, par)  # [Bg, 1, D], expert-major
      gids = group_ids(g, batch, groups, par.expert)
      token_Bg = ep.from_last_stage(
          _head_token(hg_, gids, st.pos_B[gids] + 1, scale_D, unembed_DxV_, vocab0,
                      temperature, key, norm_eps, par), par)
    with jax.named_scope("to_next_stage"):
      inflight_ = ep.to_next_stage(h_[:, 0], par)[None].astype(st.inflight_NxBgxD.dtype)
    last_ids = group_ids(last_g, batch, groups, par.expert)
    tokens_B = st.tokens_B.at[last_ids].set(jnp.where(last_valid, token_Bg, st.tokens_B[last_ids]))
    pos_B = st.pos_B.at[last_ids].add(last_valid.astype(jnp.int32))
    out = DecodeOutput(out.tokens_UxBg.at[i].set(token_Bg), out.group_U.at[i].set(last_g),
                       out.valid_U.at[i].set(last_valid))
    st = DecodeState(tokens_B, pos_B, inflight_, st.micro_steps + 1,
                     StagedKVCache(tuple(ks), tuple(vs)))
    return st, load_, dropped_, out

  bg = bl * par.expert
  out = DecodeOutput(jnp.zeros((steps, bg), jnp.int32), jnp.zeros((steps,), jnp.int32),
                     jnp.zeros((steps,), bool))
  carry = (state_, jnp.zeros((num_layers, num_experts), jnp.int32),
           jnp.zeros((num_layers,), jnp.int32), out)
  state_, load_, dropped_, out = jax.lax.fori_loop(0, steps, micro_step, carry)
  return state_, out, ep.MoEStats(load_, dropped_)
