"""Numeric guards: non-finite weights or inputs are clear errors, and an optional watch
(`--check_numerics`) names the first layer whose output is not finite.

The weight check runs on the devices where the arrays are (one small reduction per
leaf, one transfer of the counts), so it works on sharded parameters of any deployment
and never gathers them; use it after restoring or importing weights. The layer watch
is a `jax.debug.callback` per layer call inside the compiled programs, put there by
Engine only when asked for: without it the programs are unchanged.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from jax_ep.config import ConfigError


class NumericsError(ConfigError):
  """Weights, inputs or layer outputs that are NaN or infinite."""


def _path(path) -> str:
  names = (str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
  return "/".join(n for n in names if n != "value")


@jax.jit
def _bad_counts(leaves):
  """Per leaf: how many values are not finite, and the flat index of the first."""
  bad = [~jnp.isfinite(a).reshape(-1) for a in leaves]
  return (jnp.stack([jnp.sum(b).astype(jnp.int32) for b in bad]),
          jnp.stack([jnp.argmax(b).astype(jnp.int32) for b in bad]))


def nonfinite_leaves(tree) -> list[tuple[str, int, tuple[int, ...]]]:
  """(path, non-finite values, index of the first) of each floating leaf of `tree` that
  has any, in tree order. Computed where the arrays are; only the counts come back."""
  found = [(p, a) for p, a in jax.tree_util.tree_leaves_with_path(tree)
           if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
  if not found:
    return []
  counts, first = (np.asarray(x) for x in _bad_counts([a for _, a in found]))
  return [(_path(p), int(n), tuple(int(i) for i in np.unravel_index(int(f), np.shape(a))))
          for (p, a), n, f in zip(found, counts, first, strict=True) if n]


def check_finite(tree, what: str = "params") -> None:
  """Raises NumericsError naming the first leaf of `tree` with a NaN or an infinity."""
  bad = nonfinite_leaves(tree)
  if bad:
    path, n, index = bad[0]
    more = f" ({len(bad) - 1} more leaves too)" if len(bad) > 1 else ""
    raise NumericsError(f"{what}: {path} holds {n} NaN or infinite value(s), the first at "
                        f"{index}{more}. The weights are corrupt or were saved from a diverged "
                        "model; restore another checkpoint.")


def check_token_ids(tokens, vocab_size: int):
  """Token ids as int32 [B, T] on the host; raises ConfigError for NaN, infinities,
  fractions or ids outside [0, vocab_size)."""
  tokens = np.asarray(tokens)
  if not (np.issubdtype(tokens.dtype, np.integer) or np.issubdtype(tokens.dtype, np.floating)):
    raise ConfigError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
  if np.issubdtype(tokens.dtype, np.floating):
    bad = ~np.isfinite(tokens) | (tokens != np.round(tokens))
    if bad.any():
      i = tuple(int(v) for v in np.argwhere(bad)[0])
      raise NumericsError(f"token {tokens[i]} at {i} is not an integer id (NaN, infinite or "
                          "fractional); tokens must be integer ids.")
  bad = (tokens < 0) | (tokens >= vocab_size)
  if bad.any():
    i = tuple(int(v) for v in np.argwhere(bad)[0])
    raise ConfigError(f"token id {int(tokens[i])} at {i} is outside the vocabulary "
                      f"[0, {vocab_size}).")
  return tokens.astype(np.int32)


# --- the layer watch (--check_numerics) ----------------------------------------------------


class LayerWatch:
  """Collects, from inside the compiled programs, which layers produced non-finite
  output. Each record is (layer, position of its first new token, values that were not
  finite); bubbles (stand-in rows of the pipeline and ring) are not recorded."""

  def __init__(self):
    self._lock = threading.Lock()
    self.records: list[tuple[int, int, int]] = []
    self.calls = 0

  def reset(self) -> None:
    with self._lock:
      self.records, self.calls = [], 0

  def _record(self, layer, pos, bad, valid):
    with self._lock:
      self.calls += 1
      if bool(valid) and int(bad):
        self.records.append((int(layer), int(pos), int(bad)))

  def observe(self, layer_index, pos, out, valid):
    """In a traced layer call: report its output's non-finite count to the host."""
    bad = jnp.sum(~jnp.isfinite(out)).astype(jnp.int32)
    pos = jnp.min(jnp.asarray(pos, jnp.int32))
    jax.debug.callback(self._record, layer_index, pos, bad, jnp.asarray(valid))

  def first(self) -> tuple[int, int, int] | None:
    """The lowest layer that ever produced non-finite output (at its earliest position).

    Layers feed each other in order, and a non-finite output reaches later steps only
    as a sampled (integer) token, so the lowest such layer is where it started."""
    with self._lock:
      return min(self.records) if self.records else None

  def check(self) -> None:
    """Raises NumericsError naming the first layer whose output was not finite."""
    jax.effects_barrier()
    first = self.first()
    if first is None:
      return
    layer, pos, bad = first
    layers = sorted({r[0] for r in self.records})
    raise NumericsError(
        f"--check_numerics: layer {layer} produced {bad} NaN or infinite value(s) first, at "
        f"position {pos} (non-finite layers: {layers}). Its inputs were finite: look at "
        f"layer {layer}'s weights, or the activations' range in this dtype (float16 "
        "overflows past 65504).")


class Watched:
  """A decoder layer whose output is reported to a LayerWatch (pipeline.py and ring.py
  call layers as layer(h, k, v, pos, par, valid); everything else reads through)."""

  def __init__(self, layer, index, watch: LayerWatch):
    self._layer, self._index, self._watch = layer, index, watch

  def __getattr__(self, name):
    return getattr(self._layer, name)

  def __call__(self, x, k, v, pos, par, active=True):
    out = self._layer(x, k, v, pos, par, active)
    self._watch.observe(self._index, pos, out[0], active)
    return out
