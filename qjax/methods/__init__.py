"""Quantization methods, one module per method: a per-matrix core (``quantize_weight``) and a model-level
transform (``quantize``)."""
from __future__ import annotations

from qjax import tree
from qjax.progress import bar as progress_bar
from qjax.qarray import is_quantized


def quantize_matching(params, targets, quantize_weight, *, desc: str, progress: bool = True):
  """A new tree with every still-dense weight whose path matches a ``targets`` regex replaced by
  ``quantize_weight(w)`` (calibration-free methods)."""
  flat = tree.flatten(params)
  paths = [p for p in tree.matching(params, targets) if not is_quantized(flat[p])]
  bar = progress_bar(total=len(paths), desc=desc, enabled=progress)
  out = tree.replace(params, paths, lambda p, w: (bar.update(), quantize_weight(w))[1])
  bar.close()
  return out
