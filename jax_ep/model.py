"""Flax NNX modules: multi-head attention with a KV cache, the MoE block, the decoder.

Each module computes with the weights it holds and reads sizes from their shapes,
never from the config, so the same module runs on one device with whole weights
and inside shard_map with one device's shards (ep.py supplies the collectives).
Layers are stacked on a leading L axis (nnx.vmap) so a mesh axis can split them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ep import ep
from jax_ep.config import ModelConfig
from jax_ep.kernels import decode_attention
from jax_ep.kv_cache import KVCache


def _normal(rngs: nnx.Rngs, shape, fan_in: int, dtype):
  # Drawn in the target dtype: a float32 draw of one seed expert stack would be 68 GB.
  return jax.random.normal(rngs.params(), shape, dtype) * jnp.asarray(fan_in**-0.5, dtype)


def rope(x_BxTxHxDh: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half form), computed in float32."""
  half = x_BxTxHxDh.shape[-1] // 2
  freq_Dh2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxTxDh2 = positions_BxT[..., None].astype(jnp.float32) * freq_Dh2[None, None, :]
  sin, cos = jnp.sin(angle_BxTxDh2)[:, :, None], jnp.cos(angle_BxTxDh2)[:, :, None]
  x1, x2 = jnp.split(x_BxTxHxDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxDh.dtype)


def rms_norm(x, scale_D, eps: float):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale = scale_D.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return (x32 * scale).astype(x.dtype)


def embed(embed_VxD, tokens_BxT):
  return jnp.take(embed_VxD, tokens_BxT, axis=0)


def head(x_BxTxD, final_scale_D, unembed_DxV, eps: float):
  """Final norm and unembedding; logits in float32."""
  return jnp.einsum("btd,dv->btv", rms_norm(x_BxTxD, final_scale_D, eps), unembed_DxV,
                    preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.scale_D = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.scale_D[...], self.eps)


class Attention(nnx.Module):
  """Multi-head attention with rotary positions over a preallocated KV cache.

  Heads may be a tp shard of the whole: the output projection's partial sums are
  all-reduced over tp.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, k, dt = cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.jnp_dtype
    self.wq_DxHxDh = nnx.Param(_normal(rngs, (d, h, k), d, dt))
    self.wk_DxHxDh = nnx.Param(_normal(rngs, (d, h, k), d, dt))
    self.wv_DxHxDh = nnx.Param(_normal(rngs, (d, h, k), d, dt))
    self.wo_HxDhxD = nnx.Param(_normal(rngs, (h, k, d), h * k, dt))
    self.rope_theta = cfg.rope_theta

  def __call__(self, x_BxTxD, k_BxHxSxDh, v_BxHxSxDh, pos_B, par: ep.Parallel):
    """Attends sequence b's T new tokens at positions pos_B[b]..pos_B[b]+T-1 to its cache
    positions < pos_B[b] and to each other (causally). Sequences may be at different
    positions (decode groups, continuous batching).

    The cache is only read here: the caller writes the returned new keys and values,
    so a pipeline bubble can skip the write. One new token per sequence (decode) with
    the Pallas kernels on reads only the live positions (kernels/decode_attention.py).
    Returns the output [B, T, D] and the new k, v [B, T, H, Dh].
    """
    b, t, _ = x_BxTxD.shape
    s = k_BxHxSxDh.shape[2]
    pos_B = jnp.broadcast_to(jnp.asarray(pos_B, jnp.int32), (b,))
    positions_BxT = pos_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    q = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wq_DxHxDh[...])
    k = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wk_DxHxDh[...])
    v = jnp.einsum("btd,dhk->bthk", x_BxTxD, self.wv_DxHxDh[...])
    q, k = rope(q, positions_BxT, self.rope_theta), rope(k, positions_BxT, self.rope_theta)
    k, v = k.astype(k_BxHxSxDh.dtype), v.astype(v_BxHxSxDh.dtype)
    scale = q.shape[-1] ** -0.5
    kernel = ep.kernels(par)
    if t == 1 and kernel != "xla" and decode_attention.supports(
        s, q.shape[-1], itemsize=k_BxHxSxDh.dtype.itemsize):
      o_BxHxDh = decode_attention.attend_decode(q[:, 0], k_BxHxSxDh, v_BxHxSxDh, pos_B, k[:, 0],
                                               v[:, 0], scale, interpret=kernel == "interpret")
      o_BxTxHxDh = o_BxHxDh[:, None].astype(v.dtype)
    else:
      old_BxHxTxS = jnp.einsum("bthk,bhsk->bhts", q, k_BxHxSxDh,
                               preferred_element_type=jnp.float32)
      seen_Bx1x1xS = (jnp.arange(s)[None, :] < pos_B[:, None])[:, None, None, :]
      old_BxHxTxS = jnp.where(seen_Bx1x1xS, old_BxHxTxS * scale, -jnp.inf)
      new_BxHxTxT = jnp.einsum("bthk,buhk->bhtu", q, k, preferred_element_type=jnp.float32)
      causal_1x1xTxT = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None, None]
      new_BxHxTxT = jnp.where(causal_1x1xTxT, new_BxHxTxT * scale, -jnp.inf)
      probs = jax.nn.softmax(jnp.concatenate([old_BxHxTxS, new_BxHxTxT], axis=-1), axis=-1)
      probs = probs.astype(v.dtype)
      o_BxTxHxDh = (jnp.einsum("bhts,bhsk->bthk", probs[..., :s], v_BxHxSxDh)
                   + jnp.einsum("bhtu,buhk->bthk", probs[..., s:], v))
    out_BxTxD = jnp.einsum("bthk,hkd->btd", o_BxTxHxDh, self.wo_HxDhxD[...])
    return ep.psum_tp(out_BxTxD, par), k, v


class MoEBlock(nnx.Module):
  """Router (float32), top-k gate and experts stored stacked: GELU's up weight as
  [E, D, F], SwiGLU's up and gate weights as one [E, D, 2F] whose column 2j is up's column
  j and 2j + 1 gate's (groups.interleave_pairs: the expert kernel's one MMA a K step);
  the down weight [E, F, D]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, e, dt = cfg.model_dim, cfg.mlp_dim, cfg.num_experts, cfg.jnp_dtype
    self.w_router_DxE = nnx.Param(_normal(rngs, (d, e), d, jnp.float32))
    if cfg.mlp_kind == "swiglu":
      self.w_up_gate_ExDx2F = nnx.Param(_normal(rngs, (e, d, 2 * f), d, dt))
    else:
      self.w_up_ExDxF = nnx.Param(_normal(rngs, (e, d, f), d, dt))
    self.w_down_ExFxD = nnx.Param(_normal(rngs, (e, f, d), f, dt))
    self.top_k = cfg.top_k

  def __call__(self, x_TxD, par: ep.Parallel, active=True):
    pairs = hasattr(self, "w_up_gate_ExDx2F")
    w_in = self.w_up_gate_ExDx2F if pairs else self.w_up_ExDxF
    return ep.moe(x_TxD, self.w_router_DxE[...], w_in[...], self.w_down_ExFxD[...],
                  top_k=self.top_k, par=par, pairs=pairs, active=active)


class DecoderLayer(nnx.Module):
  """Pre-norm attention then pre-norm MoE, each with a residual."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.model_dim, cfg.norm_eps, cfg.jnp_dtype)
    self.attn = Attention(cfg, rngs)
    self.moe_norm = RMSNorm(cfg.model_dim, cfg.norm_eps, cfg.jnp_dtype)
    self.moe = MoEBlock(cfg, rngs)

  def __call__(self, x_BxTxD, k_BxHxSxDh, v_BxHxSxDh, pos_B, par: ep.Parallel, active=True):
    """Returns the output, this layer's new keys and values [B, T, H, Dh], MoE stats.

    `active` False marks a pipeline bubble: attention runs, the experts skip its
    tokens, and its load is not counted.
    """
    h, k_BxTxHxDh, v_BxTxHxDh = self.attn(self.attn_norm(x_BxTxD), k_BxHxSxDh, v_BxHxSxDh, pos_B,
                                        par)
    x_BxTxD = x_BxTxD + h
    b, t, d = x_BxTxD.shape
    y_TxD, stats = self.moe(self.moe_norm(x_BxTxD).reshape(b * t, d), par, active)
    return x_BxTxD + y_TxD.reshape(b, t, d), k_BxTxHxDh, v_BxTxHxDh, stats


class Transformer(nnx.Module):
  """Token embedding, L stacked decoder layers, final norm and unembedding."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    dt = cfg.jnp_dtype
    self.embed_VxD = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.model_dim), 1, dt))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return DecoderLayer(cfg, rngs)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(cfg.model_dim, cfg.norm_eps, dt)
    self.unembed_DxV = nnx.Param(_normal(rngs, (cfg.model_dim, cfg.vocab_size), cfg.model_dim, dt))


  def num_local_layers(self) -> int:
    return self.layers.attn_norm.scale_D.shape[0]

  def layer(self, i: int) -> DecoderLayer:
    """Layer i (a copy of its slice of the stacked weights: fine for a reference)."""
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def __call__(self, tokens_BxT, cache: KVCache, pos_B, par: ep.Parallel = ep.ONE_DEVICE):
    """The whole model on one device: logits [B, T, V], the extended cache, MoE stats.

    The independent reference every deployment is tested against (tests/reference.py;
    engine, ring, property, checkpoint and hf tests): one program over the canonical
    parameters, without the engine's parameter layout, shard_map, pipeline, ring or
    sharded sampling. Training (train.py) runs these same layers. pos_B: each
    sequence's position (a scalar: all the same).
    """
    pos_B = jnp.broadcast_to(jnp.asarray(pos_B, jnp.int32), (tokens_BxT.shape[0],))
    x = embed(self.embed_VxD[...], tokens_BxT)
    stats = []
    for i in range(self.num_local_layers()):
      x, k, v, s = self.layer(i)(x, cache.k_LxBxHxSxDh[i], cache.v_LxBxHxSxDh[i], pos_B, par)
      cache = cache.write(i, pos_B, k, v)
      stats.append(s)
    stats = jax.tree.map(lambda *a: jnp.stack(a), *stats)
    logits = head(x, self.final_norm.scale_D[...], self.unembed_DxV[...], self.final_norm.eps)
    return logits, cache, stats
