"""``qmatmul(x, w, act=None)``: ``x @ W^T`` for a weight ``W [out, in]`` that is a dense array or a quantized
tensor, with an optional activation quantizer ``act`` applied to ``x`` (see :mod:`qjax.methods.activations.quantizers`).

The op folder: ``xla.py`` holds the reference per weight type (the spec); implementations for other platforms
register with :data:`OP` (see :mod:`qjax.kernels.dispatch`) and fall back to the reference for what they do not
support. ``implementation="auto" | "xla" | <name>``.
"""
from __future__ import annotations

import jax

from qjax.core.formats.base import QuantizedTensor
from qjax.core.formats.int8 import Int8Array, LLMInt8Array
from qjax.kernels.dispatch import Op
from qjax.kernels.qmatmul import xla
from qjax.kernels.qmatmul.xla import dense_matmul

__all__ = ["OP", "qmatmul", "path_name", "dense_matmul"]

OP = Op("qmatmul", dispatch_arg=1)
OP.reference(object)(xla.dense)
OP.reference(QuantizedTensor)(xla.emulated)
OP.reference(Int8Array)(xla.int8)
OP.reference(LLMInt8Array)(xla.llm_int8)
from qjax.kernels import lut_gemm  # noqa: E402,F401  (BCQArray weights: qmatmul runs the LUT-GEMM op)
# the implementations register with OP, so they are imported after it exists
from qjax.kernels.qmatmul import cpu  # noqa: F401  (registers the implementation)
from qjax.kernels.qmatmul import pallas_tpu  # noqa: F401  (registers the implementation)
from qjax.kernels.qmatmul import pallas_triton  # noqa: F401  (registers the implementation)


def qmatmul(x: jax.Array, w, act=None, *, implementation: str = "auto", fallback: bool = True) -> jax.Array:
  """``x [..., in] @ w[out, in]^T -> [..., out]`` in ``x.dtype`` through the dispatcher (``fallback``: see
  :meth:`qjax.kernels.dispatch.Op.__call__`)."""
  return OP(x, w, act, implementation=implementation, fallback=fallback)


def path_name(w, act=None, implementation: str = "auto") -> str:
  """Which execution path :func:`qmatmul` takes for ``w`` (shown in CLI summaries)."""
  return OP.path_name(None, w, act, implementation=implementation, path_args=(w, act))
