"""A model laid out on a deployment: sharded parameters and cache, the jitted programs.

Parameters are created straight into their shards (jit with out_shardings), so no
device ever holds another device's expert. Each program is one shard_map over the
(stage, expert, tp) mesh, returned jitted (call it, or lower and compile it ahead of
time): logits_program and prefill_program run embed -> pipeline of stages (pipeline.py)
-> head; decode_program runs the decode ring (ring.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ep import ep, model, numerics, pipeline, ring, sampling, sharding
from jax_ep import params as param_layouts
from jax_ep.config import ConfigError, DeploymentConfig, ModelConfig
from jax_ep.kv_cache import KVCache, StagedKVCache
from jax_ep.mesh import AXES, make_mesh
from jax_ep.model import Transformer


class Engine:
  """One model on one deployment's mesh.

  Parameters come in two layouts. The canonical one is the model's own nnx.State
  (layers stacked [L, ...]), used by checkpoints and for moving weights between
  deployments. The deployment layout, which this engine computes with, splits the
  stack per local layer: `layers[i]` holds layer s * L_local + i of every stage s as
  [stages, ...], sharded over `stage`; inside shard_map each device sees [1, ...], and
  picking its layer is a reshape, not a copy of the weights (a copy would double
  the bytes a weights-bound decode step reads, and its memory).
  """

  def __init__(self, cfg: ModelConfig, dep: DeploymentConfig, mesh=None,
               watch: numerics.LayerWatch | None = None):
    """`watch`: report every layer's non-finite outputs to it (--check_numerics; off the
    compiled programs when None)."""
    if not isinstance(dep, DeploymentConfig):
      raise TypeError(f"Engine takes a DeploymentConfig, not {type(dep).__name__} {dep!r}; "
                      "a preset by name: jax_ep.presets.deployments.resolve(name, "
                      "num_devices), e.g. resolve('proposed', 8).")
    dep.check_model(cfg)
    self.cfg, self.dep, self.watch = cfg, dep, watch
    self.mesh = make_mesh(dep) if mesh is None else mesh
    want = dict(zip(AXES, dep.mesh_shape, strict=True))
    if dict(self.mesh.shape) != want:
      raise ConfigError(f"mesh {dict(self.mesh.shape)} does not match {dep.describe()}: "
                        f"it needs axes {want}; build it with jax_ep.mesh.make_mesh.")
    platform = self.mesh.devices.flat[0].platform
    if dep.kernels == "pallas" and platform != "gpu":
      raise ConfigError(f"DeploymentConfig.kernels=pallas runs the Triton kernels, which need a "
                        f"GPU; these devices are {platform}: use kernels=interpret (the same "
                        "kernels through Pallas' interpreter), xla or auto.")
    self.par = ep.Parallel.of(dep)
    self.table = sharding.table_for(dep)
    self.local_layers = cfg.num_layers // dep.stages
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    self.graphdef, self.abstract_canonical = nnx.split(abstract)
    self.layer_graphdef = nnx.split(abstract.layers)[0]
    self.abstract_params = jax.eval_shape(self.to_layout, self.abstract_canonical)
    self.param_specs = sharding.param_specs(self.abstract_params, self.table)
    self.param_shardings = sharding.named(self.mesh, self.param_specs)
    kv = (self.table.kv_LxBxHxSxDh,) * self.local_layers
    self.cache_specs = StagedKVCache(kv, kv)
    self.cache_shardings = sharding.named(self.mesh, self.cache_specs)

  # --- layouts ----------------------------------------------------------------------------

  def to_layout(self, canonical):
    """Canonical nnx.State (layers [L, ...]) -> this deployment's layout."""
    return param_layouts.to_layout(canonical, self.dep.stages, self.local_layers)

  def to_canonical(self, params):
    """This deployment's layout -> canonical nnx.State (for checkpoints, other meshes)."""
    return param_layouts.to_canonical_fn(self.cfg.num_layers)(params)

  def canonical_params(self, params):
    """to_canonical with each shard kept on the devices that hold it (what a checkpoint
    saves: every device writes its own shards, none gathers the model)."""
    return jax.jit(self.to_canonical,
                   out_shardings=param_layouts.canonical_shardings_of(params))(params)

  # --- state ------------------------------------------------------------------------------

  def init_params(self, seed: int = 0):
    """Random parameters in this deployment's layout, each created where it is held."""

    def init():
      return self.to_layout(nnx.split(Transformer(self.cfg, nnx.Rngs(seed)))[1])

    return jax.jit(init, out_shardings=self.param_shardings)()

  def place_params(self, params):
    """Lays out parameters, canonical or from any deployment, on this mesh (params.place).

    Raises ConfigError if they are not parameters of this engine's model.
    """
    return param_layouts.place(self, params)

  def init_cache(self, batch: int, max_len: int | None = None) -> StagedKVCache:
    self.dep.check_batch(batch)
    return jax.jit(lambda: StagedKVCache.zeros(self.cfg, self.dep.stages, batch, max_len),
                   out_shardings=self.cache_shardings)()

  def abstract_cache(self, batch: int, max_len: int | None = None) -> StagedKVCache:
    shape = jax.eval_shape(
        lambda: StagedKVCache.zeros(self.cfg, self.dep.stages, batch, max_len)).k[0].shape
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(shape, self.cfg.jnp_dtype, sharding=s),
                        self.cache_shardings)

  def canonical_cache(self, cache: StagedKVCache) -> KVCache:
    """The cache in layer order, [L, B, H, S, Dh] (for inspection; copies it)."""
    def stack(parts):
      a = jnp.stack(parts, axis=1)  # [stages, L_local, ...]
      return a.reshape(self.cfg.num_layers, *a.shape[2:])

    return KVCache(stack(cache.k), stack(cache.v))

  def tokens_sharding(self):
    return NamedSharding(self.mesh, self.table.tokens_BxT)

  # --- programs --------------------------------------------------------------------------

  def _layers(self, params_):
    layers = [nnx.merge(self.layer_graphdef, jax.tree.map(lambda a: a[0], p))
              for p in params_["layers"]]
    if self.watch is None:
      return layers
    first = ep.stage_index(self.par) * self.local_layers  # this stage's first layer
    return [numerics.Watched(layer, first + i, self.watch) for i, layer in enumerate(layers)]

  def _shard_prefill(self, mode: str, temperature: float = 0.0):
    """shard_map body: embed -> pipeline of stages -> head on the vocabulary shards.

    mode "logits": logits of every position [B, T, V] (split over the vocabulary);
    "sample": the next token [B] of every sequence (replicated); "cache": no head (an
    early prefill chunk only fills the cache).
    """
    cfg, par, m = self.cfg, self.par, self.dep.microbatches

    def forward_(params_, cache_, tokens_BxT_, pos, key):
      b, t = tokens_BxT_.shape
      with jax.named_scope("embed"):
        x_ = model.embed(params_["embed_VxD"][...], tokens_BxT_)
        x_ = x_.reshape(m, b // m, t, cfg.model_dim)
      out_, cache_, stats = pipeline.run(self._layers(params_), x_, cache_, pos, par)
      stats = ep.MoEStats(ep.psum_batch(stats.load_E, par), ep.psum_batch(stats.dropped, par))
      if mode == "cache":
        return cache_, stats
      h_ = out_.reshape(b, t, cfg.model_dim)
      if mode == "sample":
        h_ = h_[:, -1:]
      with jax.named_scope("head"):
        hg_ = ep.gather_batch(h_, par)  # every row, for this device's vocabulary columns
        unembed_ = params_["unembed_DxV"][...]
        logits_ = model.head(hg_, params_["final_norm"]["scale_D"][...], unembed_,
                             cfg.norm_eps)
        if mode == "logits":
          return logits_, cache_, stats
        rows = hg_.shape[0]
        seq_B = jnp.arange(rows, dtype=jnp.int32)
        score, vid = sampling.local_best(logits_[:, -1], ep.vocab_shard(par) * unembed_.shape[1],
                                         temperature, key, seq_B, jnp.full((rows,), pos + t))
        return ep.best_over_vocab(score, vid, par), cache_, stats

    t = self.table
    stats_specs = ep.MoEStats(t.load_LxE, t.load_LxE)
    out = {"logits": t.logits_BxTxV, "sample": P(), "cache": None}[mode]
    out_specs = (self.cache_specs, stats_specs) if out is None else (out, self.cache_specs,
                                                                     stats_specs)
    return jax.shard_map(
        forward_, mesh=self.mesh,
        in_specs=(self.param_specs, self.cache_specs, t.tokens_BxT, P(), P()),
        out_specs=out_specs, check_vma=False)

  @functools.cache  # noqa: B019 - one jit per engine, kept for its life
  def logits_program(self):
    """jit(params, cache, tokens [B, T], pos) -> (logits [B, T, V] f32, cache, MoEStats).

    Every sequence starts at `pos`. The cache is donated: it is updated in place. MoE
    stats are per layer, in stage order: load [L, E] summed over the batch, dropped [L].
    """
    f = self._shard_prefill("logits")
    return jax.jit(lambda params, cache, tokens, pos: f(params, cache, tokens, pos,
                                                       jax.random.key(0)),
                   donate_argnums=(1,))

  @functools.cache  # noqa: B019 - one jit per (engine, arguments), kept for its life
  def prefill_program(self, temperature: float = 0.0, sample: bool = True):
    """jit(params, cache, tokens [B, T], pos, key) -> (next tokens [B], cache, MoEStats),
    or without `sample` (cache, MoEStats): an early chunk of a chunked prefill.

    The next token is sampled at position pos + T (sampling.py: the same on every
    deployment). The cache is donated. A cache of another batch than the tokens' is a
    ConfigError when the program is traced (shapes are static).
    """
    program = self._shard_prefill("sample" if sample else "cache", temperature)

    def prefill(params, cache, tokens_BxT, pos, key):
      cache_batch = cache.k[0].shape[1]
      if tokens_BxT.shape[0] != cache_batch:
        raise ConfigError(f"the cache holds {cache_batch} sequences and tokens "
                          f"{tokens_BxT.shape[0]}; make it with init_cache("
                          f"{tokens_BxT.shape[0]}, max_len).")
      return program(params, cache, tokens_BxT, pos, key)

    return jax.jit(prefill, donate_argnums=(1,))

  def decode_state_specs(self) -> ring.DecodeState:
    """The decode state's PartitionSpecs: a DecodeState of them."""
    return ring.DecodeState(P(), P(), self.table.inflight_NxBgxD, P(), self.cache_specs)

  @functools.cache  # noqa: B019 - one jit per (engine, arguments), kept for its life
  def decode_program(self, batch: int, steps: int, temperature: float = 0.0):
    """jit(params, DecodeState, key) -> (DecodeState, DecodeOutput, MoEStats): `steps`
    micro-steps of the decode ring (ring.py). The state, cache included, is donated."""
    cfg, par, groups = self.cfg, self.par, self.dep.groups

    def decode_(params_, state_, key):
      state_, out, stats = ring.run(
          self._layers(params_), params_, state_, key, steps=steps, groups=groups,
          batch=batch, temperature=temperature, norm_eps=cfg.norm_eps, par=par)
      stats = ep.MoEStats(ep.psum_batch(stats.load_E, par), ep.psum_batch(stats.dropped, par))
      return state_, out, stats

    t = self.table
    stats_specs = ep.MoEStats(t.load_LxE, t.load_LxE)
    out_specs = ring.DecodeOutput(P(), P(), P())
    state_specs = self.decode_state_specs()
    f = jax.shard_map(
        decode_, mesh=self.mesh, in_specs=(self.param_specs, state_specs, P()),
        out_specs=(state_specs, out_specs, stats_specs), check_vma=False)
    return jax.jit(f, donate_argnums=(1,))

  def _decode_start(self, tokens_B, pos_B) -> ring.DecodeState:
    """The decode state's arrays but the cache (left None)."""
    bg = tokens_B.shape[0] // self.dep.groups
    return ring.DecodeState(
        tokens_B.astype(jnp.int32), pos_B.astype(jnp.int32),
        jnp.zeros((self.dep.stages, bg, self.cfg.model_dim), self.cfg.jnp_dtype),
        jnp.zeros((), jnp.int32), None)

  def _decode_start_shardings(self):
    return sharding.named(self.mesh, self.decode_state_specs()._replace(cache=None))

  def decode_state(self, tokens_B, pos_B, cache: StagedKVCache) -> ring.DecodeState:
    """The decode state after prefill: each sequence's next token and the position it
    takes [B], and the cache prefill filled (held as it is, not copied)."""
    b = tokens_B.shape[0]
    self.dep.check_batch(b)
    if cache.k[0].shape[1] != b:
      raise ConfigError(f"the cache holds {cache.k[0].shape[1]} sequences, the tokens {b}.")
    start = jax.jit(self._decode_start, out_shardings=self._decode_start_shardings())
    return start(tokens_B, pos_B)._replace(cache=cache)

  def abstract_decode_state(self, batch: int, max_len: int | None = None) -> ring.DecodeState:
    """The decode state's shapes, dtypes and shardings, nothing allocated: what
    decode_program lowers for ahead of time."""
    self.dep.check_batch(batch)
    b = jax.ShapeDtypeStruct((batch,), jnp.int32)
    start = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         jax.eval_shape(self._decode_start, b, b),
                         self._decode_start_shardings())
    return start._replace(cache=self.abstract_cache(batch, max_len))

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
    tokens = numerics.check_token_ids(tokens, self.cfg.vocab_size)
    cap = max_len or self.cfg.max_seq_len
    if pos + t > cap:
      raise ConfigError(f"{pos} cached + {t} new tokens exceed the KV cache length {cap} "
                        "(max_seq_len); shorten the prompt or raise max_seq_len.")
    return jnp.asarray(tokens, jnp.int32)
