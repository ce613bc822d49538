"""``x @ W^T`` for a weight ``W [out, in]`` that is a dense array or a quantized tensor (:class:`~qjax.qarray.QArray`,
or any other :class:`~qjax.qarray.QuantizedTensor`).

The reference path dequantizes and calls one ``dot_general`` ("emulated": dequantize + matmul); fused Pallas
kernels plug in behind :func:`qmatmul`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.qarray import QuantizedTensor


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [..., in] @ w[out, in]^T -> [..., out]`` without materializing the transpose."""
  return jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))


def reference(x: jax.Array, w: QuantizedTensor) -> jax.Array:
  """Dequantize-then-matmul reference."""
  return dense_matmul(x, w.dequantize())


def qmatmul(x: jax.Array, w) -> jax.Array:
  """Dispatcher: dense weights take one ``dot_general``; quantized ones the reference path."""
  if isinstance(w, QuantizedTensor):
    return reference(x, w)
  return dense_matmul(x, jnp.asarray(w))


def path_name(w) -> str:
  """Which execution path :func:`qmatmul` takes for ``w`` (shown in CLI summaries)."""
  return "emulated (dequantize + matmul)" if isinstance(w, QuantizedTensor) else "dense"
