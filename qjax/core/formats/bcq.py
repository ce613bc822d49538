"""``BCQArray``: a binary-coding-quantized ``[out_features, in_features]`` matrix (LUT-GEMM's weight format).

Binary-coding quantization writes each weight as a sum of ``q`` signed scales (Xu et al. 2018; LUT-GEMM, Park et
al. 2024, eq. 1-2)::

  w[o, k] ~= sum_{i < q} alpha[o, g, i] * b_i[o, k]  (+ offset[o, g]),   b_i in {-1, +1},  g = k // group_size

Leaves (arrays, traced under ``jit``):
  * ``planes``: uint32 ``[q, out, ceil(in / 32)]``, one bit plane per binary: bit ``k % 32`` of word ``k // 32``
    of row ``o`` of plane ``i`` is 1 where ``b_i[o, k] = +1`` (the 1-bit little-endian layout of
    :mod:`qjax.core.packing`; padding columns hold 0, i.e. ``-1``, and meet zero activations);
  * ``alpha``: ``[out, G, q]`` per-group scales (``G = ceil(in / group_size)``, 1 per channel), in
    ``alpha_dtype`` (float16 by default);
  * ``offset``: ``[out, G]`` per-group offsets in the same dtype, or ``None`` (plain BCQ);
  * ``perm``: optional int32 ``[in]`` stored column order (a converted act-order QArray), as in
    :class:`~qjax.core.formats.qarray.QArray`.
Static: ``shape``, ``bits`` (``q``), ``group_size`` and the ``dtype`` :meth:`BCQArray.dequantize` returns.

Stored bits per weight: ``q + 16 q / g (+ 16 / g with offsets)`` at float16 scales (:attr:`nbytes` counts them).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.core import packing, uniform
from qjax.core.formats.base import QuantizedTensor, register_quantized


@register_quantized
class BCQArray(QuantizedTensor):
  planes: jax.Array
  alpha: jax.Array
  offset: jax.Array | None
  perm: jax.Array | None
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

  @classmethod
  def from_binaries(cls, binaries, alpha, offset=None, *, group_size: int, perm=None, dtype="float32",
                    alpha_dtype="float16") -> "BCQArray":
    """From signs ``binaries [out, in, q]`` (+1 / -1; anything > 0 counts as +1), ``alpha [out, G, q]`` and an
    optional ``offset [out, G]``."""
    out, n, q = binaries.shape
    bits01 = jnp.moveaxis(binaries > 0, -1, 0).astype(jnp.uint8)          # [q, out, in]
    return cls(planes=packing.pack(bits01, bits=1, axis=-1),
               alpha=jnp.asarray(alpha).reshape(out, -1, q).astype(alpha_dtype),
               offset=None if offset is None else jnp.asarray(offset).reshape(out, -1).astype(alpha_dtype),
               perm=None if perm is None else jnp.asarray(perm, jnp.int32),
               shape=(out, n), bits=q, group_size=group_size, dtype=jnp.dtype(dtype).name)

  @property
  def num_groups(self) -> int:
    return uniform.num_groups(self.shape[1], self.group_size)

  def binaries(self) -> jax.Array:
    """float32 signs ``[out, in, q]`` in stored column order."""
    bits01 = packing.unpack(self.planes, bits=1, n=self.shape[1], axis=-1)  # [q, out, in]
    return jnp.moveaxis(bits01.astype(jnp.float32) * 2 - 1, 0, -1)

  def dequantize(self) -> jax.Array:
    """The ``[out, in]`` matrix in ``self.dtype``, columns in original order (float32 arithmetic). The planes are
    summed one at a time (a Python loop over the ``q <= 8`` planes: XLA fuses each into one elementwise pass,
    10x faster than one reduction over a ``[q, ...]`` array)."""
    out, n = self.shape
    alpha = self.alpha.astype(jnp.float32)
    w = 0.0 if self.offset is None else self.offset.astype(jnp.float32)[..., None]
    for i in range(self.bits):
      bits01 = (self.planes[i][..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1        # [out, W, 32]
      signs = bits01.astype(jnp.float32).reshape(out, -1)[:, :n] * 2 - 1
      w = w + uniform.to_groups(signs, self.group_size) * alpha[..., i, None]           # [out, G, g]
    w = uniform.from_groups(w, n)
    if self.perm is not None:
      w = jnp.take(w, jnp.argsort(self.perm), axis=1)
    return w.astype(self.dtype)
