"""QLoRA's stored NF4 format (Dettmers et al. 2023): 4-bit NormalFloat codes with block-wise absmax scales, the
scales optionally double-quantized to 8 bits.

A weight ``w [out, in]`` is flattened row-major and cut into blocks of ``block_size`` consecutive elements (the last
block zero-padded); block ``b`` stores ``absmax[b] = max |w|`` over the block and, per element, the 4-bit code of
the nearest :data:`NF4_LEVELS` entry to ``w / absmax[b]``, so ``w ~= NF4_LEVELS[code] * absmax[b]``. A value exactly
halfway between two levels takes the lower one (bitsandbytes' NF4 decision tree does the same); an all-zero block
stores absmax 0 and dequantizes to exact zeros.

Double quantization (QLoRA section 3), as bitsandbytes' ``quantize_4bit(compress_statistics=True)`` does it: the
float32 absmax values lose their mean ``absmax_offset`` and are quantized in blocks of ``block2`` with bitsandbytes'
signed dynamic 8-bit map (:data:`DYNAMIC_MAP`, ``create_dynamic_map(signed=True)``), each block scaled by its own
``absmax_scale = max |absmax - offset|``: ``absmax[b] ~= DYNAMIC_MAP[q[b]] * absmax_scale[b // block2] + offset``.

Leaves of :class:`NF4Array` (``n = out * in``, ``B = ceil(n / block_size)`` blocks, ``B2 = ceil(B / block2)``):
  * ``codes``: uint8 ``[packed_length(B * block_size, 4, 8)]`` (``B * block_size / 2`` when ``block_size`` is a
    multiple of 8), two codes per byte, element ``2k`` in the low nibble of byte ``k`` (:mod:`qjax.core.packing`;
    bitsandbytes puts the first element in the high nibble, so the bytes are not interchangeable);
  * ``absmax``: uint8 ``[B]`` dynamic-map codes when double-quantized, else float32 ``[B]``;
  * ``absmax_scale``: float32 ``[B2]`` (``None`` without double quantization);
  * ``absmax_offset``: float32 scalar (``None`` without double quantization).
Static fields: ``shape``, ``block_size``, ``block2``, ``double_quant`` and the ``dtype`` :meth:`NF4Array.dequantize`
returns. Storage: :func:`bits_per_parameter`.
"""
from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import packing
from qjax.core.errors import InputError
from qjax.core.formats.base import QuantizedTensor, register_quantized

NF4_OFFSET = 0.9677083  # QLoRA's outermost quantile: the mean of 1 - 1/(2*15) and 1 - 1/(2*16)


def _linspace32(start: float, stop: float, n: int) -> np.ndarray:
  """``n`` evenly spaced float32 values computed in float32 as torch's ``linspace`` does (the first half from
  ``start``, the second from ``stop``), so the quantile probabilities below are bitsandbytes' own."""
  a, b = np.float32(start), np.float32(stop)
  step = (b - a) / np.float32(n - 1)
  i = np.arange(n, dtype=np.float32)
  return np.where(np.arange(n) < n // 2, a + step * i, b - step * (np.float32(n - 1) - i)).astype(np.float32)


def _nf4_levels() -> np.ndarray:
  """The 16 NF4 levels: 8 positive normal quantiles at ``linspace(NF4_OFFSET, 0.5, 9)[:-1]``, 7 negative ones at
  ``linspace(NF4_OFFSET, 0.5, 8)[:-1]`` and an exact 0, sorted and divided by the largest value (so they span
  [-1, 1]). As in bitsandbytes, the probabilities are float32, the quantiles float64 rounded to float32 and the
  division float32; this reproduces the table published with QLoRA bit for bit (a float64 construction is up to
  1.2e-7 away from it)."""
  inv_cdf = statistics.NormalDist().inv_cdf
  pos = [inv_cdf(float(p)) for p in _linspace32(NF4_OFFSET, 0.5, 9)[:-1]]
  neg = [-inv_cdf(float(p)) for p in _linspace32(NF4_OFFSET, 0.5, 8)[:-1]]
  v = np.sort(np.array(pos + [0.0] + neg)).astype(np.float32)
  return v / v.max()


def _dynamic_map() -> np.ndarray:
  """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True, max_exponent_bits=7)``), float32
  ``[256]`` sorted: for ``e = 0..6`` the ``2**e`` midpoints of ``linspace(0.1, 1, 2**e + 1)`` times ``10**(e - 6)``
  with both signs (254 values), plus 0 and 1. Its range is [-0.99296875, 1]. Computed in float64 (bitsandbytes
  uses float32 arithmetic, so entries may differ from its table in the last float32 bit)."""
  vals = [0.0, 1.0]
  for e in range(7):
    edges = np.linspace(0.1, 1.0, 2**e + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0**(e - 6)
    vals += [*mids, *-mids]
  return np.sort(np.array(vals)).astype(np.float32)


NF4_LEVELS = _nf4_levels()
DYNAMIC_MAP = _dynamic_map()


def bits_per_parameter(block_size: int = 64, block2: int = 256, double_quant: bool = True) -> float:
  """Stored bits per weight, ignoring padding and the per-tensor offset (4 bytes a tensor):
  ``4 + 8 / block_size + 32 / (block_size * block2)`` double-quantized (one uint8 code per block, one float32 scale
  per ``block2`` blocks), else ``4 + 32 / block_size`` (one float32 absmax per block). 64, 256: 4.127; 64: 4.5."""
  if double_quant:
    return 4 + 8 / block_size + 32 / (block_size * block2)
  return 4 + 32 / block_size


def _check(shape, block_size, block2):
  if len(shape) != 2:
    raise InputError(f"NF4 quantizes 2-D weights [out, in], got shape {tuple(shape)}")
  for name, v in (("block_size", block_size), ("block2", block2)):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise InputError(f"NF4 {name} must be a positive integer, got {v!r}")
  if block_size % 2:
    raise InputError(f"NF4 block_size must be even (two 4-bit codes a byte), got {block_size}")


def _blocks(x: jax.Array, size: int) -> jax.Array:
  """Flat ``x`` zero-padded to whole blocks, ``[ceil(len / size), size]``."""
  x = x.reshape(-1)
  return jnp.pad(x, (0, -x.shape[0] % size)).reshape(-1, size)


def _absmax_quantize(x: jax.Array, levels: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """Block-wise absmax quantization of ``x [nblocks, size]`` onto the sorted ``levels``: ``(codes uint8 [nblocks,
  size], absmax float32 [nblocks])``, each code the nearest level to ``x / absmax`` (a tie takes the lower level;
  an all-zero block divides by 1)."""
  absmax = jnp.max(jnp.abs(x), axis=1)
  y = x / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  mids = (levels[1:] + levels[:-1]) / 2
  return jnp.searchsorted(jnp.asarray(mids), y, side="left").astype(jnp.uint8), absmax


@register_quantized
class NF4Array(QuantizedTensor):
  codes: jax.Array
  absmax: jax.Array
  absmax_scale: jax.Array | None
  absmax_offset: jax.Array | None
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
  block2: int = dataclasses.field(default=256, metadata=dict(static=True))
  double_quant: bool = dataclasses.field(default=True, metadata=dict(static=True))
  dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))

  @classmethod
  def quantize(cls, w: jax.Array, *, block_size: int = 64, double_quant: bool = True, block2: int = 256,
               dtype=None) -> "NF4Array":
    """NF4 of ``w [out, in]`` (any float dtype, quantized in float32); ``dtype`` (default ``w.dtype``) is what
    :meth:`dequantize` returns. Traceable: ``jax.jit`` it with the keyword arguments static."""
    _check(w.shape, block_size, block2)
    codes, absmax = _absmax_quantize(_blocks(jnp.asarray(w, jnp.float32), block_size), NF4_LEVELS)
    scale = offset = None
    if double_quant:
      offset = jnp.mean(absmax)
      q, scale = _absmax_quantize(_blocks(absmax - offset, block2), DYNAMIC_MAP)
      absmax = q.reshape(-1)[:absmax.shape[0]]
    return cls(packing.pack(codes.reshape(-1), bits=4, word_bits=8), absmax, scale, offset, shape=tuple(w.shape),
               block_size=block_size, block2=block2, double_quant=double_quant,
               dtype=jnp.dtype(dtype or w.dtype).name)

  @property
  def num_blocks(self) -> int:
    return -(-self.size // self.block_size)

  def block_absmax(self) -> jax.Array:
    """Float32 ``[num_blocks]`` absmax of every block (decoded from the 8-bit codes when double-quantized)."""
    if not self.double_quant:
      return self.absmax
    scale = jnp.repeat(self.absmax_scale, self.block2)[:self.num_blocks]
    return jnp.asarray(DYNAMIC_MAP)[self.absmax] * scale + self.absmax_offset

  def dequantize(self) -> jax.Array:
    """``NF4_LEVELS[code] * absmax[block]``, the ``[out, in]`` matrix in ``self.dtype``."""
    codes = packing.unpack(self.codes, bits=4, n=self.num_blocks * self.block_size)
    w = jnp.asarray(NF4_LEVELS)[codes].reshape(self.num_blocks, self.block_size) * self.block_absmax()[:, None]
    return w.reshape(-1)[:self.size].reshape(self.shape).astype(self.dtype)


@register_quantized
class NF4LoRAArray(NF4Array):
  """An NF4 weight with its LoRA adapter beside it, unmerged (QLoRA's result): ``W = NF4(W0) + lora_scale B A``
  with float32 ``lora_a [r, in]`` and ``lora_b [out, r]`` and the static ``lora_scale = alpha / r``.
  :meth:`dequantize` is the merged matrix, :meth:`base` the frozen NF4 part."""
  lora_a: jax.Array = None
  lora_b: jax.Array = None
  lora_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

  def base(self) -> NF4Array:
    return NF4Array(**{f.name: getattr(self, f.name) for f in dataclasses.fields(NF4Array)})

  def delta(self) -> jax.Array:
    """``lora_scale B A`` ``[out, in]`` float32."""
    return self.lora_scale * (self.lora_b.astype(jnp.float32) @ self.lora_a.astype(jnp.float32))

  def dequantize(self) -> jax.Array:
    return (self.base().dequantize().astype(jnp.float32) + self.delta()).astype(self.dtype)
