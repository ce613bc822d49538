"""Linear algebra shared by the second-order methods (GPTQ, SpQR) and their calibration statistics."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

GRAM_BLOCK = 288   # columns per block of :func:`gram` (576 = 2 blocks; 1536 = 5 + a 96-wide one)


def gram(a: jax.Array, block: int = GRAM_BLOCK) -> jax.Array:
  """``a^T a [d, d]`` of ``a [n, d]`` from the blocks on and above the diagonal only, the lower ones mirrored:
  ``k (k + 1) / 2`` of the ``k^2`` block products (``k = ceil(d / block)``), e.g. 3/4 of the work at ``d = 576``
  and 21/36 at 1536. Exactly symmetric. Each entry is still one dot product over the ``n`` rows, so it equals the
  full product up to the summation order XLA picks for the block's shape (for SmolLM2's 576 and 1536 at
  ``n = 2048`` on this CPU: the same bits)."""
  d = a.shape[1]
  if d <= block:
    return a.T @ a
  edges = list(range(0, d, block)) + [d]
  cols = [a[:, lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
  upper = {(i, j): cols[i].T @ cols[j] for i in range(len(cols)) for j in range(i, len(cols))}
  return jnp.block([[upper[i, j] if j >= i else upper[j, i].T for j in range(len(cols))] for i in range(len(cols))])


def upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
  """Upper-triangular ``U`` with ``U^T U = h^{-1}`` for a symmetric positive definite ``h [n, n]``.

  Equal to torch's ``cholesky(cholesky_inverse(cholesky(h)), upper=True)`` (the GPTQ reference) but with one
  Cholesky and one triangular solve: with ``P`` the reversal permutation and ``L = chol(P h P)``,
  ``U = P L^{-1} P``. NaNs in the result mean ``h`` was not positive definite.
  """
  n = h.shape[0]
  l = jnp.linalg.cholesky(h[::-1, ::-1])
  linv = jax.scipy.linalg.solve_triangular(l, jnp.eye(n, dtype=h.dtype), lower=True)
  return linv[::-1, ::-1]


def with_damping_retry(run, percdamp: float, name: str, tries: int = 6):
  """Calls ``run(damp)`` (returning ``(outputs, ok)``) with ``damp = percdamp, 10x, 100x, ...`` until ``ok``.

  ``ok`` is False when the Cholesky factorization of the damped Hessian failed; each retry warns. Returns
  ``(outputs, damp used)``; raises FloatingPointError after ``tries`` failures.
  """
  damp = percdamp
  for _ in range(tries):
    out, ok = run(jnp.float32(damp))
    if bool(ok):
      return out, damp
    warnings.warn(f"{name}: Cholesky factorization failed with percdamp={damp:g}; retrying with {damp * 10:g}")
    damp *= 10
  raise FloatingPointError(f"{name}: Hessian is not positive definite even with heavy damping")
