"""``lut_gemm(x, w, act=None)``: ``x @ W^T`` for a binary-coded weight ``W`` (:class:`~qjax.core.formats.bcq.BCQArray`),
the LUT-GEMM matmul (Park et al., 2024).

Operands: ``x [..., K]`` float32 / bfloat16 / float16 (an activation quantizer ``act`` runs on it first); ``w`` a
BCQArray ``[N, K]``: bit planes ``planes [q, N, ceil(K / 32)]`` uint32, ``alpha [N, G, q]``, ``offset [N, G]`` or
None, optional ``perm``. Result ``[..., N]`` in ``x.dtype``::

  y[m, n] = sum_g ( sum_i alpha[n, g, i] * sum_{k in g} b_i[n, k] x[m, k]  +  offset[n, g] * sum_{k in g} x[m, k] )

LUT-GEMM's formulation (section 3.1): for every 8 consecutive activations ``x[m, 8c : 8c + 8]`` a table of the
256 signed sums ``T[c, p] = sum_j (+x_j if bit j of p else -x_j)``, built once per call and shared by every output
row and bit plane; then each byte of a bit plane (8 binaries) is one lookup ``T[c, byte]``, summed per group,
scaled by ``alpha`` and accumulated; the offset term is ``offset * sum(x)`` over the group. No weight is ever
decompressed.

``xla.py`` is the spec (decompress + dot); ``cpu.py`` the table-lookup kernel (native, XLA FFI);
``pallas_triton.py`` the GPU kernel, a binary-coded GEMV (bit planes expanded to +-alpha in registers, never in
memory): Pallas Triton in jax 0.10 lowers no gather from registers and has no shared memory for the tables. No
Mosaic TPU kernel: a table lookup is a data-dependent gather from VMEM, which Mosaic's vector units do not offer
per lane (the TPU path for binary codes is to expand bit planes to +-1 tiles and use the MXU, which is what the
spec's dot already does).
"""
from __future__ import annotations

from qjax.core.formats.bcq import BCQArray
from qjax.kernels.dispatch import Op
from qjax.kernels.lut_gemm import xla

__all__ = ["OP", "lut_gemm", "path_name"]

OP = Op("lut_gemm", dispatch_arg=1)
OP.reference(BCQArray)(xla.lut_gemm)


def lut_gemm(x, w: BCQArray, act=None, *, implementation: str = "auto", fallback: bool = True):
  """``x [..., K] @ W^T -> [..., N]`` in ``x.dtype`` through the dispatcher (module docstring)."""
  return OP(x, w, act, implementation=implementation, fallback=fallback)


def path_name(w: BCQArray, act=None, implementation: str = "auto") -> str:
  """Which path :func:`lut_gemm` takes for ``w`` (CLI summaries)."""
  return OP.path_name(None, w, act, implementation=implementation, path_args=(w, act))


# A linear whose weight is a BCQArray calls ``qmatmul``: it runs this op, with the implementation asked for.
from qjax.kernels import qmatmul as _qmatmul  # noqa: E402
# the implementations register with OP, so they are imported after it exists
from qjax.kernels.lut_gemm import cpu  # noqa: E402,F401  (registers the implementation)
from qjax.kernels.lut_gemm import pallas_triton  # noqa: E402,F401  (registers the implementation)


def _forward(name: str):
  def run(x, w, act=None):
    return lut_gemm(x, w, act, implementation=name, fallback=False)

  def path(w, act):
    chosen, fn = OP.select(None, w, act, implementation=name)[0]
    return fn.path(w, act) if chosen == name else None

  run.path = path
  return run


_qmatmul.OP.reference(BCQArray)(_forward("xla"))
for _name, _platforms in OP.platforms().items():
  _qmatmul.OP.implementation(_name, BCQArray, platforms=_platforms)(_forward(_name))
