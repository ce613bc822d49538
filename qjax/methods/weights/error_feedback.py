"""The blocked error-feedback sweep that GPTQ and SpQR share (Frantar et al. 2023, Algorithm 1).

With ``U`` the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``), quantizing column ``j`` of ``W`` to
``q_j`` leaves the error ``e_j = (w_j - q_j) / U_jj``, and the not yet quantized columns absorb it::

    W[:, k] -= e_j * U[j, k]        for k > j

Layout: everything runs on ``W^T [n, out]``, so a column of ``W`` is a contiguous row. Three levels of laziness,
each exact in real arithmetic (only the float summation order differs from the column-by-column update): inside a
sub-block of ``sub`` columns the update is applied column by column on ``[sub, out]`` (the method's ``col``
function quantizes each column); the sub-block's errors ``E [sub, out]`` then update the rest of its block of
``B`` columns with one matmul, ``W1[:, later] -= E^T U[sub, later]``; a block's errors update every later column
at once (the "lazy batch" update), on a few static column ranges (``segments``), so each compiled ``fori_loop``
body multiplies only the columns that can still change, without dynamic shapes. At every sub-block start the
columns not yet reached hold exactly the reference's values (all earlier errors applied), so group fits there
match it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import linalg

SEGMENTS = 4   # static column ranges of the lazy trailing update
SUB_BLOCK = 16  # columns per within-block sub-block (at most; it also divides the block and group sizes)


def factor(h: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
  """``(U, ok)`` of ``h [cols, cols]`` (float32, already permuted, damped and with dead columns fixed) padded to
  a whole number of blocks (padded columns are dead: identity Hessian): ``U [ncols, ncols]`` is the upper Cholesky
  factor of the padded ``H^{-1}``, ``ok`` whether it is finite (False: ``H`` was not positive definite)."""
  cols = h.shape[0]
  pad = -(-cols // block_size) * block_size - cols
  h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(cols + pad) >= cols).astype(h.dtype)
  u = linalg.upper_cholesky_of_inverse(h)
  return u, jnp.all(jnp.isfinite(u))


def transpose_padded(w: jax.Array, ncols: int) -> jax.Array:
  """``w [out, cols]`` -> ``W^T [ncols, out]`` with zero rows for the padded (dead) columns."""
  return jnp.pad(w, ((0, 0), (0, ncols - w.shape[1]))).T


def sub_block_size(block_size: int, group_size: int = -1) -> int:
  """The sub-block: at most :data:`SUB_BLOCK` columns, dividing the block and (when grouped) the group size, so
  every group starts at a sub-block start."""
  return math.gcd(SUB_BLOCK, block_size, max(group_size, 0))


ColFn = Callable[[jax.Array, jax.Array, object], tuple[jax.Array, object]]
StartFn = Callable[[jax.Array, jax.Array, object], object]


def block_sweep(w1: jax.Array, u1: jax.Array, col: ColFn, carry, *, sub: int, start: StartFn | None = None):
  """Quantizes one block column by column -> ``(err [B, out], carry)``, the errors ``e`` of its columns.

  ``w1 [B, out]``: the block's columns (rows of ``W^T``) with every earlier block's feedback applied; ``u1 [B,
  B]``: the block's diagonal part of ``U``. ``col(i, w [out], carry) -> (e [out], carry)`` quantizes the block's
  column ``i`` as it stands after the feedback of columns ``< i`` and returns its error ``(w - q) / U_ii``.
  ``start(i, w1, carry) -> carry`` runs at each sub-block start ``i`` (a multiple of ``sub``) with the block
  whose rows ``>= i`` are up to date (group fits)."""
  bs, out = w1.shape
  rows = jnp.arange(bs)

  def one_sub(s, st):
    w1, err, carry = st
    i0 = s * sub
    if start is not None:
      carry = start(i0, w1, carry)
    ws = jax.lax.dynamic_slice_in_dim(w1, i0, sub)
    us = jax.lax.dynamic_slice(u1, (i0, i0), (sub, sub))

    def one_col(c, st):
      ws, es, carry = st
      e, carry = col(i0 + c, ws[c], carry)
      ws = ws - jnp.where(jnp.arange(sub) > c, us[c], 0.0)[:, None] * e[None, :]
      return ws, es.at[c].set(e), carry

    _, es, carry = jax.lax.fori_loop(0, sub, one_col, (ws, jnp.zeros((sub, out), w1.dtype), carry))
    urows = jnp.where(rows[None, :] >= i0 + sub, jax.lax.dynamic_slice_in_dim(u1, i0, sub), 0.0)  # [sub, B]
    return w1 - _tmatmul(urows, es), jax.lax.dynamic_update_slice_in_dim(err, es, i0, axis=0), carry

  _, err, carry = jax.lax.fori_loop(0, bs // sub, one_sub, (w1, jnp.zeros_like(w1), carry))
  return err, carry


def _tmatmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a^T @ b`` for ``a [k, m]``, ``b [k, n]`` (float32)."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)


BlockFn = Callable[[jax.Array, jax.Array, jax.Array, object, jax.Array], tuple[jax.Array, object]]


def sweep(w: jax.Array, u: jax.Array, block_fn: BlockFn, state, *, block_size: int, segments: int = SEGMENTS):
  """Runs ``block_fn`` on every block in order with the error feedback between blocks -> the final ``state``.

  ``block_fn(i1, w1 [B, out], u1 [B, B], state, w [ncols, out]) -> (err [B, out], state)`` quantizes the block
  starting at column ``i1`` (``w1``: its columns with every earlier block's feedback applied; ``u1``: the block's
  diagonal part of ``U``; ``w``: all current columns, for fits that look past the block; usually through
  :func:`block_sweep`) and returns the errors ``e`` of its columns. ``w [ncols, out]`` (transposed) and ``u
  [ncols, ncols]`` come from :func:`transpose_padded` and :func:`factor`."""
  ncols = w.shape[0]
  nblk = ncols // block_size

  def one_block(b, carry, seg_start: int):
    w, state = carry
    i1 = b * block_size
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, block_size)
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (block_size, block_size))
    err, state = block_fn(i1, w1, u1, state, w)
    # Lazy trailing update on the static range [seg_start, ncols): rows i1..i1+B of U are zero left of i1, and
    # the block's own columns (already final) are masked out.
    rows = jax.lax.dynamic_slice(u, (i1, seg_start), (block_size, ncols - seg_start))
    rows = jnp.where(jnp.arange(seg_start, ncols)[None, :] >= i1 + block_size, rows, 0.0)
    return w.at[seg_start:].add(-_tmatmul(rows, err)), state

  bounds = np.linspace(0, nblk, min(segments, nblk) + 1).round().astype(int)
  carry = (w, state)
  for b0, b1 in zip(bounds[:-1], bounds[1:]):
    carry = jax.lax.fori_loop(int(b0), int(b1), functools.partial(one_block, seg_start=int(b0) * block_size), carry)
  return carry[1]
