"""Native CPU ``qmatmul`` for :class:`~qjax.core.formats.qarray.QArray` weights at decode sizes (``M <= 16`` rows),
an XLA FFI custom call into ``cpu_kernel.cc``: it reads the packed codes in place, so a 4-bit GEMV moves ~1/8 of
the bytes of the float32 one (dense decode on CPU runs at the memory roofline).

What it computes, per output element, in float32::

  y[m, n] = sum_g scale[n, g] * (sum_{k in g} code[n, k] * x[m, k] - zero[n, g] * sum_{k in g} x[m, k])

which equals ``x @ W^T`` for ``W[n, k] = scale[n, k // g] * (code[n, k] - zero[n, k // g])`` (the QArray's
``dequantize``) up to float rounding; the group sums of ``x`` are computed once per call.

Shapes and dtypes:
  * ``x [..., K]`` float32, bfloat16 or float16 (leading dims flattened to ``M <= 16`` rows; bf16 / f16 converted
    to float32 and the result cast back to ``x.dtype``); with ``act`` the activation quantizer runs first;
  * the QArray ``[N, K]``: ``codes [N, ceil(K / 32) * bits]`` uint32 words (``word_bits=32``) for ``bits`` 1..8
    (each row a little-endian bit stream, :mod:`qjax.core.packing`); ``scale [N, G]`` float16 / bfloat16 /
    float32, read as stored (other float dtypes are converted to float32); ``zero [N, G]`` uint8, or None
    (symmetric: ``2**bits / 2``); per channel, or groups of a multiple of the codes per packing unit (``32 / bits``
    for 1, 2, 4, 8 bits, 32 for 3, 5, 6, 7 bits: so 32, 64, 128 at every width), the last group possibly partial;
    with ``perm`` the columns of ``x`` are permuted once per call (``x[..., perm]``) and the kernel runs in the
    stored order;
  * result ``[..., N]`` in ``x.dtype``.

Threading: output rows are split in chunks over XLA's intra-op thread pool (the FFI ``ThreadPool``) and the calling
thread; small problems run on the calling thread. The AVX2 + FMA + F16C code is chosen at run time
(``__builtin_cpu_supports``); other CPUs (and non-x86 builds) run a portable scalar path (:data:`HAS_AVX2`).

Unsupported (``NotImplementedError``, the dispatcher then runs the XLA reference): ``M > 16`` or ``M == 0``
(prefill is served by the XLA path), uint8 words (``word_bits=8``), group sizes that are not a multiple of the
codes per packing unit (e.g. 48 at 3 bits), other activation dtypes (float64, integers), a backend other than CPU,
and every call when the extension is not built. No derivative rule (decode only); ``vmap`` runs sequentially.

Build: ``setup.py`` declares the optional C++17 extension ``qjax.kernels.qmatmul._cpu_kernel`` (``-O3``, no
``-march``) against the FFI headers of the installed jaxlib; ``pip install -e .`` builds it in place, and a
missing compiler only leaves this implementation unavailable.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core.formats.qarray import QArray
from qjax.kernels.dispatch import NativeKernel
from qjax.kernels.qmatmul import OP, xla

NATIVE = NativeKernel("qjax.kernels.qmatmul._cpu_kernel", "qmatmul", "cpu qmatmul")
IMPORT_ERROR = NATIVE.import_error

__all__ = ["MAX_M", "HAS_AVX2", "available", "qmatmul_cpu"]

MAX_M = 16
HAS_AVX2 = bool(NATIVE.lib is not None and NATIVE.lib.HAS_AVX2)
_SCALE_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
_X_DTYPES = _SCALE_DTYPES


available = NATIVE.available


def _unit_codes(bits: int) -> int:
  """Codes per packing unit: one word for widths dividing 32, else ``bits`` words (32 codes)."""
  return 32 // bits if 32 % bits == 0 else 32


def _check(x, w: QArray, m: int):
  """Raises NotImplementedError for what the kernel does not cover."""
  NATIVE.check()
  if not 0 < m <= MAX_M:
    raise NotImplementedError(f"cpu qmatmul: M = {m} rows (decode kernel: 1..{MAX_M})")
  if x.dtype not in _X_DTYPES:
    raise NotImplementedError(f"cpu qmatmul: activation dtype {x.dtype} (float32, bfloat16, float16 only)")
  if w.word_bits != 32 or w.codes.dtype != jnp.uint32 or not 1 <= w.bits <= 8:
    raise NotImplementedError(f"cpu qmatmul: {w.bits}-bit codes in {w.codes.dtype} words")
  if w.group_size != -1 and (w.group_size <= 0 or w.group_size % _unit_codes(w.bits)):
    raise NotImplementedError(f"cpu qmatmul: group size {w.group_size} at {w.bits} bits "
                              f"(needs a multiple of {_unit_codes(w.bits)})")
  if x.shape[-1] != w.shape[1]:
    raise ValueError(f"qmatmul: x has {x.shape[-1]} features, the weight {w.shape[1]}")


def _ffi(x2: jax.Array, w: QArray, force_scalar: bool) -> jax.Array:
  """``x2 [M, K]`` float32 (stored column order) times the QArray: ``[M, N]`` float32."""
  scale = w.scale if w.scale.dtype in _SCALE_DTYPES else w.scale.astype(jnp.float32)
  zero = jnp.zeros((0,), jnp.uint8) if w.zero is None else w.zero.astype(jnp.uint8)
  call = jax.ffi.ffi_call(NATIVE.target(), jax.ShapeDtypeStruct((x2.shape[0], w.shape[0]), jnp.float32),
                          vmap_method="sequential")
  return call(x2, w.codes, scale, zero, bits=np.int64(w.bits), group_size=np.int64(w.group_size),
              k=np.int64(w.shape[1]), has_zero=np.int64(w.zero is not None), force_scalar=np.int64(force_scalar))


def qmatmul_cpu(x: jax.Array, w: QArray, act=None, *, force_scalar: bool = False) -> jax.Array:
  """``x [..., in] @ W^T -> [..., out]`` in ``x.dtype`` with the native kernel (``force_scalar``: the portable
  path even on AVX2 CPUs, for tests)."""
  x = jnp.asarray(x)
  if act is not None:
    x = act(x)
  lead = x.shape[:-1]
  _check(x, w, math.prod(lead))
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  if w.perm is not None:
    x2 = jnp.take(x2, w.perm, axis=-1)
  return _ffi(x2, w, force_scalar).reshape(*lead, w.shape[0]).astype(x.dtype)


@OP.implementation("cpu", QArray, platforms=("cpu",))
def qmatmul_qarray(x, w, act=None):
  return qmatmul_cpu(x, w, act)


qmatmul_qarray.path = lambda w, act: (f"cpu kernel (native, M <= {MAX_M}; more rows: emulated){xla.suffix(act)}"
                                      if available() and jax.default_backend() == "cpu" else None)
