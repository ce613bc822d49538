"""``x @ W^T`` for a weight ``W [out, in]`` that is a dense array or a quantized tensor, with an optional
activation quantizer ``act`` applied to ``x`` (see :mod:`qjax.act_quant`).

Paths, chosen by :func:`qmatmul` from the weight's type and the quantizer:

* dense weight: one ``dot_general`` (on the fake-quantized activation when ``act`` is given);
* :class:`~qjax.int8.Int8Array` with an 8-bit per-token quantizer: the real ``int8 x int8 -> int32`` product
  (:func:`qjax.kernels.int8_matmul.w8a8_matmul`);
* :class:`~qjax.int8.LLMInt8Array`: LLM.int8()'s mixed-precision decomposition (it quantizes its own input);
* any other quantized tensor (:class:`~qjax.qarray.QArray`, SpQR, ...): "emulated", dequantize + matmul.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.int8 import Int8Array, LLMInt8Array
from qjax.kernels import int8_matmul
from qjax.qarray import QuantizedTensor


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [..., in] @ w[out, in]^T -> [..., out]`` without materializing the transpose."""
  return jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))


def reference(x: jax.Array, w: QuantizedTensor) -> jax.Array:
  """Dequantize-then-matmul reference."""
  return dense_matmul(x, w.dequantize())


def _int8_ready(w, act) -> bool:
  return isinstance(w, Int8Array) and act is not None and getattr(act, "supports_int8", False)


def qmatmul(x: jax.Array, w, act=None) -> jax.Array:
  """Dispatcher (see module doc); ``act`` is ``None`` or a callable activation quantizer."""
  if isinstance(w, LLMInt8Array):
    return int8_matmul.llm_int8_matmul(x, w)
  if _int8_ready(w, act):
    return int8_matmul.w8a8_matmul(x, w, act)
  if act is not None:
    x = act(x)
  if isinstance(w, QuantizedTensor):
    return reference(x, w)
  return dense_matmul(x, jnp.asarray(w))


def path_name(w, act=None) -> str:
  """Which execution path :func:`qmatmul` takes for ``w`` (shown in CLI summaries)."""
  if isinstance(w, LLMInt8Array):
    return "LLM.int8 (int8 dot_general + float outlier columns)"
  if _int8_ready(w, act):
    return "int8 (int8 x int8 -> int32 dot_general)"
  fake = " on fake-quantized activations" if act is not None else ""
  if isinstance(w, QuantizedTensor):
    return "emulated (dequantize + matmul)" + fake
  return "dense" + fake
