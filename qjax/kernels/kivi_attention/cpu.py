"""Native CPU ``kivi_attention`` for decode (``t <= 16`` new queries per row), an XLA FFI custom call into
``cpu_kernel.cc``: one task per (row, KV head) computes the scores of its query rows against the packed key codes
(per key group ``q * scale`` and ``q . mn`` once, then one unpack and one dot per token), a float32 softmax over
the visible store and pending tokens, and the value sum from the packed value codes (``p * scale`` per channel
group, ``p * mn`` summed apart), one token's codes at a time: the store is never dequantized, so a 2-bit cache
moves about 1/16 of the bytes a float32 one does.

Shapes and dtypes: the op's (:mod:`qjax.kernels.kivi_attention`); ``q``, ``k_pend``, ``v_pend`` float32,
bfloat16 or float16 (converted to float32; the result is cast back to ``q.dtype``); scales and minima float16,
bfloat16 or float32, read as stored; codes of 1..8 bits (AVX2 unpacking for 1..4 and 8 bits, the portable path
for 5..7); ``head_dim`` a multiple of 8.

Unsupported (``NotImplementedError``, the dispatcher then runs the XLA spec): ``t > 16`` (prefill, which the
spec's batched einsums serve better), other dtypes, a backend other than CPU, and every call when the extension is
not built. Output rows of a query that sees no token are 0. No derivative rule; ``vmap`` runs sequentially.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core.formats.kv import KIVITensor
from qjax.kernels.dispatch import NativeKernel
from qjax.kernels.kivi_attention import OP

NATIVE = NativeKernel("qjax.kernels.kivi_attention._cpu_kernel", "kivi_attention", "cpu kivi_attention")

__all__ = ["MAX_T", "available", "dense_attention_cpu", "kivi_attention_cpu"]

MAX_T = 16
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


available = NATIVE.available


def _check(q, keys: KIVITensor, values: KIVITensor, k_pend):
  NATIVE.check()
  if not 0 < q.shape[1] <= MAX_T:
    raise NotImplementedError(f"cpu kivi_attention: {q.shape[1]} queries per row (decode kernel: 1..{MAX_T})")
  if q.dtype not in _DTYPES or k_pend.dtype not in _DTYPES:
    raise NotImplementedError(f"cpu kivi_attention: dtype {q.dtype} / {k_pend.dtype}")
  if keys.head_dim % 8 or keys.codes.dtype != jnp.uint8 or values.codes.dtype != jnp.uint8:
    raise NotImplementedError("cpu kivi_attention: head_dim a multiple of 8 and uint8 code words only")
  for a in (keys.scale, keys.mn, values.scale, values.mn):
    if a.dtype not in _DTYPES:
      raise NotImplementedError(f"cpu kivi_attention: scale dtype {a.dtype}")


def kivi_attention_cpu(q, keys: KIVITensor, values: KIVITensor, k_pend, v_pend, mask_store, mask_pend, length,
                       scale: float, *, force_scalar: bool = False):
  """The op through the native kernel (``force_scalar``: the portable path even on AVX2 CPUs, for tests)."""
  _check(q, keys, values, k_pend)
  f32 = lambda a: a.astype(jnp.float32)
  call = jax.ffi.ffi_call(NATIVE.target(), jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
  out = call(f32(q), keys.codes, keys.scale, keys.mn, values.codes, values.scale, values.mn, f32(k_pend),
             f32(v_pend), mask_store.astype(bool), mask_pend.astype(bool), length.astype(jnp.int32),
             k_bits=np.int64(keys.bits), v_bits=np.int64(values.bits), group_size=np.int64(keys.group_size),
             scale=np.float32(scale), force_scalar=np.int64(force_scalar))
  return out.astype(q.dtype)


def dense_attention_cpu(q, k, v, mask, scale: float):
  """Decode attention over dense keys and values ``k, v [b, s, kvh, d]`` (``q [b, t, h, d]``, ``t <= 16``,
  ``mask [b, t, s]``): the kernel with an empty store, every token a pending one (hidden tokens, e.g. a cache's
  free slots, are not scored)."""
  b, _, kvh, d = k.shape
  if d % 8:
    raise NotImplementedError(f"cpu attention: head_dim {d} is not a multiple of 8")
  empty = lambda cols, dt: jnp.zeros((b, kvh, 0, cols), dt)
  store = lambda per_channel: KIVITensor(empty(d, jnp.uint8), empty(d if per_channel else 1, jnp.float32),
                                         empty(d if per_channel else 1, jnp.float32), bits=8, group_size=d,
                                         head_dim=d, per_channel=per_channel)
  return kivi_attention_cpu(q, store(True), store(False), k, v, jnp.zeros((*mask.shape[:2], 0), bool), mask,
                            jnp.zeros((b,), jnp.int32), scale)


@OP.implementation("cpu", KIVITensor, platforms=("cpu",))
def kivi_attention(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale):
  return kivi_attention_cpu(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale)


kivi_attention.path = lambda: (f"cpu kernel (native, packed codes, t <= {MAX_T}; prefill: xla)"
                               if available() and jax.default_backend() == "cpu" else None)
