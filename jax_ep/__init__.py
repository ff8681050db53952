"""jax_ep: serving MoE transformers with cross-node expert parallelism in JAX."""

__version__ = "0.1.0"
