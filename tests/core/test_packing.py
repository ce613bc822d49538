"""Bit packing: exact round trips for every width 1..8 and the documented word layout."""
import numpy as np
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from qjax.core import packing


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), word_bits=st.sampled_from([32, 8]), rows=st.integers(1, 5),
       n=st.integers(1, 200), axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1))
def test_round_trip_any_shape(bits, word_bits, rows, n, axis, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, n) if axis == 1 else (n, rows))
  packed = packing.pack(jnp.asarray(codes), bits=bits, axis=axis, word_bits=word_bits)
  assert packed.dtype == (jnp.uint32 if word_bits == 32 else jnp.uint8)
  assert packed.shape[axis] == packing.packed_length(n, bits, word_bits)
  back = packing.unpack(packed, bits=bits, n=n, axis=axis)
  np.testing.assert_array_equal(np.asarray(back), codes)


def _bitstream_reference(codes, bits, word_bits):
  """Independent packer with Python integers: codes form a little-endian bit stream per block."""
  n = len(codes)
  nblk = -(-n // word_bits)
  words = []
  for b in range(nblk):
    acc = 0
    for j, c in enumerate(codes[b * word_bits:(b + 1) * word_bits]):
      acc |= int(c) << (bits * j)
    words += [(acc >> (word_bits * w)) & ((1 << word_bits) - 1) for w in range(bits)]
  return np.array(words, dtype=np.uint64)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("word_bits", [32, 8])
def test_layout_matches_bitstream(bits, word_bits):
  codes = np.random.default_rng(bits).integers(0, 2**bits, size=77)
  packed = np.asarray(packing.pack(jnp.asarray(codes), bits=bits, word_bits=word_bits)).astype(np.uint64)
  np.testing.assert_array_equal(packed, _bitstream_reference(codes, bits, word_bits))


def test_4bit_is_eight_codes_per_word():
  codes = np.arange(8) + 1
  word = int(np.asarray(packing.pack(jnp.asarray(codes), bits=4))[0])
  assert word == sum(int(c) << (4 * j) for j, c in enumerate(codes))
