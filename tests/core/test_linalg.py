"""The shared linear algebra: the block-triangular Gram matrix and the inverse's upper Cholesky factor."""
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import linalg


@pytest.mark.parametrize("d,block", [(7, 16), (40, 16), (48, 16), (33, 8)])
def test_gram_equals_full_product_and_is_symmetric(d, block):
  """Ragged last blocks included: every entry is the float64 ``a^T a`` to float32 rounding, the result is exactly
  symmetric (mirrored blocks) and a block wider than ``d`` is the plain product."""
  a = np.random.default_rng(d).normal(size=(64, d)).astype(np.float32)
  g = np.asarray(linalg.gram(jnp.asarray(a), block))
  ref = a.astype(np.float64).T @ a.astype(np.float64)
  np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-4)
  assert np.array_equal(g, g.T)
  assert g.shape == (d, d)


def test_upper_cholesky_of_inverse():
  a = np.random.default_rng(0).normal(size=(50, 12))
  h = a.T @ a + np.eye(12)
  u = np.asarray(linalg.upper_cholesky_of_inverse(jnp.asarray(h, jnp.float32)))
  np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-4, atol=1e-5)
  assert np.allclose(np.tril(u, -1), 0)
