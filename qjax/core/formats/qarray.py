"""``QArray``: a quantized ``[out_features, in_features]`` matrix as a JAX pytree.

Leaves (arrays, traced under ``jit``):
  * ``codes``: the integer codes packed along the input axis by :mod:`qjax.core.packing` (uint32 or uint8 words),
    shape ``[out, packed_length(in)]``; column ``k`` of the stored codes is original column ``perm[k]``.
  * ``scale``: ``[out, G]`` per-group scales (``G = ceil(in / group_size)``, 1 per channel), in ``scale_dtype``.
  * ``zero``: ``[out, G]`` uint8 integer zero points, or ``None`` when symmetric (the zero is then the constant
    ``(maxq + 1) / 2`` and costs no storage).
  * ``perm``: optional int32 ``[in]`` column order of the stored codes (act-order); groups are contiguous in the
    stored order. ``None`` means natural order.
Static metadata (part of the tree structure): ``shape``, ``bits``, ``group_size``, ``sym``, ``word_bits`` and the
``dtype`` that :meth:`QArray.dequantize` returns.

``w ~= scale[o, k // g] * (codes[o, k] - zero[o, k // g])`` in stored column order.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.core import packing, uniform
from qjax.core.formats.base import QuantizedTensor, register_quantized


@register_quantized
class QArray(QuantizedTensor):
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  perm: jax.Array | None
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))
  sym: bool = dataclasses.field(metadata=dict(static=True))
  word_bits: int = dataclasses.field(default=32, metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

  @classmethod
  def from_codes(cls, codes, scale, zero, *, bits: int, group_size: int, sym: bool, perm=None,
                 dtype="float32", scale_dtype=None, word_bits: int = 32) -> "QArray":
    """Builds a QArray from unpacked codes ``[out, in]`` and ``[out, G]`` scale / zero (float, integer-valued).

    ``scale_dtype`` (default: ``dtype``) is the storage type of the scales; zero points are stored as uint8.
    """
    out, n = codes.shape
    scale_dtype = jnp.dtype(scale_dtype or dtype)
    return cls(
        codes=packing.pack(codes, bits=bits, axis=-1, word_bits=word_bits),
        scale=jnp.asarray(scale).reshape(out, -1).astype(scale_dtype),
        zero=None if sym else jnp.asarray(zero).reshape(out, -1).astype(jnp.uint8),
        perm=None if perm is None else jnp.asarray(perm, jnp.int32),
        shape=(out, n), bits=bits, group_size=group_size, sym=sym, word_bits=word_bits,
        dtype=jnp.dtype(dtype).name)

  @property
  def num_groups(self) -> int:
    return uniform.num_groups(self.shape[1], self.group_size)

  def unpacked_codes(self) -> jax.Array:
    """uint8 codes ``[out, in]`` in stored column order."""
    return packing.unpack(self.codes, bits=self.bits, n=self.shape[1], axis=-1)

  def zero_point(self) -> jax.Array:
    """Float32 zero points ``[out, G]`` (the symmetric constant when ``zero`` is None)."""
    if self.zero is None:
      return jnp.full(self.scale.shape, (2**self.bits) / 2, jnp.float32)
    return self.zero.astype(jnp.float32)

  def take_rows(self, ids: jax.Array) -> jax.Array:
    """Rows ``ids`` of the dequantized matrix (``ids.shape + [in]``), dequantizing only the gathered rows (codes,
    scales and zeros are stored per row)."""
    flat = jnp.reshape(ids, (-1,))
    rows = lambda a: None if a is None else jnp.take(a, flat, axis=0)
    sub = dataclasses.replace(self, codes=rows(self.codes), scale=rows(self.scale), zero=rows(self.zero),
                              shape=(flat.shape[0], self.shape[1]))
    return sub.dequantize().reshape(*jnp.shape(ids), self.shape[1])

  def dequantize(self) -> jax.Array:
    """The ``[out, in]`` matrix in ``self.dtype``, columns in original order."""
    n = self.shape[1]
    q = uniform.to_groups(self.unpacked_codes().astype(jnp.float32), self.group_size)
    w = uniform.from_groups(
        uniform.dequantize(q, self.scale.astype(jnp.float32)[..., None], self.zero_point()[..., None]), n)
    if self.perm is not None:
      w = jnp.take(w, jnp.argsort(self.perm), axis=1)
    return w.astype(self.dtype)
