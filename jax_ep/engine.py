"""A model laid out on a deployment: sharded parameters and cache, the jitted forward.

Parameters are created straight into their shards (jit with out_shardings), so no
device ever holds another device's expert. The forward is one shard_map over the
(stage, expert, tp) mesh: embed -> pipeline of stages (pipeline.py) -> head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep import ep, pipeline, sharding
from jax_ep.config import ConfigError, DeploymentConfig, ModelConfig
from jax_ep.kv_cache import KVCache
from jax_ep.mesh import make_mesh
from jax_ep.model import Transformer


class Engine:
  """One model on one deployment's mesh."""

  def __init__(self, cfg: ModelConfig, dep: DeploymentConfig, mesh=None):
    dep.check_model(cfg)
    self.cfg, self.dep = cfg, dep
    self.mesh = make_mesh(dep) if mesh is None else mesh
    if tuple(self.mesh.shape.values()) != dep.mesh_shape:
      raise ConfigError(f"mesh {dict(self.mesh.shape)} does not match {dep.describe()}.")
    self.par = ep.Parallel.of(dep)
    self.table = sharding.table_for(dep)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    self.graphdef, self.abstract_params = nnx.split(abstract)
    self.param_specs = sharding.param_specs(self.abstract_params, self.table)
    self.param_shardings = sharding.named(self.mesh, self.param_specs)
    kv = self.table.kv_LxBxSxHxK
    self.cache_specs = KVCache(kv, kv)
    self.cache_shardings = sharding.named(self.mesh, self.cache_specs)

  # --- state ------------------------------------------------------------------------------

  def init_params(self, seed: int = 0):
    """Random parameters, each created on the devices that hold it."""

    def init():
      return nnx.split(Transformer(self.cfg, nnx.Rngs(seed)))[1]

    return jax.jit(init, out_shardings=self.param_shardings)()

  def place_params(self, params):
    """Lays out parameters from anywhere (e.g. another deployment) on this mesh."""
    return jax.device_put(params, self.param_shardings)

  def init_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    self.dep.check_batch(batch)
    return jax.jit(lambda: KVCache.zeros(self.cfg, batch, max_len),
                   out_shardings=self.cache_shardings)()

  def abstract_cache(self, batch: int, max_len: int | None = None) -> KVCache:
    shape = KVCache.shape(self.cfg, batch, max_len)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(shape, self.cfg.jnp_dtype, sharding=s),
                        self.cache_shardings)

  def tokens_sharding(self):
    return NamedSharding(self.mesh, self.table.tokens_BxT)

  # --- forward ----------------------------------------------------------------------------

  def _shard_forward(self, last_only: bool):
    cfg, par, m = self.cfg, self.par, self.dep.microbatches

    def forward_(params_, cache_, tokens_BxT_, pos):
      model_ = nnx.merge(self.graphdef, params_)
      b, t = tokens_BxT_.shape
      with jax.named_scope("embed"):
        x_ = model_.embed(tokens_BxT_).reshape(m, b // m, t, cfg.model_dim)
      out_, cache_, stats = pipeline.run(model_, x_, cache_, pos, par)
      h_ = out_.reshape(b, t, cfg.model_dim)
      if last_only:
        h_ = h_[:, -1:]
      with jax.named_scope("head"):
        logits_ = model_.head(h_)
      stats = ep.MoEStats(ep.psum_batch(stats.load_E, par), ep.psum_batch(stats.dropped, par),
                          stats.rounds)
      return logits_, cache_, stats

    t = self.table
    stats_specs = ep.MoEStats(t.load_LxE, t.load_LxE, t.load_LxE)
    return jax.shard_map(
        forward_, mesh=self.mesh,
        in_specs=(self.param_specs, self.cache_specs, t.tokens_BxT, P()),
        out_specs=(t.logits_BxTxV, self.cache_specs, stats_specs),
        check_vma=False)

  @functools.cached_property
  def forward(self):
    """jit(params, cache, tokens [B, T], pos) -> (logits [B, T, V] f32, cache, MoEStats).

    The cache is donated: it is updated in place.
    """
    return jax.jit(self._shard_forward(last_only=False), donate_argnums=(1,))

  @functools.cached_property
  def forward_last(self):
    """Like `forward`, logits of the last position only: [B, 1, V]."""
    return jax.jit(self._shard_forward(last_only=True), donate_argnums=(1,))

  def check_tokens(self, tokens_BxT, pos: int = 0, max_len: int | None = None):
    """Host-side checks before anything compiles; raises ConfigError."""
    import numpy as np

    tokens = np.asarray(tokens_BxT)
    if tokens.ndim != 2:
      raise ConfigError(f"tokens must be [batch, length], got shape {tokens.shape}.")
    b, t = tokens.shape
    if b == 0 or t == 0:
      raise ConfigError(f"tokens has an empty dimension: shape {tokens.shape}; "
                        "need at least one sequence of at least one token.")
    self.dep.check_batch(b)
    bad = (tokens < 0) | (tokens >= self.cfg.vocab_size)
    if bad.any():
      i = tuple(int(v) for v in np.argwhere(bad)[0])
      raise ConfigError(f"token id {int(tokens[i])} at {i} is outside the vocabulary "
                        f"[0, {self.cfg.vocab_size}).")
    cap = max_len or self.cfg.max_seq_len
    if pos + t > cap:
      raise ConfigError(f"{pos} cached + {t} new tokens exceed the KV cache length {cap} "
                        "(max_seq_len); shorten the prompt or raise max_seq_len.")
    return jnp.asarray(tokens, jnp.int32)
