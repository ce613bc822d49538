"""XLA reference of ``lut_gemm`` (the spec): decompress the BCQArray (``sum_i alpha_i b_i + offset``, float32) and
one ``dot_general``."""
from __future__ import annotations

from qjax.kernels.qmatmul.xla import dense_matmul


def lut_gemm(x, w, act=None):
  """``x [..., K] @ w.dequantize()^T`` in ``x.dtype`` (``act`` quantizes ``x`` first)."""
  x = x if act is None else act(x)
  return dense_matmul(x, w.dequantize())


lut_gemm.path = lambda w, act: "xla (decompress + matmul)" + ("" if act is None else " on fake-quantized activations")
