"""Calibration windows: seeded random slices of a token stream, bound to the model they calibrate."""
from __future__ import annotations

import numpy as np

from qjax.calibration.layerwise import Calibration
from qjax.calibration.memory import check_memory_budget
from qjax.core.errors import InputError
from qjax.models import CausalLM


def sample_windows(tokens: np.ndarray, nsamples: int, seqlen: int, seed: int = 0) -> np.ndarray:
  """``nsamples`` windows ``[nsamples, seqlen]`` int32 starting at seeded uniform random offsets.

  Offsets are drawn with ``numpy.random.default_rng(seed)`` from ``[0, len(tokens) - seqlen]``.
  """
  if len(tokens) < seqlen + 1:
    raise InputError(f"calibration text has {len(tokens)} tokens, fewer than one window of {seqlen}")
  starts = np.random.default_rng(seed).integers(0, len(tokens) - seqlen + 1, size=nsamples)
  return np.stack([tokens[s:s + seqlen] for s in starts]).astype(np.int32)


def calibration_windows(model: CausalLM, tokens: np.ndarray, nsamples: int, seqlen: int,
                        seed: int = 0, *, layer_report: bool = False) -> Calibration:
  """A :class:`Calibration` of ``nsamples`` seeded random windows of ``seqlen`` tokens (capped at the model's
  context) of ``tokens`` (1-D ids); fails up front when the held activations would not fit in host memory.
  ``layer_report``: measure each layer's output error (:func:`qjax.calibration.walk_layers`)."""
  seqlen = min(seqlen, model.config.max_position_embeddings)
  check_memory_budget(model, nsamples, seqlen)
  return Calibration(model, sample_windows(tokens, nsamples, seqlen, seed), layer_report)
