"""The uniform quantizer and RTN against the reference fake quantizer (torch, written from the notes)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hf_reference import reference_fake_quant, reference_quant_params
from qjax.core import uniform
from qjax.methods.weights import rtn
from qjax.core.formats.qarray import QArray


def _weights(seed, out=24, n=96):
  w = np.random.default_rng(seed).standard_t(4, size=(out, n)).astype(np.float32)
  w[:, 0] = -np.abs(w[:, 0]) - 0.1  # every row and first group has a negative value (reference quirk Q1 aside)
  return w


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [-1, 32, 96])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_equals_reference_fake_quant(bits, group_size, sym):
  w = _weights(bits)
  if group_size > 0 and sym:
    w[:, ::group_size] = -np.abs(w[:, ::group_size]) - 0.1  # each group has a negative value
  q = rtn.quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, sym=sym)
  ref = reference_fake_quant(torch.tensor(w), bits, group_size, sym).numpy()
  np.testing.assert_array_equal(np.asarray(q.dequantize()), ref)
  scale, zero = reference_quant_params(torch.tensor(w), bits, group_size, sym)
  np.testing.assert_array_equal(np.asarray(q.scale), scale.numpy())
  np.testing.assert_array_equal(np.asarray(q.zero_point()), zero.numpy())


def test_dequantized_differs_and_codes_are_in_range():
  w = jnp.asarray(_weights(0))
  q = rtn.quantize_weight(w, bits=3, group_size=32)
  codes = np.asarray(q.unpacked_codes())
  assert codes.max() <= 7 and q.codes.dtype == jnp.uint32
  assert not np.array_equal(np.asarray(q.dequantize()), np.asarray(w))
  assert len(np.unique(np.asarray(q.dequantize())[0, :32])) <= 8


def test_partial_last_group_is_its_own_range():
  """172 columns in groups of 32: 6 groups, the last one 12 columns wide with its own scale."""
  w = _weights(1, out=4, n=172)
  w[:, 160:] *= 100.0
  q = rtn.quantize_weight(jnp.asarray(w), bits=4, group_size=32, scale_dtype="float32")
  assert q.scale.shape == (4, 6)
  for g, (lo, hi) in enumerate([(i, min(i + 32, 172)) for i in range(0, 172, 32)]):
    ref = reference_fake_quant(torch.tensor(w[:, lo:hi]), 4, -1, False).numpy()
    np.testing.assert_array_equal(np.asarray(q.dequantize())[:, lo:hi], ref)


def test_symmetric_nonnegative_row_uses_full_grid():
  """Quirk Q1 fixed: an all-positive row keeps its max (the reference clips it to 7/15 of it at 4 bits)."""
  w = jnp.asarray(np.linspace(0.0, 1.0, 16, dtype=np.float32)[None])
  deq = np.asarray(rtn.quantize_weight(w, bits=4, sym=True).dequantize())
  ref = reference_fake_quant(torch.tensor(np.asarray(w)), 4, -1, True).numpy()
  assert deq.max() > 0.8 and ref.max() < 0.5


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), group_size=st.sampled_from([-1, 8, 16, 24]), sym=st.booleans(),
       out=st.integers(1, 6), n=st.integers(1, 70), seed=st.integers(0, 1000))
def test_qarray_error_bound_and_storage(bits, group_size, sym, out, n, seed):
  """|w - deq| <= scale / 2 inside the range; stored bytes are exactly codes + scales + zeros."""
  w = np.random.default_rng(seed).normal(size=(out, n)).astype(np.float32)
  q = rtn.quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, sym=sym, scale_dtype="float32")
  wg = np.asarray(uniform.to_groups(jnp.asarray(w), group_size))
  scale = np.asarray(q.scale)[..., None]
  err = np.abs(np.asarray(uniform.to_groups(q.dequantize(), group_size)) - wg)
  clipped = sym & (wg > 0)  # the symmetric grid's top level is absmax - scale
  assert np.all(err[~clipped] <= scale.repeat(wg.shape[-1], -1)[~clipped] * 0.5 + 1e-6)
  ng = uniform.num_groups(n, group_size)
  words = -(-n // 32) * bits
  assert q.nbytes == out * (words * 4 + ng * 4 + (0 if sym else ng))


def test_quantize_weight_is_jittable_in_a_pytree():
  q = rtn.quantize_weight(jnp.asarray(_weights(2)), bits=4, group_size=32)
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), QArray)
  y = jax.jit(lambda q, x: x @ q.dequantize().T)(q, jnp.ones((2, 96)))
  assert y.shape == (2, 24)
