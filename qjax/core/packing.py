"""Vectorized bit packing of integer codes into uint32 or uint8 words.

Layout (``"bitstream"``): along the packed axis, every block of ``W`` consecutive codes (``W`` = word width,
32 or 8) becomes ``bits`` consecutive words holding the block's codes as a little-endian bit stream: code ``j``
of a block occupies bits ``[bits*j, bits*j + bits)`` of the block, i.e. it starts in word ``(bits*j) // W`` at
bit ``(bits*j) % W`` and spills into the next word when it straddles a word boundary. For 2, 4 and 8 bits this
is the familiar "``W // bits`` codes per word, code ``j`` at bit ``bits*j``" layout; for 3 bits it is the
HF GPTQ layout (32 codes in 3 int32 words). The packed axis is zero-padded to a multiple of ``W``.

The Python loop below runs over the ``W`` code slots of a block (a constant 32 or 8), so the traced program
does not grow with the array size.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_WORD_DTYPES = {32: jnp.uint32, 8: jnp.uint8}


def _slots(bits: int, word_bits: int):
  """Static placement of each code slot of a block: (word index, bit offset, straddles next word)."""
  out = []
  for j in range(word_bits):
    start = bits * j
    word, off = divmod(start, word_bits)
    out.append((word, off, off + bits > word_bits))
  return out


def packed_length(n: int, bits: int, word_bits: int = 32) -> int:
  """Number of words that ``n`` codes of ``bits`` bits occupy along the packed axis."""
  return -(-n // word_bits) * bits


def _check(bits: int, word_bits: int):
  if not 1 <= bits <= 8:
    raise ValueError(f"bits must be in 1..8, got {bits}")
  if word_bits not in _WORD_DTYPES:
    raise ValueError(f"word_bits must be 32 or 8, got {word_bits}")


@functools.partial(jax.jit, static_argnames=("bits", "axis", "word_bits"))
def pack(codes: jax.Array, *, bits: int, axis: int = -1, word_bits: int = 32) -> jax.Array:
  """Packs integer codes in ``[0, 2**bits)`` along ``axis``.

  Args:
    codes: integer array of any shape; values must lie in ``[0, 2**bits)`` (higher bits are masked off).
    bits: code width, 1..8.
    axis: the axis to pack; its length ``n`` becomes ``ceil(n / word_bits) * bits``.
    word_bits: 32 (uint32 words) or 8 (uint8 words).
  Returns:
    uint32 or uint8 array, the packed axis of length ``packed_length(n, bits, word_bits)``.
  """
  _check(bits, word_bits)
  wdt = _WORD_DTYPES[word_bits]
  x = jnp.moveaxis(codes, axis, -1)
  n = x.shape[-1]
  nblk = -(-n // word_bits)
  x = jnp.pad(x.astype(jnp.uint32) & ((1 << bits) - 1), [(0, 0)] * (x.ndim - 1) + [(0, nblk * word_bits - n)])
  x = x.reshape(*x.shape[:-1], nblk, word_bits)
  words = [jnp.zeros(x.shape[:-1], jnp.uint32) for _ in range(bits)]
  for j, (w, off, straddle) in enumerate(_slots(bits, word_bits)):
    c = x[..., j]
    words[w] = words[w] | (c << off)
    if straddle:
      words[w + 1] = words[w + 1] | (c >> (word_bits - off))
  mask = (1 << word_bits) - 1
  out = jnp.stack(words, axis=-1).reshape(*x.shape[:-2], nblk * bits) & np.uint32(mask)
  return jnp.moveaxis(out.astype(wdt), -1, axis)


@functools.partial(jax.jit, static_argnames=("bits", "n", "axis", "dtype"))
def unpack(packed: jax.Array, *, bits: int, n: int, axis: int = -1, dtype=jnp.uint8) -> jax.Array:
  """Inverse of :func:`pack`: returns the first ``n`` codes along ``axis`` as ``dtype`` (uint8 by default)."""
  word_bits = jnp.iinfo(packed.dtype).bits
  _check(bits, word_bits)
  x = jnp.moveaxis(packed, axis, -1).astype(jnp.uint32)
  nblk = x.shape[-1] // bits
  x = x.reshape(*x.shape[:-1], nblk, bits)
  word, off, straddle = (np.array(v) for v in zip(*_slots(bits, word_bits)))
  # One gather per word position and vectorized shifts over the block's code slots (cheap to compile).
  lo = jnp.take(x, word, axis=-1) >> off.astype(np.uint32)
  hi = jnp.take(x, np.minimum(word + 1, bits - 1), axis=-1) << (word_bits - off).astype(np.uint32)
  codes = jnp.where(straddle, lo | hi, lo) & np.uint32((1 << bits) - 1)
  out = codes.reshape(*x.shape[:-2], nblk * word_bits)[..., :n]
  return jnp.moveaxis(out.astype(dtype), -1, axis)
