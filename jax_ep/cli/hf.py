"""`jax-ep import-hf` and `jax-ep export-hf`: Mixtral-format weights (config.json and
*.safetensors) to a checkpoint and back (jax_ep/hf.py)."""

from __future__ import annotations

from jax_ep.cli import flags


def import_hf():
  """--src (a Hugging Face Mixtral directory) -> the checkpoint --workdir."""
  from jax_ep import hf

  flags.need("import-hf", flags.SRC, flags.WORKDIR)
  cfg = hf.import_hf(flags.SRC.value, flags.WORKDIR.value, log=print)
  print(f"imported {flags.SRC.value}: {cfg.num_layers} layers x {cfg.num_experts} experts "
        f"(top-{cfg.top_k}), D={cfg.model_dim}, F={cfg.mlp_dim}, V={cfg.vocab_size}, "
        f"{cfg.dtype} -> checkpoint {flags.WORKDIR.value}")
  return 0


def export_hf():
  """The checkpoint --checkpoint -> --dst, in Mixtral's format."""
  from jax_ep import hf

  flags.need("export-hf", flags.CHECKPOINT, flags.DST)
  for path in hf.export_hf(flags.CHECKPOINT.value, flags.DST.value):
    print(f"wrote {path}")
