"""Fake quantizers for quantization-aware training: quantize-dequantize in the forward pass, a defined gradient in
the backward pass.

* :func:`minmax_fake` -- MinMax ranges fitted to the tensor itself (per output channel, per group of input
  columns, or per token), the grid of :mod:`qjax.core.uniform`: ``q = clip(round(x / s) + z, 0, maxq)``,
  ``x_hat = s (q - z)`` with ``s, z`` from ``min/max`` of the slice (no gradient through the range: it is a
  statistic). Backward: the straight-through estimator, the identity: a MinMax range holds every value of the
  slice it is fitted to (LLM-QAT, Liu et al. 2023, section 2.2). Where the range comes from elsewhere
  (:func:`uniform_fake` with given ``s, z``) the STE is *clipped*: ``dx_hat / dx = 1`` where ``round(x / s) + z``
  lies in ``[0, maxq]`` and 0 where the clip acts.
  LLM-QAT's own symmetric grid is ``{-(2^(b-1) - 1) .. 2^(b-1) - 1} * max|x| / (2^(b-1) - 1)``; qjax uses its RTN
  grid instead (16 levels at 4 bits), so that a trained weight converts to a :class:`QArray` with
  :func:`qjax.methods.weights.rtn.quantize_weight` bit for bit: what training saw is what runs.
* :func:`lsq_fake` -- learned step size (LSQ, Esser et al. 2020, eq. 1-3): ``v = x / s``,
  ``x_hat = s * round(clip(v, Q_n, Q_p))`` (symmetric, ``Q_n = -2^(b-1)``, ``Q_p = 2^(b-1) - 1``: the QArray
  symmetric grid). Gradients::

      dx_hat / dx = 1 if Q_n < v < Q_p else 0
      dx_hat / ds = (round(v) - v if Q_n < v < Q_p else Q_n if v <= Q_n else Q_p) * g,   g = 1 / sqrt(N Q_p)

  ``N`` is the number of values that share one step (the columns of a channel or a group; LSQ's ``N_W`` for a
  per-tensor step). With ``zero`` (an integer zero point learned through a rounding STE, LSQ+ restricted to the
  integer grid a QArray stores, kept in ``[0, maxq]``) the grid is asymmetric:
  ``x_hat = s (round(clip(v + z, 0, maxq)) - z)``.

All math in float32; outputs take the input's dtype. Shapes: weights ``w [out, in]``, steps ``[out, G]``
(``G = ceil(in / group_size)``, 1 per channel); activations ``[..., features]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.core import uniform
from qjax.methods.activations.quantizers import straight_through


@jax.custom_vjp
def uniform_fake(x: jax.Array, scale: jax.Array, zero: jax.Array, maxq: float) -> jax.Array:
  """``s * (clip(round(x / s) + z, 0, maxq) - z)`` (float32, ``scale``/``zero`` broadcast against ``x``) with
  the clipped STE: gradient 1 for ``x`` where the clip does not act, 0 where it does; none for ``s, z, maxq``."""
  return uniform.dequantize(jnp.clip(jnp.round(uniform.true_divide(x, scale)) + zero, 0, maxq), scale, zero)


def _uniform_fwd(x, scale, zero, maxq):
  r = jnp.round(uniform.true_divide(x, scale)) + zero
  inside = (r >= 0) & (r <= maxq)
  return uniform.dequantize(jnp.clip(r, 0, maxq), scale, zero), (inside, scale, zero, maxq)


def _uniform_bwd(res, g):
  inside, scale, zero, maxq = res
  return (jnp.where(inside, g, 0.0), jnp.zeros_like(scale), jnp.zeros_like(zero), jnp.zeros_like(maxq))


uniform_fake.defvjp(_uniform_fwd, _uniform_bwd)


def minmax_fake(x: jax.Array, bits: int, *, sym: bool, group_size: int = -1) -> jax.Array:
  """MinMax fake quantization of each row of ``x [..., n]`` (a weight's output channel or an activation's token),
  or of each group of ``group_size`` consecutive columns (the last group may be partial), with the identity STE.
  Equals :func:`qjax.methods.weights.rtn.quantize_weight` with float32 scales, dequantized, for a weight.

  The range is fitted to the values themselves, so nothing lies outside it and the STE is the identity (as in
  LLM-QAT). The symmetric 16-level grid's top level is ``7 / 7.5`` of ``max|x|``, so the largest positive value
  of a slice moves by up to one step; its gradient still passes (zeroing it would freeze each row's largest
  weight)."""
  n = x.shape[-1]

  def fake(x):
    xg = uniform.to_groups(x.astype(jnp.float32), group_size)
    scale, zero = uniform.fit(xg, bits, sym)
    return uniform.from_groups(uniform.dequantize(uniform.quantize(xg, scale, zero, bits), scale, zero), n)

  return straight_through(fake, x).astype(x.dtype)


def grad_scale(x: jax.Array, g) -> jax.Array:
  """``x`` in the forward pass (exactly: ``x + (y - y)`` with ``y = x g``), gradient times ``g`` (LSQ's
  step-size gradient scale)."""
  y = x * g
  return jax.lax.stop_gradient(x) + (y - jax.lax.stop_gradient(y))


def round_ste(x: jax.Array) -> jax.Array:
  """``round(x)`` with an identity gradient."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def lsq_levels(bits: int, sym: bool) -> tuple[int, int]:
  """``(Q_n, Q_p)``: the integer range of :func:`lsq_fake` (``v + z`` for the asymmetric grid)."""
  return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def lsq_fake(w: jax.Array, step: jax.Array, bits: int, *, group_size: int = -1, zero: jax.Array | None = None):
  """LSQ fake quantization of ``w [out, in]`` with learned ``step [out, G]`` (and, if given, learned float
  ``zero [out, G]`` rounded to an integer in the forward pass); gradients as in the module docstring.
  Returns ``[out, in]`` in ``w.dtype``."""
  n = w.shape[-1]
  wg = uniform.to_groups(w.astype(jnp.float32), group_size)                  # [out, G, g]
  per_step = wg.shape[-1] if group_size == -1 else min(group_size, n)
  lo, hi = lsq_levels(bits, zero is None)
  s = grad_scale(step.astype(jnp.float32), 1.0 / jnp.sqrt(per_step * hi))[..., None]
  z = 0.0 if zero is None else jnp.clip(round_ste(zero.astype(jnp.float32)), lo, hi)[..., None]
  v = uniform.true_divide(wg, s) + z
  v = jnp.where(v <= lo, lo, jnp.where(v >= hi, hi, v))   # `where`, not clip: an exact 0/1 gradient at the ends
  return uniform.from_groups(s * (round_ste(v) - z), n).astype(w.dtype)


def lsq_init(w: jax.Array, bits: int, *, group_size: int = -1, sym: bool = True):
  """Initial ``(step [out, G], zero [out, G] or None)`` float32 for :func:`lsq_fake`: the MinMax scale and zero
  of :func:`qjax.core.uniform.fit` (so training starts from RTN's grid; the symmetric RTN grid is LSQ's
  ``[Q_n, Q_p]`` scaled by the step). LSQ's paper initializes ``2 mean|w| / sqrt(Q_p)`` instead; starting at RTN
  makes step 0 of QAT equal RTN."""
  scale, zero = uniform.fit(uniform.to_groups(w.astype(jnp.float32), group_size), bits, sym)
  if sym:
    return scale[..., 0], None
  return scale[..., 0], zero[..., 0]


def lsq_codes(w: jax.Array, step: jax.Array, bits: int, *, group_size: int = -1, zero: jax.Array | None = None):
  """The integer codes ``[out, in]`` (uint8, ``0..2^bits - 1``) and ``(scale, zero)`` ``[out, G]`` float32 of a
  trained :func:`lsq_fake` quantizer in QArray form (``w_hat = scale (q - zero)``; the symmetric grid's zero is
  the QArray constant ``2^(b-1)``): the arguments of :meth:`QArray.from_codes`."""
  n = w.shape[-1]
  wg = uniform.to_groups(w.astype(jnp.float32), group_size)
  lo, hi = lsq_levels(bits, zero is None)
  z = jnp.clip(jnp.round(zero.astype(jnp.float32)), lo, hi) if zero is not None else jnp.zeros(step.shape,
                                                                                               jnp.float32)
  v = jnp.clip(jnp.round(uniform.true_divide(wg, step.astype(jnp.float32)[..., None]) + z[..., None]), lo, hi)
  shift = 2 ** (bits - 1) if zero is None else 0
  return (uniform.from_groups(v + shift, n).astype(jnp.uint8), step.astype(jnp.float32), z + shift)
