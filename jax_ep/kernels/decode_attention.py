"""Decode attention over the live part of the KV cache (one new query per sequence).

XLA turns attention of one query over the cache (a batched vector-matrix product) into
a multiply-reduce fused with the softmax's concatenate, which ran at a tenth of the
bandwidth on the H200 (benchmarks/NOTES.md). This uses jax's own Pallas Triton decode
kernel (jax.experimental.pallas.ops.gpu.decode_attention), which reads only the first
`length` positions of each sequence, and merges the new token's own score with the
kernel's softmax residuals, so the cache is read before the new key is written (a
pipeline bubble then writes nothing).

The cache is [B, H, S, Dh]: each (sequence, head) is one contiguous [S, Dh] run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# The kernel's blocks (decode_attn_unbatched's arguments; block_k None: the largest of 128,
# 64, 32, 16 that divides the cache length). benchmarks/decode_parts.py --parts=attention
# measures others, and its attention_step part runs the model with them (set here before
# the step is traced). 16 positions a block reads the live cache to within 15 positions
# of its length: at 48 of 64 live on the seed's cache it took 0.43 ms against 0.65 for
# blocks of the whole cache (NOTES section 13).
BLOCKS = {"block_k": 16, "k_splits": 1, "num_warps": 2, "num_stages": 2}


# Shared memory a thread block may use on an H100/H200 SM (227 KiB).
SMEM_LIMIT = 232448


def _block_k(s: int) -> int | None:
  return next((b for b in (128, 64, 32, 16) if s % b == 0), None)


def _blocks(cache_len: int, blocks: dict | None) -> dict:
  kw = {**BLOCKS, **(blocks or {})}
  kw["block_k"] = kw["block_k"] or _block_k(cache_len)
  return kw


def smem_bytes(cache_len: int, head_dim: int, blocks: dict | None = None,
               itemsize: int = 2) -> int:
  """Shared memory the kernel asks for, for a cache of `itemsize`-byte elements: a key and
  a value block in each of num_stages - 1 buffers, the query padded to 16 rows, the
  block's scores. Fitted to the two requests the GPU refused at head_dim 512 in fp16
  (NOTES section 13: 282624 bytes for 128-position blocks in 2 stages, 280576 for 64 in
  3); other element sizes scale the key, value and query terms (not measured)."""
  kw = _blocks(cache_len, blocks)
  if not kw["block_k"]:
    raise ValueError(f"no block of 128, 64, 32 or 16 positions divides the cache length "
                     f"{cache_len}")
  k = min(kw["block_k"], cache_len // kw["k_splits"])
  return (max(kw["num_stages"] - 1, 1) * k * head_dim * itemsize * 2
          + 16 * head_dim * itemsize + k * 32)


def supports(cache_len: int, head_dim: int, blocks: dict | None = None,
             itemsize: int = 2) -> bool:
  """Whether the kernel runs on this cache: blocks of at least 16 positions that tile each
  split of it, within an SM's shared memory (else the model takes XLA's attention)."""
  kw = _blocks(cache_len, blocks)
  if not kw["block_k"] or kw["block_k"] < 16 or cache_len % kw["k_splits"]:
    return False
  split = cache_len // kw["k_splits"]
  return (split >= 16 and split % min(kw["block_k"], split) == 0
          and smem_bytes(cache_len, head_dim, blocks, itemsize) <= SMEM_LIMIT)


def cache_attention(q_BxHxDh, k_BxHxSxDh, v_BxHxSxDh, lengths_B, scale: float, interpret: bool,
                    blocks: dict | None = None):
  """Softmax attention of each query over its sequence's cache positions < lengths_B[b].

  Returns o [B, H, Dh] (normalised, q's dtype) and the softmax's running max m and sum l
  [B, H] float32 (l = sum over positions of exp(score - m)). `blocks`: changes to BLOCKS.
  """
  from jax.experimental.pallas.ops.gpu import decode_attention as da

  b, h, s, k = k_BxHxSxDh.shape
  kw = _blocks(s, blocks)
  inner = functools.partial(
      da.decode_attn_unbatched, sm_scale=scale, block_h=16, grid=None, interpret=interpret,
      debug=False, return_residuals=True, normalize_output=True, **kw)
  lengths_BxH = jnp.broadcast_to(lengths_B[:, None], (b, h)).astype(jnp.int32)
  o, (l, m) = jax.vmap(jax.vmap(inner))(q_BxHxDh[:, :, None, :], k_BxHxSxDh, v_BxHxSxDh,
                                        None, lengths_BxH)
  return o[:, :, 0], l[:, :, 0], m[:, :, 0]


def attend_decode(q_BxHxDh, k_BxHxSxDh, v_BxHxSxDh, pos_B, k_new_BxHxDh, v_new_BxHxDh,
                  scale: float, interpret: bool):
  """One new query per sequence over its cache (positions < pos_B) and its own new key.

  Returns [B, H, Dh] float32.
  """
  o_c, l_c, m_c = cache_attention(q_BxHxDh, k_BxHxSxDh, v_BxHxSxDh, pos_B, scale, interpret)
  f32 = jnp.float32
  s_new = jnp.einsum("bhk,bhk->bh", q_BxHxDh.astype(f32), k_new_BxHxDh.astype(f32)) * scale
  has_cache = (l_c > 0) & jnp.isfinite(m_c)
  m = jnp.where(has_cache, jnp.maximum(m_c, s_new), s_new)
  w_cache = jnp.where(has_cache, l_c * jnp.exp(m_c - m), 0.0)
  w_new = jnp.exp(s_new - m)
  o = (jnp.where(has_cache[..., None], o_c.astype(f32), 0.0) * w_cache[..., None]
       + v_new_BxHxDh.astype(f32) * w_new[..., None])
  return o / (w_cache + w_new)[..., None]
