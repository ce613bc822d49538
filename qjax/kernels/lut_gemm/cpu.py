"""Native CPU ``lut_gemm`` for :class:`~qjax.core.formats.bcq.BCQArray` weights at decode sizes (``M <= 4`` rows),
an XLA FFI custom call into ``cpu_kernel.cc``: LUT-GEMM's table lookups on the packed bit planes.

Per call and row of ``x``, one 256-entry table of signed sums per 8 activations (``K / 8`` tables, ``K * 128``
bytes, cache-resident), then one byte-indexed lookup per 8 binaries per bit plane, scaled by the group's alpha and
accumulated; the offset term is ``offset * sum(x)`` over the group. No weight is decompressed. The tables are
float32 sums of the activations, so the result equals the spec up to float summation order.

Shapes and dtypes: ``x [..., K]`` float32 / bfloat16 / float16 (leading dims flattened to ``M <= 4`` rows; bf16 /
f16 converted to float32, the result cast back to ``x.dtype``; ``act`` runs first); the BCQArray ``[N, K]`` with
``planes [q, N, ceil(K / 32)]`` uint32, ``alpha [N, G, q]`` and ``offset [N, G]`` float16 / bfloat16 / float32 (read
as stored), per channel or groups of a multiple of 8 columns (the last group may be partial; any ``K``); with
``perm`` the columns of ``x`` are permuted once per call. Result ``[..., N]`` in ``x.dtype``.

The lookups cost the same for every row of ``x`` (one table per row), so the time grows linearly in ``M``: past 4
rows decompress + matmul is faster (``eval/bench_kernels.py``: M = 16 on 4096 x 4096 W4 g64 took 237 ms here,
the spec about 50 ms).

Unsupported (``NotImplementedError``; the dispatcher then runs the spec): ``M > 4`` or ``M == 0``, group sizes
that are not a multiple of 8 (a group must be whole table bytes), other dtypes, a backend other than CPU, and every
call when the extension is not built. Rows are split over XLA's intra-op thread pool and the calling thread.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core.formats.bcq import BCQArray
from qjax.kernels.dispatch import NativeKernel
from qjax.kernels.lut_gemm import OP

NATIVE = NativeKernel("qjax.kernels.lut_gemm._cpu_kernel", "lut_gemm", "cpu lut_gemm")

__all__ = ["MAX_M", "available", "lut_gemm_cpu"]

MAX_M = 4
_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


available = NATIVE.available


def _check(x, w: BCQArray, m: int):
  NATIVE.check()
  if not 0 < m <= MAX_M:
    raise NotImplementedError(f"cpu lut_gemm: M = {m} rows (decode kernel: 1..{MAX_M})")
  if x.dtype not in _DTYPES or w.alpha.dtype not in _DTYPES:
    raise NotImplementedError(f"cpu lut_gemm: activation {x.dtype} / alpha {w.alpha.dtype} (f32, bf16, f16 only)")
  if w.group_size != -1 and w.group_size % 8:
    raise NotImplementedError(f"cpu lut_gemm: group size {w.group_size} (a multiple of 8 only)")
  if x.shape[-1] != w.shape[1]:
    raise ValueError(f"lut_gemm: x has {x.shape[-1]} features, the weight {w.shape[1]}")


def lut_gemm_cpu(x: jax.Array, w: BCQArray, act=None) -> jax.Array:
  """``x [..., K] @ W^T -> [..., N]`` in ``x.dtype`` with the native table-lookup kernel."""
  x = jnp.asarray(x)
  if act is not None:
    x = act(x)
  lead = x.shape[:-1]
  _check(x, w, math.prod(lead))
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  if w.perm is not None:
    x2 = jnp.take(x2, w.perm, axis=-1)
  offset = jnp.zeros((0, 0), w.alpha.dtype) if w.offset is None else w.offset.astype(w.alpha.dtype)
  call = jax.ffi.ffi_call(NATIVE.target(), jax.ShapeDtypeStruct((x2.shape[0], w.shape[0]), jnp.float32),
                          vmap_method="sequential")
  y = call(x2, w.planes, w.alpha, offset, group_size=np.int64(w.group_size), k=np.int64(w.shape[1]),
           has_offset=np.int64(w.offset is not None))
  return y.reshape(*lead, w.shape[0]).astype(x.dtype)


@OP.implementation("cpu", BCQArray, platforms=("cpu",))
def lut_gemm_bcq(x, w, act=None):
  return lut_gemm_cpu(x, w, act)


lut_gemm_bcq.path = lambda w, act: (f"cpu LUT-GEMM kernel (native, M <= {MAX_M}; more rows: decompress + matmul)"
                                    + ("" if act is None else " on fake-quantized activations")
                                    if available() and jax.default_backend() == "cpu" else None)
