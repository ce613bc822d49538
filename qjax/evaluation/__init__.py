"""Measuring models: perplexity, KV-cache generation, stored size, kernel paths, and zero-shot tasks through the
lm-evaluation-harness (``harness``: the ``qjax`` lm-eval model, needs the extra ``eval``; ``tasks``: the offline
task definitions)."""
