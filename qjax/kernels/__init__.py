"""Matmul kernels over quantized weights: each op has a pure-XLA reference and a dispatcher."""
