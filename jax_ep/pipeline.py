"""Prefill's pipeline of stages over micro-batches, run inside shard_map (GPipe).

At step t stage s works on micro-batch t - s while the activations it produced at
step t - 1 travel to stage s + 1 (ppermute), so with M micro-batches and N stages
a pass takes M + N - 1 steps, N - 1 of them fill and drain. Each stage keeps its
layers' KV cache; a bubble step computes on a stand-in micro-batch, writes nothing
and sends nothing to the experts. Decode runs on the ring (ring.py) instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep import ep
from jax_ep.kv_cache import StagedKVCache, write_rows
from jax_ep.model import DecoderLayer


def run(layers_: list[DecoderLayer], x_MxBxTxD_, cache_: StagedKVCache, pos, par: ep.Parallel):
  """This stage's layers over every micro-batch, stage to stage.

  Args:
    layers_: this stage's L_local layers, holding this device's shards.
    x_MxBxTxD_: this device's batch, embedded, split into M micro-batches of B rows.
    cache_: this stage's cache, per local layer [1, M * B, H_local, S, Dh].
    pos: position of the first new token (every sequence of a prefill shares it).

  Returns:
    The last stage's output for every micro-batch (on every stage), the updated
    cache, and MoE stats summed over micro-batches ([L_local, E] load, [L_local]).
  """
  m, b = x_MxBxTxD_.shape[:2]
  num_layers = len(layers_)
  stage = ep.stage_index(par)
  pos_B = jnp.full((b,), pos, jnp.int32)

  def rows(a_1xBxHxSxDh, mb):
    if m == 1:  # no slice, so no copy of the cache
      return a_1xBxHxSxDh[0]
    return jax.lax.dynamic_slice_in_dim(a_1xBxHxSxDh[0], mb * b, b, axis=0)

  def step(t, carry):
    inflight_, outputs_, (ks, vs), load_, dropped_ = carry
    ks, vs = list(ks), list(vs)
    mb = t - stage
    valid = (mb >= 0) & (mb < m)
    mb = jnp.clip(mb, 0, m - 1)
    fresh_ = jax.lax.dynamic_index_in_dim(x_MxBxTxD_, jnp.minimum(t, m - 1), keepdims=False)
    h_ = jnp.where(stage == 0, fresh_, inflight_)
    for i, layer in enumerate(layers_):
      with jax.named_scope(f"layer{i}"):
        h_, k_new, v_new, stats = layer(h_, rows(ks[i], mb), rows(vs[i], mb), pos_B, par, valid)
        ks[i] = write_rows(ks[i], 0, pos_B, k_new, mb * b, valid)
        vs[i] = write_rows(vs[i], 0, pos_B, v_new, mb * b, valid)
        load_ = load_.at[i].add(stats.load_E)
        dropped_ = dropped_.at[i].add(stats.dropped)
    last = valid & (stage == par.stage - 1)
    outputs_ = jax.lax.dynamic_update_index_in_dim(
        outputs_, jnp.where(last, h_, outputs_[mb]), mb, axis=0)
    with jax.named_scope("to_next_stage"):
      inflight_ = ep.to_next_stage(h_, par)
    return inflight_, outputs_, (tuple(ks), tuple(vs)), load_, dropped_

  num_experts = layers_[0].moe.w_router_DxE.shape[-1]
  carry = (jnp.zeros_like(x_MxBxTxD_[0]), jnp.zeros_like(x_MxBxTxD_), (cache_.k, cache_.v),
           jnp.zeros((num_layers, num_experts), jnp.int32), jnp.zeros((num_layers,), jnp.int32))
  steps = m + par.stage - 1
  _, outputs_, (ks, vs), load_, dropped_ = jax.lax.fori_loop(0, steps, step, carry)
  with jax.named_scope("from_last_stage"):
    outputs_ = ep.from_last_stage(outputs_, par)
  return outputs_, StagedKVCache(ks, vs), ep.MoEStats(load_, dropped_)
