"""Quantization methods: one module per method, each with a per-matrix core (``quantize_weight``) and a
model-level pytree transform (``quantize(params, config) -> params``)."""
