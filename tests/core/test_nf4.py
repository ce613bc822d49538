"""QLoRA's NF4 format: the levels against the published table, storage, block-wise absmax quantization against
numpy, double quantization of the absmax values, jit / pytree / qmatmul / checkpoint behaviour."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core import packing
from qjax.core.errors import InputError
from qjax.core.formats.nf4 import DYNAMIC_MAP, NF4_LEVELS, NF4Array, bits_per_parameter
from qjax.io import checkpoint
from qjax.kernels.qmatmul import qmatmul

# QLoRA appendix E / bitsandbytes' NF4 table.
PUBLISHED = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                      0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                      0.7229568362236023, 1.0])


def _weights(seed, out=37, n=96):
  """Heavy-tailed float32 ``[out, n]`` (every NF4 level gets used)."""
  return np.random.default_rng(seed).standard_t(4, size=(out, n)).astype(np.float32)


def _numpy_nf4(w, block_size=64):
  """Independent single-level NF4: ``(codes [B, block_size], absmax [B], dequantized [out, in])`` with blocks of the
  row-major flattening (last one zero-padded), ``code = argmin_j |w / absmax - L_j|`` (first index on a tie) and
  ``deq = L[code] * absmax`` in float32."""
  flat = w.reshape(-1)
  blocks = np.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size)
  absmax = np.abs(blocks).max(axis=1)
  y = blocks / np.where(absmax > 0, absmax, np.float32(1))[:, None]
  codes = np.abs(y[..., None] - NF4_LEVELS).argmin(-1)
  deq = (NF4_LEVELS[codes] * absmax[:, None]).reshape(-1)[:flat.size].reshape(w.shape)
  return codes, absmax, deq


def test_levels_equal_the_published_table():
  """The construction (float32 probabilities as bitsandbytes takes them) gives the published table to 1e-7 (in fact
  bit for bit); level 7 is an exact 0."""
  assert NF4_LEVELS.dtype == np.float32 and NF4_LEVELS.shape == (16,)
  np.testing.assert_allclose(NF4_LEVELS, PUBLISHED, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(NF4_LEVELS, np.float32(PUBLISHED))
  assert NF4_LEVELS[7] == 0.0 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[15] == 1.0


def test_dynamic_map_is_the_signed_bitsandbytes_map():
  """256 sorted distinct values: 0, 1 and +-10**(e-6) times the 2**e midpoints of linspace(0.1, 1, 2**e + 1) for
  e = 0..6 (smallest magnitude 0.55e-6, most negative -(1 - 0.9 / 128))."""
  assert DYNAMIC_MAP.dtype == np.float32 and DYNAMIC_MAP.shape == (256,)
  assert np.all(np.diff(DYNAMIC_MAP) > 0) and 0.0 in DYNAMIC_MAP and DYNAMIC_MAP[-1] == 1.0
  np.testing.assert_allclose(DYNAMIC_MAP[0], -(1 - 0.9 / 128), rtol=1e-7)
  np.testing.assert_allclose(DYNAMIC_MAP[DYNAMIC_MAP > 0][0], 0.55e-6, rtol=1e-6)
  assert (DYNAMIC_MAP > 0).sum() == 128 and (DYNAMIC_MAP < 0).sum() == 127


@pytest.mark.parametrize("double_quant, want", [(True, 4.127), (False, 4.5)])
def test_bits_per_parameter_4096_square(double_quant, want):
  """4096 x 4096, block 64 (B = 262144 blocks), block2 256 (B2 = 1024): n/2 code bytes plus B uint8 codes, B2
  float32 scales and a float32 offset (double quant), or B float32 absmax (bits 4 + 32/64 = 4.5)."""
  q = jax.eval_shape(lambda w: NF4Array.quantize(w, double_quant=double_quant),
                     jax.ShapeDtypeStruct((4096, 4096), jnp.float32))
  n, nb = 4096 * 4096, 4096 * 4096 // 64
  assert q.nbytes == (n // 2 + nb + 4 * (nb // 256) + 4 if double_quant else n // 2 + 4 * nb)
  bits = 8 * q.nbytes / q.size
  assert abs(bits - want) < 1e-3
  assert abs(bits - bits_per_parameter(64, 256, double_quant)) < 1e-5  # the per-tensor offset: 32 / n bits


def test_stored_leaves_of_a_partial_shape():
  """3 x 50 with block 64: 150 weights in 3 blocks (the last 22 wide), 192 padded codes in 96 bytes."""
  q = NF4Array.quantize(jnp.asarray(_weights(0, 3, 50)))
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (packing.packed_length(192, 4, 8),) == (96,)
  assert q.absmax.dtype == jnp.uint8 and q.absmax.shape == (3,)
  assert q.absmax_scale.dtype == jnp.float32 and q.absmax_scale.shape == (1,) and q.absmax_offset.shape == ()
  single = NF4Array.quantize(jnp.asarray(_weights(0, 3, 50)), double_quant=False)
  assert single.absmax.dtype == jnp.float32 and single.absmax_scale is None and single.absmax_offset is None


@pytest.mark.parametrize("shape", [(37, 96), (3, 50), (8, 64)])
def test_single_level_equals_numpy(shape):
  w = _weights(1, *shape)
  q = NF4Array.quantize(jnp.asarray(w), double_quant=False)
  codes, absmax, deq = _numpy_nf4(w)
  np.testing.assert_array_equal(np.asarray(packing.unpack(q.codes, bits=4, n=codes.size)), codes.reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), deq)


def test_double_quant_error_is_bounded_by_the_second_level_step():
  """``|absmax_dq - absmax| <= absmax_scale[b // 256] * h`` with ``h`` half the largest gap of the dynamic map (also
  the distance from -1 to its lowest value); the 4-bit codes are the same, so ``|deq_dq - deq| <= |L| * that``."""
  w = _weights(2, 64, 1024) * np.random.default_rng(3).uniform(0.5, 2.0, size=(64, 1))  # 1024 blocks, 4 of 256
  single = NF4Array.quantize(jnp.asarray(w, jnp.float32), double_quant=False)
  double = NF4Array.quantize(jnp.asarray(w, jnp.float32))
  np.testing.assert_array_equal(np.asarray(double.codes), np.asarray(single.codes))
  a, a_dq = np.asarray(single.absmax), np.asarray(double.block_absmax())
  np.testing.assert_allclose(np.asarray(double.absmax_offset), a.mean(), rtol=1e-6)
  half_step = max(np.diff(DYNAMIC_MAP).max() / 2, 1 + DYNAMIC_MAP[0])
  bound = np.repeat(np.asarray(double.absmax_scale), 256) * half_step * (1 + 1e-5) + 1e-6
  err = np.abs(a_dq - a)
  assert np.all(err <= bound) and err.max() > 0
  deq, deq_dq = np.asarray(single.dequantize()), np.asarray(double.dequantize())
  assert np.all(np.abs(deq_dq - deq).reshape(-1, 64).max(1) <= bound)
  assert np.linalg.norm(deq_dq - deq) < 2e-2 * np.linalg.norm(w)
  assert np.linalg.norm(deq_dq - w) < 1.01 * np.linalg.norm(deq - w)


def test_levels_times_absmax_round_trip_exactly():
  """Blocks holding every level four times (so max |w| = absmax) times a random absmax: quantizing gives back the
  codes and the matrix; re-quantizing any dequantized matrix gives back its codes."""
  rng = np.random.default_rng(4)
  codes = np.stack([rng.permutation(np.repeat(np.arange(16), 4)) for _ in range(24)])  # [24 blocks, 64]
  absmax = rng.uniform(0.01, 5.0, size=(24, 1)).astype(np.float32)
  w = (NF4_LEVELS[codes] * absmax).reshape(16, 96)
  q = NF4Array.quantize(jnp.asarray(w), double_quant=False)
  np.testing.assert_array_equal(np.asarray(packing.unpack(q.codes, bits=4, n=w.size)), codes.reshape(-1))
  np.testing.assert_array_equal(np.asarray(q.dequantize()), w)
  q1 = NF4Array.quantize(jnp.asarray(_weights(5)), double_quant=False)
  q2 = NF4Array.quantize(q1.dequantize(), double_quant=False)
  np.testing.assert_array_equal(np.asarray(q2.codes), np.asarray(q1.codes))
  np.testing.assert_array_equal(np.asarray(q2.dequantize()), np.asarray(q1.dequantize()))


def test_a_tie_takes_the_lower_level():
  """``w / absmax`` exactly at the float32 midpoint of levels ``j`` and ``j + 1`` gets code ``j``."""
  mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
  w = np.concatenate([[1.0], mids, np.zeros(48)]).astype(np.float32)[None]  # one block, absmax 1
  q = NF4Array.quantize(jnp.asarray(w), double_quant=False)
  np.testing.assert_array_equal(np.asarray(packing.unpack(q.codes, bits=4, n=16)), [15, *range(15)])


@pytest.mark.parametrize("double_quant", [False, True])
def test_partial_and_all_zero_blocks(double_quant):
  """3 x 50, block 64: block 0 (row 0 and the first 14 weights of row 1) is all zero, block 2 is 22 wide; an all-zero
  matrix (second-level scale 0 too) dequantizes to exact zeros."""
  w = _weights(6, 3, 50)
  w[0], w[1, :14] = 0.0, 0.0
  q = NF4Array.quantize(jnp.asarray(w), double_quant=double_quant)
  deq = np.asarray(q.dequantize())
  assert deq.shape == (3, 50) and np.all(np.isfinite(deq))
  assert np.all(deq.reshape(-1)[:64] == 0.0) and np.all(np.asarray(packing.unpack(q.codes, bits=4, n=64)) == 7)
  if not double_quant:
    np.testing.assert_array_equal(deq, _numpy_nf4(w)[2])
  else:
    np.testing.assert_allclose(deq, _numpy_nf4(w)[2], rtol=0, atol=1e-2 * np.abs(w).max())
  zero = NF4Array.quantize(jnp.zeros((4, 40)), double_quant=double_quant).dequantize()
  np.testing.assert_array_equal(np.asarray(zero), np.zeros((4, 40), np.float32))


def test_jit_pytree_and_dtype():
  """Jitted quantize gives the same leaves; jitted dequantize agrees to 1e-6 (XLA may fuse the second level's
  ``code * scale + offset`` into an FMA)."""
  w = jnp.asarray(_weights(7, 16, 128))
  eager = NF4Array.quantize(w)
  jitted = jax.jit(NF4Array.quantize, static_argnames=("block_size", "double_quant", "block2", "dtype"))(w, block2=256)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(jax.tree.leaves(eager)) == 4 and len(jax.tree.leaves(NF4Array.quantize(w, double_quant=False))) == 2
  mapped = jax.tree.map(lambda x: x, eager)
  assert type(mapped) is NF4Array and jax.tree.structure(mapped) == jax.tree.structure(eager)
  np.testing.assert_allclose(np.asarray(jax.jit(lambda q: q.dequantize())(eager)), np.asarray(eager.dequantize()),
                             rtol=1e-6, atol=0)
  bf16 = NF4Array.quantize(w.astype(jnp.bfloat16))
  assert bf16.dtype == "bfloat16" and bf16.dequantize().dtype == jnp.bfloat16
  assert NF4Array.quantize(w, dtype=jnp.bfloat16).dequantize().dtype == jnp.bfloat16


def test_qmatmul_is_x_times_dequantized_transpose():
  """``x [2, 5, 128] @ W[48, 128]^T`` through qmatmul's emulated path (any QuantizedTensor)."""
  q = NF4Array.quantize(jnp.asarray(_weights(8, 48, 128)))
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 5, 128)).astype(np.float32))
  y = qmatmul(x, q)
  assert y.shape == (2, 5, 48)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x @ q.dequantize().T), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("double_quant", [False, True])
def test_checkpoint_round_trip(tmp_path, double_quant):
  """A bare parameter tree through :func:`qjax.io.checkpoint.save` / ``load_params``."""
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({}))
  q = NF4Array.quantize(jnp.asarray(_weights(10, 12, 100)), double_quant=double_quant)
  params = {"layer": {"w": q, "b": jnp.arange(12, dtype=jnp.float32)}}
  dest = checkpoint.save(tmp_path / "ckpt", params, source_dir=src, dtype="float32",
                         method={"name": "nf4", "config": {}})
  back, meta = checkpoint.load_params(dest)
  got = back["layer"]["w"]
  assert type(got) is NF4Array and meta["qarrays"]["layer/w"]["type"] == "NF4Array"
  assert jax.tree.structure(got) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(q)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(q.dequantize()))
  np.testing.assert_array_equal(np.asarray(back["layer"]["b"]), np.arange(12, dtype=np.float32))


@pytest.mark.parametrize("shape, kwargs", [
    ((4, 64), dict(block_size=0)), ((4, 64), dict(block_size=63)), ((4, 64), dict(block_size=-64)),
    ((4, 64), dict(block_size=2.0)), ((4, 64), dict(block_size=True)), ((4, 64), dict(block2=0)),
    ((4, 64), dict(block2=None)), ((2, 4, 64), {})])
def test_bad_arguments_raise_input_error(shape, kwargs):
  with pytest.raises(InputError) as e:
    NF4Array.quantize(jnp.zeros(shape), **kwargs)
  assert "\n" not in str(e.value)
