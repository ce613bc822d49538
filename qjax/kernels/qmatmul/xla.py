"""XLA reference implementations of ``qmatmul`` (the spec every other implementation is tested against), one per
weight type; :mod:`qjax.kernels.qmatmul` registers them with the dispatcher.

* dense weight: one ``dot_general`` (on the fake-quantized activation when ``act`` is given);
* :class:`~qjax.core.formats.int8.Int8Array` with an 8-bit per-token quantizer: the real ``int8 x int8 -> int32`` product
  (:func:`qjax.kernels.int8_matmul.w8a8_matmul`), else emulated;
* :class:`~qjax.core.formats.int8.LLMInt8Array`: LLM.int8()'s mixed-precision decomposition (it quantizes its own input);
* any other quantized tensor (:class:`~qjax.core.formats.qarray.QArray`, SpQR, ...): "emulated", dequantize + matmul.

Each function is ``f(x [..., in], w [out, in], act) -> [..., out]`` in ``x.dtype`` and carries ``f.path(w, act)``,
the execution path's name for summaries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.kernels import int8_matmul


def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """``x [..., in] @ w[out, in]^T -> [..., out]`` without materializing the transpose."""
  return jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))


def _fake(x, act):
  return x if act is None else act(x)


def suffix(act) -> str:
  """The path-name suffix of a call on quantized activations."""
  return " on fake-quantized activations" if act is not None else ""


def dense(x, w, act=None):
  return dense_matmul(_fake(x, act), jnp.asarray(w))


def emulated(x, w, act=None):
  """Dequantize-then-matmul."""
  return dense_matmul(_fake(x, act), w.dequantize())


def int8(x, w, act=None):
  if act is not None and getattr(act, "supports_int8", False):
    return int8_matmul.w8a8_matmul(x, w, act)
  return emulated(x, w, act)


def llm_int8(x, w, act=None):
  return int8_matmul.llm_int8_matmul(x, w)


dense.path = lambda w, act: "dense" + suffix(act)
emulated.path = lambda w, act: "emulated (dequantize + matmul)" + suffix(act)
int8.path = lambda w, act: ("int8 (int8 x int8 -> int32 dot_general)" if getattr(act, "supports_int8", False)
                            else emulated.path(w, act))
llm_int8.path = lambda w, act: "LLM.int8 (int8 dot_general + float outlier columns)"
