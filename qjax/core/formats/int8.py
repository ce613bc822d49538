"""Int8 weight pytrees for real integer matmuls (:mod:`qjax.kernels.int8_matmul`).

* :class:`Int8Array`: per-output-channel int8 weights ``w ~= scale[o] * (codes[o, k] - zero[o])`` with signed
  int8 ``codes [out, in]``, float32 ``scale [out, 1]`` and int8 ``zero [out, 1]`` (``None``: symmetric, zero 0).
  Built from an 8-bit per-channel :class:`~qjax.core.formats.qarray.QArray` by :func:`from_qarray` (unsigned codes shifted
  by 128, same dequantized values). With a per-token 8-bit activation quantizer the linear runs as an
  ``int8 x int8 -> int32`` ``dot_general`` (W8A8).
* :class:`LLMInt8Array`: LLM.int8() weights (vector-wise absmax: ``codes = round(127 w / max|w[o]|)``,
  ``scale = max|w[o]| / 127``) plus the outlier ``threshold`` of the mixed-precision decomposition; the
  linear quantizes its own activations (see :func:`qjax.kernels.int8_matmul.llm_int8_matmul`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.base import QuantizedTensor, register_quantized
from qjax.core.formats.qarray import QArray


@register_quantized
class Int8Array(QuantizedTensor):
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array | None
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

  def dequantize(self) -> jax.Array:
    q = self.codes.astype(jnp.float32)
    if self.zero is not None:
      q = q - self.zero.astype(jnp.float32)
    return (self.scale.astype(jnp.float32) * q).astype(self.dtype)


def from_qarray(q: QArray) -> Int8Array:
  """The same 8-bit per-channel weights as signed int8 codes (zero points shifted by 128 as well)."""
  if q.bits != 8 or q.group_size != -1 or q.perm is not None:
    raise ValueError(f"int8 weights need 8 bits, per-channel ranges and natural column order "
                     f"(got {q.bits} bits, group size {q.group_size}, perm {q.perm is not None})")
  codes = (q.unpacked_codes().astype(jnp.int32) - 128).astype(jnp.int8)
  zero = None if q.zero is None else (q.zero.astype(jnp.int32) - 128).astype(jnp.int8)
  return Int8Array(codes, q.scale.astype(jnp.float32), zero, shape=q.shape, dtype=q.dtype)


@register_quantized
class LLMInt8Array(QuantizedTensor):
  codes: jax.Array       # int8 [out, in], in [-127, 127]
  scale: jax.Array       # float32 [out, 1] = max|w[o]| / 127
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  threshold: float = dataclasses.field(default=6.0, metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

  def dequantize(self) -> jax.Array:
    return (self.scale * self.codes.astype(jnp.float32)).astype(self.dtype)


def to_int8(params):
  """Every 8-bit per-channel, natural-order QArray of ``params`` as an :class:`Int8Array` (others kept), so its
  linears run as real ``int8 x int8 -> int32`` matmuls. Raises InputError when there is none."""
  flat = tree.flatten(params)
  paths = [p for p, v in flat.items() if isinstance(v, QArray) and v.bits == 8 and v.group_size == -1
           and v.perm is None]
  if not paths:
    raise InputError("int8 execution found no 8-bit per-channel weights to run in int8")
  return tree.replace(params, paths, lambda p, q: from_qarray(q))
