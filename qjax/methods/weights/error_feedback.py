"""The blocked error-feedback sweep that GPTQ and SpQR share (Frantar et al. 2022, Algorithm 1).

With ``U`` the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``), quantizing column ``j`` of ``W`` to
``q_j`` leaves the error ``e_j = (w_j - q_j) / U_jj``, and the not yet quantized columns absorb it::

    W[:, k] -= e_j * U[j, k]        for k > j

Columns are processed in blocks of ``B``: inside a block the update is applied column by column (the method's
``block_fn``, using :func:`feedback`); the block's errors ``E [out, B]`` then update every later column at once,
``W[:, i1+B:] -= E @ U[i1:i1+B, i1+B:]`` (the "lazy batch" update). The trailing update runs on a few static
column ranges (``segments``), so each compiled ``fori_loop`` body multiplies only the columns that can still
change, without dynamic shapes.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import linalg

SEGMENTS = 4   # static column ranges of the lazy trailing update


def pad_to_blocks(w: jax.Array, h: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pads ``w [out, cols]`` and ``h [cols, cols]`` (both float32, already permuted, damped and with dead columns
  fixed) to a whole number of blocks: padded columns are dead (zero weight, identity Hessian). Returns ``(w, u,
  ok)``: the padded weights, ``U`` (upper Cholesky factor of the padded ``H^{-1}``) and whether it is finite."""
  cols = w.shape[1]
  pad = -(-cols // block_size) * block_size - cols
  w = jnp.pad(w, ((0, 0), (0, pad)))
  h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(cols + pad) >= cols).astype(h.dtype)
  u = linalg.upper_cholesky_of_inverse(h)
  return w, u, jnp.all(jnp.isfinite(u))


def feedback(w1: jax.Array, err: jax.Array, u_row: jax.Array, i) -> jax.Array:
  """The within-block update after column ``i`` of the block ``w1 [out, B]``: ``w1[:, k] -= err * u_row[k]`` for
  ``k > i`` (``err [out]``, ``u_row [B]`` = row ``i`` of the block's diagonal part of ``U``)."""
  col = jnp.arange(w1.shape[1])
  return w1 - err[:, None] * jnp.where(col > i, u_row, 0.0)[None, :]


BlockFn = Callable[[jax.Array, jax.Array, jax.Array, object, jax.Array], tuple[jax.Array, object]]


def sweep(w: jax.Array, u: jax.Array, block_fn: BlockFn, state, *, block_size: int, segments: int = SEGMENTS):
  """Runs ``block_fn`` on every block in order with the error feedback between blocks -> the final ``state``.

  ``block_fn(i1, w1 [out, B], u1 [B, B], state, w [out, ncols]) -> (err1 [out, B], state)`` quantizes the block
  starting at column ``i1`` (``w1``: its columns with every earlier block's feedback applied; ``u1``: the
  block's diagonal part of ``U``; ``w``: all current weights, for fits that look past the block) and returns the
  scaled errors ``e`` of its columns. ``w [out, ncols]``, ``u [ncols, ncols]`` come from :func:`pad_to_blocks`."""
  ncols = w.shape[1]
  nblk = ncols // block_size

  def one_block(b, carry, seg_start: int):
    w, state = carry
    i1 = b * block_size
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, block_size, axis=1)
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (block_size, block_size))
    err1, state = block_fn(i1, w1, u1, state, w)
    # Lazy trailing update on the static range [seg_start, ncols): rows i1..i1+B of U are zero left of i1, and
    # the block's own columns (already final) are masked out.
    rows = jax.lax.dynamic_slice(u, (i1, seg_start), (block_size, ncols - seg_start))
    rows = jnp.where(jnp.arange(seg_start, ncols)[None, :] >= i1 + block_size, rows, 0.0)
    return w.at[:, seg_start:].add(-err1 @ rows), state

  bounds = np.linspace(0, nblk, min(segments, nblk) + 1).round().astype(int)
  carry = (w, state)
  for b0, b1 in zip(bounds[:-1], bounds[1:]):
    carry = jax.lax.fori_loop(int(b0), int(b1), functools.partial(one_block, seg_start=int(b0) * block_size), carry)
  return carry[1]
