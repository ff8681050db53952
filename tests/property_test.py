"""Property tests (hypothesis): random small valid configs compute, on their deployment,
what one device computes (model.Transformer.__call__, tests/reference.py); random
configs that break a documented rule are refused with ConfigError before anything
compiles, never with another exception.

Examples are bounded and derandomized (the same examples on every run, so CI is
reproducible): a few valid ones, since each compiles two programs, and many invalid ones,
which compile nothing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from jax_ep import memory
from jax_ep.config import ConfigError, DeploymentConfig, ModelConfig
from jax_ep.engine import Engine
from tests import reference

PROMPT, CACHE = 3, 8
BOUNDED = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow])


def _model(layers, experts, top_k, heads, mlp_kind="gelu"):
  return ModelConfig(num_layers=layers, num_experts=experts, top_k=top_k, num_heads=heads,
                     head_dim=4, model_dim=4 * heads, mlp_dim=16, mlp_kind=mlp_kind,
                     vocab_size=64, max_seq_len=CACHE, dtype="float32")


@st.composite
def valid_cases(draw):
  layers = draw(st.sampled_from([1, 2, 4]))
  experts = draw(st.sampled_from([2, 4, 8]))
  top_k = draw(st.integers(1, min(3, experts)))
  heads = draw(st.sampled_from([2, 4]))
  stages = draw(st.sampled_from([s for s in (1, 2, 4) if layers % s == 0]))
  placement = draw(st.sampled_from(["ep", "tp"]))
  tp = draw(st.sampled_from([t for t in (1, 2) if heads % t == 0]))
  shards = lambda e: e * (tp if placement == "ep" else 1)
  expert = draw(st.sampled_from([e for e in (1, 2, 4) if experts % shards(e) == 0
                                 and 64 % (e * tp) == 0 and stages * e * tp <= 16]))
  micro = draw(st.sampled_from([m for m in (1, 2) if m <= stages or m == 1]))
  dep = DeploymentConfig(kind="proposed", stages=stages, expert=expert, tp=tp,
                         placement=placement, microbatches=micro,
                         decode_groups=draw(st.sampled_from([0, 1])))
  batch = dep.min_batch * draw(st.integers(1, 2))
  mlp_kind = draw(st.sampled_from(["gelu", "swiglu"]))
  return _model(layers, experts, top_k, heads, mlp_kind), dep, batch


def _logits(engine, params, tokens):
  cache = engine.init_cache(tokens.shape[0], CACHE)
  tokens = jax.device_put(tokens, engine.tokens_sharding())
  logits, _, stats = engine.logits_program()(params, cache, tokens, jnp.int32(0))
  return np.asarray(logits), np.asarray(stats.load_E)


@settings(max_examples=4, **BOUNDED)
@given(valid_cases())
def test_random_valid_configs_equal_one_device(case):
  cfg, dep, batch = case
  ref = reference.of(cfg)
  tokens = jnp.asarray(np.random.default_rng(batch).integers(0, 64, (batch, PROMPT)), jnp.int32)
  want, _, want_stats = ref.forward(tokens, CACHE)
  want, want_load = np.asarray(want), np.asarray(want_stats.load_E)
  engine = Engine(cfg, dep)
  got, load = _logits(engine, engine.place_params(ref.params), tokens)
  assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert (load.sum(1) == want_load.sum(1)).all()  # every (token, pick) counted once a layer


def _broken_rule(m: dict, d: dict, batch: int) -> str | None:
  """The first documented rule (config.py) that these fields break, or None."""
  ints_m = ("num_layers", "num_experts", "top_k", "num_heads", "head_dim", "vocab_size")
  if any(m[k] < 1 for k in ints_m) or m["mlp_dim"] < 1:
    return "positive"
  if m["top_k"] > m["num_experts"] or m["head_dim"] % 2:
    return "model"
  if any(d[k] < 1 for k in ("stages", "expert", "tp", "microbatches")) or d["decode_groups"] < 0:
    return "positive"
  shards = d["expert"] * (d["tp"] if d["placement"] == "ep" else 1)
  if (m["num_layers"] % d["stages"] or m["num_experts"] % shards or m["num_heads"] % d["tp"]
      or (d["placement"] == "tp" and m["mlp_dim"] % d["tp"])
      or m["vocab_size"] % (d["expert"] * d["tp"])):
    return "mesh"
  groups = d["decode_groups"] or d["stages"]
  if batch < 1 or batch % math.lcm(d["expert"] * d["microbatches"], d["expert"] * groups):
    return "batch"
  return None


def _mostly(good, bad):
  """Usually one of `good`, now and then one of `bad` (so the deeper rules are reached)."""
  return st.sampled_from(list(good) * 6 + list(bad))


@settings(max_examples=150, **BOUNDED)
@given(st.fixed_dictionaries({
    "num_layers": _mostly([1, 2, 3, 4, 6], [0]), "num_experts": _mostly([2, 3, 4, 8], [0]),
    "top_k": _mostly([1, 2, 3], [0, 9]), "num_heads": _mostly([1, 2, 3, 4], [0]),
    "head_dim": _mostly([2, 4], [0, 3]), "mlp_dim": _mostly([4, 6, 8, 12], [0]),
    "vocab_size": _mostly([12, 16, 48, 64], [0])}),
    st.fixed_dictionaries({
        "stages": _mostly([1, 2, 3, 4], [0, -1]), "expert": _mostly([1, 2, 3, 4], [0]),
        "tp": _mostly([1, 2, 3], [0]), "placement": st.sampled_from(["ep", "tp"]),
        "microbatches": _mostly([1, 2, 3], [0]), "decode_groups": _mostly([0, 1, 2, 3], [-1])}),
    _mostly(range(1, 25), [0, -2]))
def test_random_configs_are_refused_by_the_documented_rules(m, d, batch):
  rule = _broken_rule(m, d, batch)
  try:
    cfg = ModelConfig(**m, model_dim=m["num_heads"] * m["head_dim"], dtype="float32",
                      max_seq_len=CACHE)
    dep = DeploymentConfig(kind="proposed", **d)
    # What generate checks before it compiles: the layout, the batch, the plan, the mesh
    # and the request (devices: 64 simulated).
    memory.footprint(cfg, dep, batch, PROMPT, CACHE, platform="cpu")
    if dep.num_devices <= len(jax.devices()):
      Engine(cfg, dep).check_tokens(np.zeros((batch, PROMPT), np.int32), 0, CACHE)
  except ConfigError as e:
    assert rule is not None, f"refused a valid config: {e}"
    assert str(e), rule
    return
  assert rule is None, f"accepted a config that breaks the {rule} rule"
