"""Tests for jax_ep/pipeline.py: prefill's GPipe over 2 stages (2 devices, shard_map) and 2
micro-batches computes what one device computes (model.Transformer.__call__): the last
stage's output of every micro-batch, every layer's keys and values in its stage's cache,
and each (token, pick) routed once, bubbles adding nothing."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from numpy.testing import assert_allclose, assert_array_equal

from configs import load_model
from jax_ep import ep, model, pipeline
from jax_ep import params as param_layouts
from jax_ep.kv_cache import StagedKVCache
from jax_ep.mesh import AXES, STAGE
from jax_ep.model import Transformer
from tests import reference

STAGES, MICRO, B, T, S = 2, 2, 4, 3, 8  # stages, micro-batches, batch, prompt, cache


def test_two_stages_two_microbatches_equal_one_device():
  cfg = load_model("tiny")
  ref = reference.of(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  want, want_cache, want_stats = ref.forward(tokens, S)

  local = cfg.num_layers // STAGES
  layout = param_layouts.to_layout(ref.params, STAGES, local)  # layers[i]: [stages, ...]
  layer_graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))).layers)[0]
  par = ep.Parallel(stage=STAGES)
  mesh = Mesh(np.asarray(jax.devices()[:STAGES]).reshape(STAGES, 1, 1), AXES)

  def stage_(layers_, x_, cache_):
    layers = [nnx.merge(layer_graphdef, jax.tree.map(lambda a: a[0], p)) for p in layers_]
    return pipeline.run(layers, x_, cache_, 0, par)

  run = jax.jit(jax.shard_map(
      stage_, mesh=mesh, in_specs=(P(STAGE), P(), P(STAGE)),
      out_specs=(P(), P(STAGE), ep.MoEStats(P(STAGE), P(STAGE))), check_vma=False))
  x = model.embed(layout["embed_VxD"], tokens).reshape(MICRO, B // MICRO, T, cfg.model_dim)
  out, cache, stats = run(layout["layers"], x, StagedKVCache.zeros(cfg, STAGES, B, S))

  logits = model.head(out.reshape(B, T, cfg.model_dim), layout["final_norm"]["scale_D"],
                      layout["unembed_DxV"], cfg.norm_eps)
  assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  for got, whole in ((cache.k, want_cache.k_LxBxHxSxDh), (cache.v, want_cache.v_LxBxHxSxDh)):
    for s in range(STAGES):
      for i in range(local):  # stage s holds layer s * local + i
        assert_allclose(got[i][s], whole[s * local + i], rtol=1e-5, atol=1e-5)
  # Stats come stage by stage, each stage's local layers in order: the layer order.
  assert_array_equal(stats.load_E, want_stats.load_E)
  assert_array_equal(stats.dropped, 0)
