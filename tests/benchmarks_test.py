"""The GPU benchmark scripts' logic on the CPU: every kernel variant benchmarks/decode_parts.py
names is a valid --expert_blocks spec for the seed's shapes, a part runs end to end
through the Pallas interpreter (--cpu_check: tiny shapes), and h200_x4.sh runs every part
its usage names and refuses others before writing anything."""

import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks import decode_parts
from jax_ep.kernels import grouped_matmul as gm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("swiglu,variants", [
    *[(False, v) for v in decode_parts.KERNEL_SETS.values()],
    *[(True, v) for v in decode_parts.SWIGLU_SETS.values()]])
def test_every_variant_tiles_the_seed(swiglu, variants):
  for name, spec in variants.items():
    up, down = gm.mlp_blocks(decode_parts.D, decode_parts.F, swiglu, spec)
    assert gm.mlp_supports(decode_parts.D, decode_parts.F, swiglu, spec) is None, name
    if spec:  # a variant changes what it says
      assert (up, down) != gm.mlp_blocks(decode_parts.D, decode_parts.F, swiglu), name


def test_attention_variants_change_the_kernels_blocks_for_the_step_and_restore_them(
    monkeypatch):
  from jax_ep.kernels import decode_attention

  for name, change in decode_parts.ATTENTION_VARIANTS.items():
    assert set(change) <= set(decode_attention.BLOCKS), name
    s = 64 // change.get("k_splits", 1)  # the part's cache of 64 positions, per split
    assert s >= 16 and s % min(change.get("block_k") or 16, s) == 0, name
  # The step part runs each variant with its blocks in force, and the defaults after.
  default, seen = dict(decode_attention.BLOCKS), []
  record = {k: 1.0 for k in ("tpot_ms", "tpot_synced_ms", "floor_ms", "achieved_floor_fraction",
                             "floor_ops_ms", "imbalance", "context_len")}
  monkeypatch.setattr(decode_parts, "MODEL", "tiny")
  monkeypatch.setattr(decode_parts, "INTERPRET", True)
  monkeypatch.setattr(decode_parts, "T", 16)
  monkeypatch.setattr(decode_parts.runner, "run_one",
                      lambda *a: seen.append(dict(decode_attention.BLOCKS)) or (record, None))
  out = decode_parts.part_attention_step(None, ["k16_s3", "default", "k16_s3"],
                                         lambda m: None, ("tiny", "share"))
  assert list(out) == ["tiny k16_s3", "tiny default", "tiny k16_s3 (2)", "share k16_s3",
                       "share default", "share k16_s3 (2)"]
  assert seen == [{**default, "num_stages": 3}, default, {**default, "num_stages": 3}] * 2
  # Blocks the step's cache cannot take are not run under their name (XLA would run).
  seen.clear()
  monkeypatch.setattr(decode_attention, "supports", lambda *a: False)
  out = decode_parts.part_attention_step(None, ["k64_w4_s3"], lambda m: None, ("tiny",))
  assert not seen and "do not fit" in out["tiny k64_w4_s3"]["error"]
  assert decode_attention.BLOCKS == default
  # "best": the attention part's variant of least mean time over its lengths.
  runs = {"len48": {"default": {"ms": 2.0}, "k16": {"ms": 1.0}, "xla": {"ms": 0.1},
                    "k32": {"error": "x"}},
          "len58": {"default": {"ms": 2.0}, "k16": {"ms": 1.5}, "xla": {"ms": 0.1},
                    "k32": {"ms": 0.5}}}
  assert decode_parts.fastest(runs) == "k16" and decode_parts.fastest({}) is None


@pytest.mark.parametrize("t,e,k", [(16, 4, 2), (1024, 16, 2), (64, 16, 4)])
def test_the_balanced_router_gives_every_expert_the_mean_rows(t, e, k):
  import jax
  import jax.numpy as jnp
  import numpy as np

  logits = jax.random.normal(jax.random.key(0), (t, e))
  weights, experts = decode_parts.balanced_top_k_gate(logits, k)
  experts = np.asarray(experts)
  assert np.bincount(experts.ravel(), minlength=e).tolist() == [t * k // e] * e
  assert all(len(set(row)) == k for row in experts.tolist())  # k distinct experts a token
  picked = np.take_along_axis(np.asarray(logits), experts, axis=1)
  np.testing.assert_allclose(weights, jax.nn.softmax(jnp.asarray(picked), axis=-1), rtol=1e-6)


@pytest.mark.parametrize("t,e,k", [(16, 6, 4), (20, 16, 2)])
def test_the_balanced_router_refuses_shapes_it_cannot_balance(t, e, k):
  import jax.numpy as jnp

  with pytest.raises(ValueError, match="multiple"):
    decode_parts.balanced_top_k_gate(jnp.zeros((t, e)), k)


def test_the_router_part_traces_each_router_and_restores_the_models(monkeypatch):
  from jax_ep import routing

  model_router, seen = routing.top_k_gate, []
  record = {k: 1.0 for k in ("tpot_ms", "tpot_synced_ms", "floor_ms", "achieved_floor_fraction",
                             "floor_ops_ms", "imbalance", "context_len")}
  monkeypatch.setattr(decode_parts, "MODEL", "tiny")
  monkeypatch.setattr(decode_parts, "INTERPRET", True)
  monkeypatch.setattr(decode_parts, "T", 16)
  kernels_mlp = gm.grouped_mlp
  traced = lambda *a: seen.append((routing.top_k_gate, gm.grouped_mlp)) or (record, None)
  monkeypatch.setattr(decode_parts.runner, "run_one", traced)
  out = decode_parts.part_router_step(None, ["default", "balanced", "balanced_einsum", "default"],
                                      lambda m: None, ("tiny",))
  assert list(out) == ["tiny default", "tiny balanced", "tiny balanced_einsum",
                       "tiny default (2)"]
  balanced = decode_parts.balanced_top_k_gate
  assert seen == [(model_router, kernels_mlp), (balanced, kernels_mlp),
                  (balanced, decode_parts.balanced_einsum_mlp), (model_router, kernels_mlp)]
  assert routing.top_k_gate is model_router and gm.grouped_mlp is kernels_mlp
  # A run that fails is reported and the rest run; the model's router is restored.
  monkeypatch.setattr(decode_parts.runner, "run_one", lambda *a: 1 / 0)
  out = decode_parts.part_router_step(None, ["balanced_einsum", "default"], lambda m: None,
                                      ("tiny",))
  assert all("ZeroDivisionError" in r["error"] for r in out.values()) and len(out) == 2
  assert routing.top_k_gate is model_router and gm.grouped_mlp is kernels_mlp
  monkeypatch.setattr(decode_parts, "_step_setup", lambda *a: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    decode_parts.part_router_step(None, ["balanced"], lambda m: None, ("tiny",))
  assert routing.top_k_gate is model_router and gm.grouped_mlp is kernels_mlp


def test_the_router_part_runs_each_router_in_its_own_compiled_step(monkeypatch):
  # The bench's real run (no stub): the balanced router's step gives every expert the
  # same rows and the model's does not, so neither reuses the other's traced step.
  from jax_ep.perf.hardware import Hardware

  hw = Hardware("cpu", 1e11, 1e11, 1e10, 1e9, 1, 1e-6)
  monkeypatch.setattr(decode_parts, "MODEL", "tiny")
  monkeypatch.setattr(decode_parts, "INTERPRET", True)
  monkeypatch.setattr(decode_parts, "T", 16)
  out = decode_parts.part_router_step(hw, ["default", "balanced"], lambda m: None, ("tiny",))
  assert out["tiny balanced"]["imbalance"] == pytest.approx(1.0)
  assert out["tiny default"]["imbalance"] > 1.2
  assert out["tiny default"]["floor_ms"] == out["tiny balanced"]["floor_ms"]


@pytest.mark.parametrize("swiglu", [False, True])
def test_the_einsum_mlp_is_the_grouped_mlp_on_balanced_rows(swiglu):
  import jax
  import jax.numpy as jnp
  import numpy as np

  g, c, d, f = 4, 8, 16, 32
  keys = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(keys[0], (g * c, d))
  w_up, w_gate = (jax.random.normal(k, (g, d, f)) * d ** -0.5 for k in keys[1:3])
  w_down = jax.random.normal(keys[3], (g, f, d)) * f ** -0.5
  gate = w_gate if swiglu else None
  sizes = jnp.full((g,), c, jnp.int32)
  want = gm.grouped_mlp(x, sizes, w_up, w_down, gate, impl="xla")
  got = decode_parts.balanced_einsum_mlp(x, sizes, w_up, w_down, gate)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  padded = decode_parts.balanced_einsum_mlp(x, sizes, w_up, w_down, gate, padded=True)
  np.testing.assert_array_equal(padded[:g * c], got)


def test_the_swiglu_part_runs_through_the_interpreter(tmp_path):
  out = tmp_path / "parts.json"
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  proc = subprocess.run(
      # The swiglu part (the kernel part is the same code with GELU's blocks).
      [sys.executable, "benchmarks/decode_parts.py", "--cpu_check", "--parts=swiglu",
       "--swiglu_set=smoke", "--row_sets=seed_layer3", f"--out={out}"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(out.read_text())["swiglu"]["seed_layer3"]
  assert sorted(got) == sorted(decode_parts.SWIGLU_SETS["smoke"])
  assert all(v["max_abs_diff_vs_first"] < 1e-2 for v in got.values()), got


def test_every_part_of_the_gpu_script_has_its_branch(tmp_path):
  # benchmarks/scripts/h200_x4.sh: the parts its usage names are the parts it runs, and an
  # unknown part is refused before anything runs (a lost device call otherwise).
  script = os.path.join(ROOT, "benchmarks", "scripts", "h200_x4.sh")
  text = open(script).read()
  proc = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True,
                        env={**os.environ, "OUT": str(tmp_path)}, timeout=60)
  assert proc.returncode == 2 and "unknown PART 'bogus'" in proc.stderr
  named = proc.stderr.split("use ")[1].replace(" or ", ", ").strip().split(", ")
  branches = re.findall(r'if \[ "\$PART" = (\w+) \]', text)
  assert sorted(named) == sorted(branches) and len(named) >= 10, (named, branches)
  assert not list(tmp_path.iterdir())  # refused before writing anything
  assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_the_pairs_variants_tile_the_seed():
  seen = set()
  for name, (pairs, spec) in decode_parts.PAIRS_VARIANTS.items():
    up, down = gm.mlp_blocks(decode_parts.D, decode_parts.F, not pairs, spec, pairs=pairs)
    assert gm._supports(decode_parts.D, decode_parts.D, (2 if pairs else 1) * decode_parts.F,
                        up) is None, name
    seen.add((pairs, up, down))
  # every variant but the repeated first is a different kernel
  assert len(seen) == len(decode_parts.PAIRS_VARIANTS) - 1

