"""Quantized KV-cache tensors: KIVI's uniform per-channel / per-token codes (:class:`KIVITensor`) and KVQuant's
non-uniform codes with sparse exact outliers (:class:`QuantizedKV`)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import packing
from qjax.core.formats.base import QuantizedTensor, register_quantized

_static = dict(metadata=dict(static=True))


@register_quantized
class KIVITensor(QuantizedTensor):
  """Quantized keys or values ``[..., T, head_dim]`` (``...`` = batch, heads).

  ``codes [..., T, packed_length(head_dim, bits, 8)]`` uint8 (packed along ``head_dim``); ``scale``, ``mn``
  (float16 by default): ``[..., T / G, head_dim]`` per channel for keys (``per_channel``), ``[..., T, head_dim /
  G]`` per token for values. ``x_hat = q * scale + mn``; :meth:`dequantize` returns ``dtype``.
  """
  codes: jax.Array
  scale: jax.Array
  mn: jax.Array
  bits: int = dataclasses.field(**_static)
  group_size: int = dataclasses.field(**_static)
  head_dim: int = dataclasses.field(**_static)
  per_channel: bool = dataclasses.field(**_static)
  dtype: str = dataclasses.field(default="float32", **_static)

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.codes.shape[:-1], self.head_dim)

  def dequantize(self) -> jax.Array:
    q = packing.unpack(self.codes, bits=self.bits, n=self.head_dim, axis=-1, dtype=jnp.float32)
    q = group_view(q, self.group_size, self.per_channel)
    s, m = (jnp.expand_dims(a.astype(jnp.float32), -2 if self.per_channel else -1) for a in (self.scale, self.mn))
    return (q * s + m).reshape(self.shape).astype(self.dtype)


def group_view(x, g: int, per_channel: bool):
  """``[..., T, d]`` -> ``[..., T / g, g, d]`` (token groups) or ``[..., T, d / g, g]`` (channel groups)."""
  *lead, t, d = x.shape
  return x.reshape(*lead, t // g, g, d) if per_channel else x.reshape(*lead, t, d // g, g)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """Quantized keys or values of ``[..., kv_heads, head_dim]`` activations, one row of ``C`` channels per token.

  ``codes [..., ceil(C/8) * bits]`` uint8 (:func:`qjax.core.packing.pack`, 8-bit words), ``zero, range`` broadcastable
  to ``[..., C]`` (keys: calibrated ``[C]`` float32; values: ``[..., 1]`` per token), ``codebook [2**bits]``
  float32, outliers ``outlier_idx [..., cap]`` (channel; ``C`` = empty) and ``outlier_val [..., cap]`` (exact).
  """
  codes: jax.Array
  zero: jax.Array
  range: jax.Array
  codebook: jax.Array
  outlier_idx: jax.Array
  outlier_val: jax.Array
  heads: int = dataclasses.field(metadata=dict(static=True))
  head_dim: int = dataclasses.field(metadata=dict(static=True))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """``x_hat = codebook[code] * range + zero``, outliers exact -> ``[..., heads, head_dim]`` ``dtype``."""
    c = self.heads * self.head_dim
    bits = int(np.log2(self.codebook.shape[0]))
    lead = self.codes.shape[:-1]
    codes = packing.unpack(self.codes, bits=bits, n=c, dtype=jnp.int32)
    x = (self.codebook[codes] * self.range + self.zero).astype(dtype).reshape(-1, c)
    idx = self.outlier_idx.reshape(x.shape[0], self.outlier_idx.shape[-1]).astype(jnp.int32)
    x = x.at[jnp.arange(x.shape[0])[:, None], idx].set(self.outlier_val.reshape(idx.shape).astype(dtype), mode="drop")
    return x.reshape(*lead, self.heads, self.head_dim)
