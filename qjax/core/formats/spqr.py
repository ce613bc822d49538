"""``SpQRArray``: an SpQR-quantized matrix (two-level quantized group statistics plus exact sparse outliers in CSR
form), and the reference's bits-per-weight formula."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import packing, uniform
from qjax.core.formats.base import QuantizedTensor, register_quantized


def average_bits(bits: int, group_size: int, qq_scale_bits: int, qq_zero_bits: int, qq_groupsize: int,
                 outlier_share: float = 0.0) -> float:
  """The reference's bits per weight (``get_average_number_of_bits``, ``round_zero=False``)::

      bits + (qq_scale_bits + qq_zero_bits) / g + 2 * (16 + 16) / (g * beta2) + 32 * outlier_share

  i.e. the weight codes, the level-2 codes of one scale and one zero per group, a 16-bit ``(s2, z2)`` pair for the
  scales and one for the zeros per ``g x beta2`` block, and 32 bits (16-bit value + 16-bit column index) per
  outlier. It ignores packing padding, partial groups, the CSR row pointers and the act-order permutation, which
  :attr:`SpQRArray.stored_bits` counts.
  """
  return (bits + (qq_scale_bits + qq_zero_bits) / group_size + 2 * (16 + 16) / (group_size * qq_groupsize)
          + 32 * outlier_share)


@register_quantized
class SpQRArray(QuantizedTensor):
  """An SpQR-quantized ``[out, in]`` matrix (``G = ceil(in / group_size)`` groups, ``R = ceil(out / qq_groupsize)``
  runs of output rows, ``nnz`` outliers; columns in stored order: original column ``perm[k]`` at ``k``).

  Leaves:
    * ``codes``: uint32 ``[out, packed_length(in, bits)]``, the level-1 weight codes packed along the input axis.
    * ``scale_codes``: uint32 ``[packed_length(out * G, qq_scale_bits)]``, the level-2 codes of the ``[out, G]``
      level-1 scales (row-major, packed as one bit stream).
    * ``scale_stats``: ``[R, G, 2]`` in ``stats_dtype``: the level-2 ``(s2, z2)`` of the scales.
    * ``zero_codes`` / ``zero_stats``: the same for the zero points (``qq_zero_bits``); ``None`` when symmetric.
    * ``outlier_rows``: ``[out + 1]`` CSR row pointers; ``outlier_cols``: ``[nnz]`` stored-order columns;
      ``outlier_values``: ``[nnz]`` in ``stats_dtype``, the weights kept exactly.
    * ``perm``: ``[in]`` act-order column order (original column ``perm[k]`` stored at ``k``), or ``None``.
  Indices are uint16, int32 where they can exceed 65535 (``in > 65536`` columns, ``nnz > 65535`` row pointers).

  ``w[o, k] = s_hat[o, k // g] * (codes[o, k] - z_hat[o, k // g])`` except at outliers, where it is the stored
  value, with ``s_hat[o, G] = s2[o // beta2, G] * (scale_code[o, G] - z2[o // beta2, G])`` (same for ``z_hat``).
  """
  codes: jax.Array
  scale_codes: jax.Array
  scale_stats: jax.Array
  zero_codes: jax.Array | None
  zero_stats: jax.Array | None
  outlier_rows: jax.Array
  outlier_cols: jax.Array
  outlier_values: jax.Array
  perm: jax.Array | None
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))
  qq_scale_bits: int = dataclasses.field(metadata=dict(static=True))
  qq_zero_bits: int = dataclasses.field(metadata=dict(static=True))
  qq_groupsize: int = dataclasses.field(metadata=dict(static=True))
  sym: bool = dataclasses.field(metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

  @classmethod
  def from_codes(cls, codes, scale_codes, scale_stats, zero_codes, zero_stats, outliers, values, *, perm, bits,
                 group_size, qq_scale_bits, qq_zero_bits, qq_groupsize, sym, dtype, stats_dtype) -> "SpQRArray":
    """Packs unpacked parts (host side: the outlier count is data dependent).

    ``codes`` ``[out, in]`` and ``scale_codes`` / ``zero_codes`` ``[out, G]`` integer-valued; ``*_stats``
    ``[R, G, 2]``; ``outliers`` bool ``[out, in]`` and ``values`` ``[out, in]`` (read where ``outliers``), both in
    stored column order; ``zero_*`` are ``None`` when ``sym``.
    """
    out, n = codes.shape
    outliers = np.asarray(outliers)
    rows, cols = np.nonzero(outliers)                       # row-major = CSR order
    pack_flat = lambda c, b: packing.pack(jnp.asarray(c).reshape(-1).astype(jnp.uint8), bits=b)
    return cls(
        codes=packing.pack(jnp.asarray(codes).astype(jnp.uint8), bits=bits, axis=-1),
        scale_codes=pack_flat(scale_codes, qq_scale_bits),
        scale_stats=jnp.asarray(scale_stats, stats_dtype),
        zero_codes=None if sym else pack_flat(zero_codes, qq_zero_bits),
        zero_stats=None if sym else jnp.asarray(zero_stats, stats_dtype),
        outlier_rows=jnp.asarray(np.concatenate([[0], np.cumsum(outliers.sum(1))]), index_dtype(len(rows) + 1)),
        outlier_cols=jnp.asarray(cols, index_dtype(n)),
        outlier_values=jnp.asarray(np.asarray(values)[rows, cols], stats_dtype),
        perm=None if perm is None else jnp.asarray(perm, index_dtype(n)),
        shape=(out, n), bits=bits, group_size=group_size, qq_scale_bits=qq_scale_bits, qq_zero_bits=qq_zero_bits,
        qq_groupsize=qq_groupsize, sym=sym, dtype=jnp.dtype(dtype).name)

  @property
  def num_outliers(self) -> int:
    return int(self.outlier_values.shape[0])

  @property
  def average_bits(self) -> float:
    """The reference formula (:func:`average_bits`) with this tensor's settings and outlier share."""
    return average_bits(self.bits, self.group_size, self.qq_scale_bits, self.qq_zero_bits, self.qq_groupsize,
                        self.num_outliers / self.size)

  @property
  def stored_bits(self) -> float:
    """Bits actually stored per weight, ``8 * nbytes / size``: the formula plus packing padding, partial groups,
    the CSR row pointers (``16 / in`` or ``32 / in`` per weight), the 16-bit permutation with act-order
    (``16 / out``) and, for float32 stats or int32 column indices, their extra width; minus the zero-point terms
    when symmetric. The extras matter for tiny matrices only (0.5 bits per weight on stories260K, where
    ``in, out`` are 32..172; about 0.01 at 4096 x 4096)."""
    return 8 * self.nbytes / self.size

  def level1_stats(self) -> tuple[jax.Array, jax.Array]:
    """Float32 ``(s_hat, z_hat)`` ``[out, G]``: the level-2 dequantized scales and zero points."""
    scale = _dequantize_stat(self.scale_codes, self.scale_stats, self.qq_scale_bits, self.shape[0],
                             self.qq_groupsize)
    if self.sym:
      return scale, jnp.full_like(scale, 2**self.bits / 2)
    return scale, _dequantize_stat(self.zero_codes, self.zero_stats, self.qq_zero_bits, self.shape[0],
                                   self.qq_groupsize)

  def _scatter_outliers(self, dense: jax.Array, values: jax.Array) -> jax.Array:
    """``dense [out, in]`` (stored column order) with ``values [nnz]`` written at the outliers, then the columns
    put back in original order."""
    nnz = self.outlier_values.shape[0]
    rows = jnp.searchsorted(self.outlier_rows, jnp.arange(nnz, dtype=jnp.int32), side="right") - 1
    dense = dense.at[rows, self.outlier_cols.astype(jnp.int32)].set(values)
    if self.perm is not None:
      dense = jnp.take(dense, jnp.argsort(self.perm.astype(jnp.int32)), axis=1)
    return dense

  def outlier_mask(self) -> jax.Array:
    """Bool ``[out, in]``, original column order: True where the weight is an outlier kept exactly."""
    return self._scatter_outliers(jnp.zeros(self.shape, bool), jnp.ones(self.outlier_values.shape, bool))

  def dequantize(self) -> jax.Array:
    """The ``[out, in]`` matrix in ``self.dtype``, columns in original order (one compiled function: run eagerly,
    op-by-op dispatch would compile the outlier-count dependent ops once per matrix)."""
    return _dequantize(self)


@jax.jit
def _dequantize(a: SpQRArray) -> jax.Array:
  n = a.shape[1]
  scale, zero = a.level1_stats()
  q = uniform.to_groups(packing.unpack(a.codes, bits=a.bits, n=n).astype(jnp.float32), a.group_size)
  w = uniform.from_groups(uniform.dequantize(q, scale[..., None], zero[..., None]), n)
  return a._scatter_outliers(w, a.outlier_values.astype(jnp.float32)).astype(a.dtype)


def index_dtype(n: int):
  """Narrowest stored type of a column index below ``n``."""
  return jnp.uint16 if n <= 2**16 else jnp.int32


def _dequantize_stat(codes, stats, bits, out, run):
  """Level-2 dequantization of stored statistics: ``[out, G]`` float32 from packed codes and ``[R, G, 2]``."""
  ng = stats.shape[1]
  q = packing.unpack(codes, bits=bits, n=out * ng).reshape(out, ng).astype(jnp.float32)
  st = jnp.repeat(stats.astype(jnp.float32), run, axis=0)[:out]
  return uniform.dequantize(q, st[..., 0], st[..., 1])
