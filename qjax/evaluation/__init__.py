"""Measuring models: perplexity, KV-cache generation, and stored size."""
