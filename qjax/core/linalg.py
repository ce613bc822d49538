"""Linear algebra shared by the second-order methods (GPTQ, SpQR)."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp


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
