"""placement.rows against the shardings jax derives from the same table, and its text."""

import jax
import pytest
from jax.sharding import NamedSharding

from configs import deployments, load_model
from jax_ep import placement
from jax_ep.config import DeploymentConfig
from jax_ep.engine import Engine


def _as_range(s: slice, size: int) -> range:
  return range(*s.indices(size))


@pytest.mark.parametrize("name", ["seed_proposed", "seed_baseline", "tp_placement"])
def test_rows_are_the_shards_jax_places(name):
  cfg = load_model("seed")
  dep = (DeploymentConfig(kind="proposed", stages=2, expert=4, tp=2, placement="tp")
         if name == "tp_placement" else deployments.PRESETS[name])
  engine = Engine(cfg, dep)  # abstract: nothing is allocated or compiled
  rows = placement.rows(cfg, dep, jax.devices(), batch=1024)
  assert [(r.process, r.device) for r in rows] == [
      (d.process_index, d.id) for d in engine.mesh.devices.ravel()]
  t = engine.table
  L, E, D, F, H, Dh, V = (cfg.num_layers, cfg.num_experts, cfg.model_dim, cfg.mlp_dim,
                          cfg.num_heads, cfg.head_dim, cfg.vocab_size)

  def where(spec, shape):
    return NamedSharding(engine.mesh, spec).devices_indices_map(shape)

  norm, up = where(t.norm_LxD, (L, D)), where(t.expert_in_LxExDxF, (L, E, D, F))
  wq, head = where(t.attn_in_LxDxHxDh, (L, D, H, Dh)), where(t.unembed_DxV, (D, V))
  tokens = where(t.tokens_BxT, (1024, 1))
  by_id = {d.id: d for d in engine.mesh.devices.ravel()}
  for r in rows:
    d = by_id[r.device]
    assert r.layers == _as_range(norm[d][0], L)
    assert (r.experts, r.mlp_cols) == (_as_range(up[d][1], E), _as_range(up[d][3], F))
    assert r.heads == _as_range(wq[d][2], H) and r.vocab == _as_range(head[d][1], V)
    assert r.batch_rows == _as_range(tokens[d][0], 1024)
  # What the README says each device holds.
  if name == "seed_proposed":
    assert all(len(r.layers) == 1 and len(r.experts) == 1 and len(r.heads) == 16 for r in rows)
  if name == "seed_baseline":
    assert all(len(r.layers) == 2 and len(r.experts) == 2 and len(r.heads) == 2 for r in rows)


def test_table_of_seed_proposed_on_8_hosts():
  cfg, dep = load_model("seed"), deployments.PRESETS["seed_proposed"]
  text = placement.format_table(cfg, dep, placement.rows(cfg, dep, placement.virtual_devices(8, 8)))
  lines = text.splitlines()
  assert lines[0].split() == ["process", "device", "stage", "expert", "tp", "layers/4",
                              "experts/16", "mlp", "cols/32768", "heads/16", "vocab/32768"]
  assert len(lines) == 1 + 64 + 1
  assert lines[1].split() == ["0", "0", "0", "0", "0", "0", "0", "all", "all", "0-2047"]
  assert lines[64].split() == ["7", "63", "3", "15", "0", "3", "15", "all", "all", "30720-32767"]
  assert lines[-1] == ("64 devices on 8 processes; a tp group (1 device) spans at most 1 "
                       "process, a stage (16 devices: its layers' experts) at most 2.")
