"""The Pallas Triton ``kivi_attention`` kernel: the shared grid in interpret mode (on CPU the kernel runs through
the Pallas interpreter, which fills unwritten outputs with NaN, so a missing store fails the comparison), several
store chunks and splits with a length that ends mid-store (and NaN store data past it, which must never be read),
the dot paths, padded head counts and head sizes, sensitivity to a corrupted value scale, the unsupported cases,
and the lowering to Triton for CUDA."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_base import KIVIAttentionBase, kivi_operands, numpy_kivi_attention

from qjax.kernels.kivi_attention import kivi_attention
from qjax.kernels.kivi_attention.pallas_triton import Tiling  # importing the module registers the implementation
from qjax.kernels.kivi_attention.pallas_triton import choose_tiling, kivi_attention_pallas


class TestKIVIAttentionPallasTriton(KIVIAttentionBase):
  implementation = "pallas_triton"


def _case(h, kvh, d, L, P, b, t, bits, G, dtype="float32", scale_dtype="float16"):
  return dict(h=h, kvh=kvh, d=d, L=L, P=P, b=b, t=t, bits=bits, G=G, dtype=dtype, scale_dtype=scale_dtype)


def _tol(dtype):
  return 2e-5 if jnp.dtype(dtype) == jnp.float32 else 2e-2


def _check(got, want, dtype):
  got = np.asarray(jnp.asarray(got).astype(jnp.float32))
  assert np.isfinite(got).all()
  tol = _tol(dtype)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def _run(ops, scale, tiling=None):
  return jax.jit(lambda *a: kivi_attention_pallas(*a, scale, tiling=tiling))(*ops)


def _poison_past(x, length):
  """``x`` (keys or values) with NaN scale and mn at every token (values) or group (keys) from ``length[b]`` on."""
  n = x.scale.shape[2]
  unit = x.group_size if x.per_channel else 1
  past = jnp.asarray(np.arange(n)[None, :] * unit >= np.asarray(length)[:, None])[:, None, :, None]
  nan = lambda a: jnp.where(past, jnp.nan, a).astype(a.dtype)
  return dataclasses.replace(x, scale=nan(x.scale), mn=nan(x.mn))


# chunks of 16 inside key groups of 32, and of 64 holding 4 groups of 16; 3 splits (one may stay empty); lengths
# that end mid-chunk and mid-group (row 0: 100 of 192, row 1: 37) or at 0
@pytest.mark.parametrize("G,tiling,lengths", [
    (32, Tiling(tb=1, chunk=16, pend_chunk=16, splits=3, dot=False), (100, 37)),
    (16, Tiling(tb=2, chunk=64, pend_chunk=16, splits=3, dot=False), (0, 150)),
], ids=["inside-groups", "whole-groups"])
def test_several_chunks_and_splits_with_length_mid_store(G, tiling, lengths):
  case = _case(h=4, kvh=2, d=64, L=192, P=20, b=2, t=2, bits=4, G=G)
  q, keys, values, k_pend, v_pend, ms, mp, _ = kivi_operands(case, np.random.default_rng(G))
  length = jnp.asarray(lengths, jnp.int32)
  ms = ms | jnp.asarray(np.random.default_rng(1).random(ms.shape) < 0.5)     # mask noise past length too
  clean = (q, keys, values, k_pend, v_pend, ms, mp, length)
  want = numpy_kivi_attention(*clean, 64 ** -0.5)
  poisoned = (q, _poison_past(keys, length), _poison_past(values, length), k_pend, v_pend, ms, mp, length)
  _check(_run(poisoned, 64 ** -0.5, tiling), want, "float32")
  _check(_run(clean, 64 ** -0.5), want, "float32")                            # the default tiling


# the dot paths (float32 on 16+ rows: Precision.HIGHEST; float16 with 16-row padding), 3 heads per KV head padded
# to 4, head_dim 96 padded to 128 (3 value groups of 32 padded to 4), several query blocks (t 20 > 64 / 4 rows)
@pytest.mark.parametrize("case", [
    _case(h=8, kvh=1, d=64, L=96, P=5, b=1, t=3, bits=2, G=32, dtype="float32"),
    _case(h=6, kvh=2, d=96, L=64, P=9, b=2, t=2, bits=3, G=32, dtype="float16", scale_dtype="float32"),
    _case(h=6, kvh=2, d=96, L=64, P=9, b=1, t=1, bits=8, G=32, dtype="float32", scale_dtype="bfloat16"),
    _case(h=4, kvh=1, d=32, L=32, P=24, b=1, t=20, bits=4, G=16, dtype="bfloat16"),
], ids=["f32-dot", "f16-d96-rep3", "f32-reduce-d96", "bf16-query-blocks"])
def test_dot_paths_and_padding(case):
  ops = kivi_operands(case, np.random.default_rng(3))
  scale = case["d"] ** -0.5
  got = _run(ops, scale)
  assert got.dtype == ops[0].dtype and got.shape == ops[0].shape
  _check(got, numpy_kivi_attention(*ops, scale), case["dtype"])


def test_corrupted_value_scale_shows():
  """Doubling the value scale of one visible store token changes the output well beyond the tolerance (the
  comparison is not vacuous), and the kernel follows the corrupted store."""
  case = _case(h=4, kvh=2, d=64, L=64, P=8, b=1, t=1, bits=4, G=32)
  q, keys, values, k_pend, v_pend, ms, mp, _ = kivi_operands(case, np.random.default_rng(5))
  length = jnp.asarray([64], jnp.int32)
  ms = ms.at[0, 0, 10].set(True)
  bad = dataclasses.replace(values, scale=values.scale.at[0, 0, 10].multiply(2))
  ops = (q, keys, bad, k_pend, v_pend, ms, mp, length)
  got = _run(ops, 64 ** -0.5)
  _check(got, numpy_kivi_attention(*ops, 64 ** -0.5), "float32")
  want = numpy_kivi_attention(q, keys, values, k_pend, v_pend, ms, mp, length, 64 ** -0.5)
  with pytest.raises(AssertionError):
    _check(got, want, "float32")


@pytest.mark.parametrize("bits,G,d", [(5, 32, 64), (4, 24, 48), (4, 4, 12)])
def test_unsupported_raise_and_fall_back(bits, G, d):
  case = _case(h=2, kvh=1, d=d, L=2 * G, P=3, b=1, t=1, bits=bits, G=G)
  ops = kivi_operands(case, np.random.default_rng(0))
  with pytest.raises(NotImplementedError):
    kivi_attention(*ops, d ** -0.5, implementation="pallas_triton", fallback=False)
  np.testing.assert_allclose(np.asarray(kivi_attention(*ops, d ** -0.5, implementation="pallas_triton")),
                             np.asarray(kivi_attention(*ops, d ** -0.5, implementation="xla")), rtol=1e-6)


def test_tilings():
  decode = choose_tiling(1, 1, 4, 8, 128, 4096, 100, jnp.float32)       # GQA 4:1 float32 decode
  assert not decode.dot and decode.tb == 1 and decode.chunk == 32 and decode.splits == 32
  half = choose_tiling(1, 1, 4, 8, 128, 4096, 100, jnp.bfloat16)        # 16 rows for the dot: 4 tokens x 4 heads
  assert half.dot and half.tb == 4 and half.chunk == 64 and half.pend_chunk == 64
  big = choose_tiling(8, 1, 1, 32, 128, 256, 1, jnp.float32)           # many programs already: one split
  assert big.splits == 1 and big.pend_chunk == 16


# 2- and 4-bit in float32 (multiply-reduce and 16-row dot) and bfloat16; 3-bit float16; 8-bit with padded head_dim
@pytest.mark.parametrize("case", [
    _case(h=8, kvh=2, d=128, L=512, P=16, b=1, t=1, bits=2, G=32, dtype="float32"),
    _case(h=8, kvh=2, d=64, L=256, P=16, b=2, t=1, bits=4, G=64, dtype="bfloat16", scale_dtype="bfloat16"),
    _case(h=8, kvh=1, d=128, L=256, P=16, b=1, t=2, bits=4, G=128, dtype="float32", scale_dtype="float32"),
    _case(h=4, kvh=4, d=128, L=128, P=40, b=2, t=3, bits=2, G=64, dtype="bfloat16"),
    _case(h=9, kvh=3, d=64, L=320, P=159, b=1, t=1, bits=3, G=32, dtype="float16"),
    _case(h=6, kvh=2, d=96, L=64, P=9, b=1, t=1, bits=8, G=32, dtype="float32"),
], ids=lambda c: f"w{c['bits']}-d{c['d']}-t{c['t']}-{c['dtype']}")
def test_lowers_to_triton_for_cuda(case):
  ops = kivi_operands(case, np.random.default_rng(0))
  lowered = jax.jit(lambda *a: kivi_attention_pallas(*a, case["d"] ** -0.5, interpret=False)).trace(*ops).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("xla.gpu.triton") == 1 and "mosaic" not in text.lower()
