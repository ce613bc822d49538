"""Synthetic layer-calibration problems shared by the second-order method tests."""
import numpy as np


def problem(seed, out=32, n=96, tokens=400):
  """Weights ``[out, n]``, heavy-tailed (t(3)) correlated inputs ``[tokens, n]`` with uneven column scales, and
  their Hessian ``2 X^T X / tokens``."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(n, n)).astype(np.float32) / np.sqrt(n)
  x = rng.standard_t(3, size=(tokens, n)).astype(np.float32) @ mix + 0.1 * rng.normal(size=(tokens, n)).astype(
      np.float32)
  x *= rng.uniform(0.2, 3.0, n).astype(np.float32)
  w = rng.normal(size=(out, n)).astype(np.float32)
  return w, x, (2 * x.T @ x / tokens).astype(np.float32)


def output_error(x, w, wq):
  """``||X (W_q - W)^T||``."""
  return float(np.linalg.norm(x @ (np.asarray(wq, np.float32) - w).T))
