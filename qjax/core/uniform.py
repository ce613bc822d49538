"""The uniform affine quantizer with the GPTQ / qllm-infer conventions (reference notes section 2.1).

For a set of values ``x`` (one row, one group of a row, or one token) with ``maxq = 2**bits - 1``::

    xmin = min(min(x), 0);  xmax = max(max(x), 0)           # the range always contains 0
    sym:  xmax = max(|xmin|, xmax);  xmin = -xmax
    xmin == xmax == 0  ->  xmin, xmax = -1, +1
    scale = true_divide(xmax - xmin, jnp.full_like(xmax, maxq))
    zero  = (maxq + 1) / 2 if sym else round(-xmin / scale)  # integer zero point, round half to even
    q     = clip(round(x / scale) + zero, 0, maxq);   x_hat = scale * (q - zero)

All arithmetic is float32, as in the reference. One deliberate fix (reference quirk Q1): the reference sets
``xmin = -xmax`` in symmetric mode only where ``xmin < 0``, so a row with no negative value gets
``scale = xmax / maxq`` while keeping the mid-grid zero and can represent only ``7/15 * xmax`` at 4 bits. Here
symmetric always means ``xmin = -xmax``; on rows that contain a negative value the two agree exactly.

Groups: ``group_size = g > 0`` cuts each row of an ``[out, in]`` matrix into ``ceil(in / g)`` contiguous groups of
input columns; when ``g`` does not divide ``in`` the last group is partial (it is zero-padded, which cannot move
``min``/``max`` since the range always contains 0). The reference instead reshapes the whole matrix to ``[-1, g]``,
which lets groups straddle rows; that is not reproduced.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.core.errors import InputError


def true_divide(a: jax.Array, b: jax.Array) -> jax.Array:
  """IEEE ``a / b`` with ``b`` broadcast to ``a``'s shape.

  XLA rewrites a division by a broadcast operand into a multiplication by its reciprocal, which is up to 1 ulp
  off and flips round-half-to-even ties (e.g. ``-absmax / scale = -3.5`` at 3 bits, symmetric). The optimization
  barrier keeps the divisor an opaque full-size array so the division stays exact, as in the reference; adding
  ``0 * a`` (exact for finite ``a``) makes the divisor depend on ``a`` so that under ``vmap`` it is batched too
  and the barrier still sits between the division and any broadcast.
  """
  a, b = jnp.broadcast_arrays(a, b)
  return a / jax.lax.optimization_barrier(b + 0 * a)  # "+ 0 * a": batched like ``a`` under vmap


def check_grid(bits: int, group_size: int, what: str = "weight"):
  """Raises InputError unless ``bits`` is 2..8 and ``group_size`` is -1 (per channel) or positive (the checks
  every uniform weight config runs in its ``__post_init__``)."""
  if not isinstance(bits, int) or not 2 <= bits <= 8:
    raise InputError(f"{what} bits must be between 2 and 8, got {bits}")
  if not isinstance(group_size, int) or group_size == 0 or group_size < -1:
    raise InputError(f"{what} group size must be -1 (per channel) or positive, got {group_size}")


def num_groups(n: int, group_size: int) -> int:
  """Groups along a row of ``n`` columns (1 for per-channel, ``group_size == -1``)."""
  return 1 if group_size == -1 else -(-n // group_size)


def to_groups(w: jax.Array, group_size: int) -> jax.Array:
  """``[..., n]`` -> ``[..., G, g]`` with the last group zero-padded (``g = n`` when ``group_size == -1``)."""
  n = w.shape[-1]
  if group_size == -1:
    return w[..., None, :]
  ng = num_groups(n, group_size)
  w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, ng * group_size - n)])
  return w.reshape(*w.shape[:-1], ng, group_size)


def from_groups(wg: jax.Array, n: int) -> jax.Array:
  """Inverse of :func:`to_groups`: ``[..., G, g]`` -> ``[..., n]`` (drops the padding)."""
  return wg.reshape(*wg.shape[:-2], -1)[..., :n]


def fit(x: jax.Array, bits: int, sym: bool, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """Scale and integer-valued zero point of each slice of ``x`` along ``axis`` (kept as a size-1 axis).

  Returns float32 ``(scale, zero)`` broadcastable against ``x``.
  """
  maxq = 2**bits - 1
  x = x.astype(jnp.float32)
  xmin = jnp.minimum(jnp.min(x, axis=axis, keepdims=True), 0.0)
  xmax = jnp.maximum(jnp.max(x, axis=axis, keepdims=True), 0.0)
  if sym:
    xmax = jnp.maximum(-xmin, xmax)
    xmin = -xmax
  dead = (xmin == 0) & (xmax == 0)
  xmin = jnp.where(dead, -1.0, xmin)
  xmax = jnp.where(dead, 1.0, xmax)
  scale = true_divide(xmax - xmin, jnp.full_like(xmax, maxq))
  zero = jnp.full_like(scale, (maxq + 1) / 2) if sym else jnp.round(-xmin / scale)
  return scale, zero


def quantize(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Integer codes ``clip(round(x / scale) + zero, 0, maxq)`` as float32 (exact small integers)."""
  x = x.astype(jnp.float32)
  return jnp.clip(jnp.round(true_divide(x, scale)) + zero, 0, 2**bits - 1)


def dequantize(q: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """``scale * (q - zero)`` in float32."""
  return scale * (q - zero)


def fake_quantize(x: jax.Array, bits: int, sym: bool, axis: int = -1) -> jax.Array:
  """Quantize-dequantize each slice of ``x`` along ``axis`` with its own range (returns ``x.dtype``)."""
  scale, zero = fit(x, bits, sym, axis)
  return dequantize(quantize(x, scale, zero, bits), scale, zero).astype(x.dtype)


def absmax_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric absmax int8 quantization of each row of ``x [..., n]`` (LLM.int8's vector-wise quantizer):
  ``scale = max|x| / 127`` (1 for an all-zero row), ``codes = clip(round(x / scale), -127, 127)`` int8.
  Returns ``(codes [..., n] int8, scale [..., 1] float32)``."""
  x = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale
