"""Custom kernels: the grouped expert matmul (Pallas Triton on GPU, XLA elsewhere)."""
