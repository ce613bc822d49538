"""Weighted 1-D k-means (Lloyd's algorithm, quantile initialization): the non-uniform codebooks of KVQuant."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans_1d(x: jax.Array, w: jax.Array, *, k: int, iters: int) -> jax.Array:
  """Weighted 1-D k-means (Lloyd's algorithm) -> sorted centroids ``[k]`` float32.

  ``x, w [n]`` float32, samples with ``w = 0`` ignored. Initialization: the sorted weighted-in samples at ranks
  ``floor((j + 1/2) n_in / k)``. Each iteration assigns ``x`` to the nearest centroid (``#{j : x > m_j}`` with the
  midpoints ``m_j``) and moves each centroid to the weighted mean of its samples (an empty cluster keeps its
  centroid). In 1-D the clusters are intervals, so the centroids stay sorted.
  """
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  xs = jnp.sort(jnp.where(w > 0, x, jnp.inf))
  n_in = jnp.sum(w > 0)
  ranks = jnp.floor((jnp.arange(k) + 0.5) * n_in / k).astype(jnp.int32)
  init = xs[jnp.clip(ranks, 0, x.shape[0] - 1)]
  init = jnp.where(jnp.isfinite(init), init, 0.0)              # no weighted-in sample at all

  def step(_, c):
    a = assign(x, c)
    total = jax.ops.segment_sum(w * x, a, k)
    mass = jax.ops.segment_sum(w, a, k)
    return jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1), c)

  return jax.lax.fori_loop(0, iters, step, init)


def assign(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Nearest-centroid codes ``#{j : z > (c_j + c_{j+1}) / 2}`` (int32, shape of ``z``) for a sorted codebook."""
  mids = (codebook[1:] + codebook[:-1]) / 2
  return jnp.sum(z[..., None] > mids, axis=-1, dtype=jnp.int32)


def kmeans_objective(x: jax.Array, w: jax.Array, codebook: jax.Array) -> jax.Array:
  """``sum_i w_i (x_i - c_{code_i})^2`` float32."""
  return jnp.sum(w * (x - codebook[assign(x, codebook)]) ** 2)
