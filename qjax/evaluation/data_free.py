"""Data-free training text (LLM-QAT, Liu et al. 2023, section 2.1): the float model writes its own.

Each sequence starts from a token drawn uniformly from the vocabulary; the next ``greedy_tokens`` tokens are the
model's top-1 choices, the rest sampled from its full softmax (temperature 1, no top-k/top-p), as the paper does
(greedy first tokens keep a random start on track, sampling keeps the text diverse). Generation never stops
early: every window is exactly ``length`` tokens. Seeded: the start tokens from ``numpy.random.default_rng(seed)``,
the sampling from ``seed``, so the same call gives the same windows.
"""
from __future__ import annotations

import numpy as np

from qjax.core.errors import InputError
from qjax.core.progress import bar as progress_bar
from qjax.evaluation.generation import Generator, Sampling
from qjax.models import CausalLM


def generated_windows(model: CausalLM, params, n: int, length: int, *, greedy_tokens: int = 3, seed: int = 0,
                      batch_size: int = 16, progress: bool = True) -> np.ndarray:
  """``[n, length]`` int32 windows of the model's own text (module docstring), generated ``batch_size`` rows at
  a time through the KV-cache generator."""
  if n < 1 or length < 2:
    raise InputError(f"generated text needs at least one window of 2 tokens, got {n} x {length}")
  if length > model.config.max_position_embeddings:
    raise InputError(f"generated windows of {length} tokens exceed the model context "
                     f"({model.config.max_position_embeddings})")
  greedy_tokens = min(greedy_tokens, length - 1)
  starts = np.random.default_rng(seed).integers(0, model.config.vocab_size, n)
  top1, sampled = Generator(model, params), Generator(model, params, sampling=Sampling(temperature=1.0))
  rows = []
  for i in progress_bar(range(0, n, batch_size), desc="generate training text", enabled=progress):
    prompts = [[int(t)] for t in starts[i:i + batch_size]]
    pad = batch_size - len(prompts)              # a full last batch: one compiled shape
    prompts += prompts[:1] * pad
    if greedy_tokens:
      head = top1.generate(prompts, greedy_tokens, stop_tokens=())
      prompts = [p + t for p, t in zip(prompts, head.tokens)]
    rest = length - len(prompts[0])
    if rest:
      tail = sampled.generate(prompts, rest, stop_tokens=(), seed=seed * 1_000_003 + i)
      prompts = [p + t for p, t in zip(prompts, tail.tokens)]
    rows.extend(prompts[:batch_size - pad])
  return np.asarray(rows, np.int32)
