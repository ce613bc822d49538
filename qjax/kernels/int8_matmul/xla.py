"""Integer matmuls: W8A8 (``int8 x int8 -> int32`` ``dot_general``) and LLM.int8()'s mixed decomposition.

W8A8 (:func:`w8a8_matmul`): the activation is quantized per token to signed int8 codes
(:meth:`qjax.methods.activations.quantizers.TokenQuantizer.int8_codes`), the weight is an :class:`~qjax.core.formats.int8.Int8Array`; with
``x ~= sx * (qx - zx)`` and ``w[o] ~= sw[o] * (qw[o] - zw[o])``::

    y[t, o] = sx[t] sw[o] * (sum_k qx qw  -  zx[t] sum_k qw[o]  -  zw[o] sum_k qx[t]  +  K zx[t] zw[o])

every sum in int32 (exact), one float multiply at the end. :func:`reference` is the same product in float
(dequantize both operands, then matmul): the two agree to float rounding.

LLM.int8() (:func:`llm_int8_matmul`, Dettmers et al. 2022, as bitsandbytes' ``MatMul8bitLt``): input columns
where any row of this call has ``|x| >= threshold`` are outlier features, multiplied in float against the
int8-dequantized weight; the other columns are absmax-quantized per row to int8 (``round(127 x / max|x|)``)
and multiplied in int8. Which columns are outliers is decided over all rows (tokens) of the call, as in
bitsandbytes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.core import uniform
from qjax.core.formats.int8 import Int8Array, LLMInt8Array


def _int_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a [..., K] int8 @ b [N, K]^T int8 -> int32 [..., N]``."""
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def w8a8_matmul(x: jax.Array, w: Int8Array, act) -> jax.Array:
  """``x [..., K]`` float, quantized by ``act`` (an 8-bit per-token quantizer), times ``w [N, K]`` -> ``[..., N]``
  in ``x.dtype``."""
  qx, sx, zx = act.int8_codes(x)
  acc = _int_dot(qx, w.codes)
  sum_w = jnp.sum(w.codes.astype(jnp.int32), axis=1)                      # [N]
  acc = acc - zx * sum_w
  if w.zero is not None:
    zw = w.zero[:, 0].astype(jnp.int32)
    acc = acc - jnp.sum(qx.astype(jnp.int32), axis=-1, keepdims=True) * zw + x.shape[-1] * zx * zw
  return (acc.astype(jnp.float32) * sx * w.scale[:, 0]).astype(x.dtype)


def reference(x: jax.Array, w, act) -> jax.Array:
  """Float reference of :func:`w8a8_matmul`: fake-quantized activation times the dequantized weight."""
  xq = act.fake(x)
  return jax.lax.dot_general(xq, w.dequantize().astype(xq.dtype), (((x.ndim - 1,), (1,)), ((), ())))


def llm_int8_matmul(x: jax.Array, w: LLMInt8Array) -> jax.Array:
  """LLM.int8() product of ``x [..., K]`` float and ``w [N, K]`` -> ``[..., N]`` in ``x.dtype``."""
  lead, k = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, k).astype(jnp.float32)
  outlier = jnp.any(jnp.abs(x2) >= w.threshold, axis=0)                  # [K]
  regular = jnp.where(outlier, 0.0, x2)
  qx, sx = uniform.absmax_int8(regular)
  y = _int_dot(qx, w.codes).astype(jnp.float32) * sx * w.scale[:, 0]
  y = y + jax.lax.dot_general(jnp.where(outlier, x2, 0.0), w.dequantize().astype(jnp.float32),
                              (((1,), (1,)), ((), ())))
  return y.reshape(*lead, -1).astype(x.dtype)
