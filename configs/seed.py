"""The seed paper's model: 4 layers x 16 GELU experts (8192 -> 32768 -> 8192), 16 x 512 heads."""

from jax_ep.config import ModelConfig


def get_config() -> ModelConfig:
  # Every field is the seed's except those it leaves open: top-2 routing, a vocabulary
  # of 32768 and a 2048-token cache (README "Choices the seed left open").
  return ModelConfig(num_layers=4, num_experts=16, top_k=2, num_heads=16, head_dim=512,
                     model_dim=8192, mlp_dim=32768, mlp_kind="gelu", vocab_size=32768,
                     max_seq_len=2048, dtype="float16")


def slice_config(stages: int, experts: int):
  """One layer per stage and `experts` experts a layer, top-2, and 2048 vocabulary
  columns a GPU: each GPU of the slice does what one GPU of seed_proposed does, but for
  the head's rows (its stage's 64 x `experts`, not 1024; configs/deployments.py SLICES)."""
  import dataclasses

  return dataclasses.replace(get_config(), num_layers=stages, num_experts=experts,
                             vocab_size=2048 * experts)
