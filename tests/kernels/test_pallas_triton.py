"""The Pallas Triton ``qmatmul`` kernel: the shared grid in interpret mode (on CPU the same kernel runs through the
Pallas interpreter, which fills unwritten outputs and out-of-bounds block reads with NaN, so a missing store or
mask fails the comparison), several-block tilings with edges in M, out and in, sensitivity to a corrupted scale,
and the lowering to Triton for CUDA."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_base import QMatmulBase, grid_qarray, numpy_qmatmul

from qjax.core.formats.qarray import QArray
from qjax.kernels.qmatmul import qmatmul
from qjax.kernels.qmatmul.pallas_triton import Tiling, choose_tiling, qmatmul_pallas
from qjax.methods.activations.quantizers import TokenQuantizer


class TestQMatmulPallasTriton(QMatmulBase):
  implementation = "pallas_triton"


def _case(n_in, n_out, m, bits, group_size, sym=False, perm=False, dtype="float32"):
  return dict(n_in=n_in, n_out=n_out, m=m, bits=bits, group_size=group_size, sym=sym, perm=perm, dtype=dtype)


def _check(got, x, q):
  """``got`` is finite and equals the NumPy spec (tolerance by activation dtype)."""
  got = np.asarray(got.astype(jnp.float32))
  want = numpy_qmatmul(np.asarray(x.astype(jnp.float32)), q)
  assert np.isfinite(got).all()
  tol = 2e-5 if x.dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


# in 200 = 6 packing blocks + 8 codes; groups of 64 leave a partial group of 8; M 37 and out 50 leave edge blocks
@pytest.mark.parametrize("bits,group_size,tiling,dtype", [
    (4, 64, Tiling(bm=16, bn=16, bk=32, reduce=False, num_warps=4, num_stages=2), "float16"),
    (2, 32, Tiling(bm=16, bn=16, bk=128, reduce=False, num_warps=4, num_stages=2), "float32"),   # 4 groups/block
    (3, 16, Tiling(bm=4, bn=16, bk=64, reduce=True, num_warps=4, num_stages=2), "bfloat16"),     # 4 groups/block
    (8, -1, Tiling(bm=8, bn=32, bk=32, reduce=True, num_warps=4, num_stages=2), "float32"),
])
def test_several_blocks_per_axis_with_edges(bits, group_size, tiling, dtype):
  case = _case(200, 50, 37, bits, group_size, sym=bits == 8, perm=True, dtype=dtype)
  x, q = grid_qarray(case, np.random.default_rng(bits))
  _check(jax.jit(lambda x, q: qmatmul_pallas(x, q, tiling=tiling))(x, q), x, q)


def test_corrupted_scale_of_the_last_partial_group_shows():
  """Doubling one scale in the edge block of ``out`` and the partial last group changes the kernel's output well
  beyond the tolerance (the comparison is not vacuous), and the kernel follows the corrupted weight exactly."""
  case = _case(172, 40, 3, 4, 64)
  x, q = grid_qarray(case, np.random.default_rng(7))
  bad = dataclasses.replace(q, scale=q.scale.at[-1, -1].multiply(2))
  got = jax.jit(qmatmul_pallas)(x, bad)
  _check(got, x, bad)
  want = numpy_qmatmul(np.asarray(x), q)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  np.testing.assert_allclose(np.asarray(got)[:, :-1], want[:, :-1], rtol=2e-5, atol=2e-5 * np.abs(want).max())


def test_activation_quantizer_and_leading_dims_match_the_reference():
  case = _case(256, 24, 6, 4, 128, perm=True)
  rng = np.random.default_rng(3)
  _, q = grid_qarray(case, rng)
  x = jnp.asarray(rng.normal(size=(2, 3, 256)), jnp.float32)
  act = TokenQuantizer(8)
  run = lambda impl: jax.jit(lambda x, q: qmatmul(x, q, act, implementation=impl, fallback=False))(x, q)
  got, want = run("pallas_triton"), run("xla")
  assert got.shape == (2, 3, 24)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("bits,group_size", [(5, 32), (4, 48)])
def test_unsupported_raise_and_fall_back(bits, group_size):
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 2**bits, size=(8, 96))
  n_groups = -(-96 // group_size)
  q = QArray.from_codes(jnp.asarray(codes), np.ones((8, n_groups)), np.zeros((8, n_groups)), bits=bits,
                        group_size=group_size, sym=False)
  x = jnp.asarray(rng.normal(size=(2, 96)), jnp.float32)
  with pytest.raises(NotImplementedError):
    qmatmul(x, q, implementation="pallas_triton", fallback=False)
  np.testing.assert_allclose(np.asarray(qmatmul(x, q, implementation="pallas_triton")),
                             np.asarray(qmatmul(x, q, implementation="xla")), rtol=1e-6)


def test_tilings_by_m():
  gemv, small, gemm, big = (choose_tiling(m, 4096, 4096, 128) for m in (1, 16, 64, 512))
  assert gemv.reduce and gemv.bm == 1 and not small.reduce and small.bm == 16
  assert (gemm.bm, gemm.bn, big.bm, big.bn) == (64, 64, 128, 128)
  assert choose_tiling(1, 4096, 4096, 96).bk == 32 and choose_tiling(64, 24, 4096, 128).bn == 32
  x, q = grid_qarray(_case(256, 16, 2, 4, 96), np.random.default_rng(0))
  with pytest.raises(ValueError, match="group size"):          # K blocks of 64 would straddle groups of 96
    qmatmul_pallas(x, q, tiling=Tiling(16, 16, 64, False, 4, 2))
  _check(qmatmul_pallas(x, q), x, q)                            # the default: K blocks of 32


# GEMV (reduce and 16-row dot) and GEMM (64 and 128 tiles), 3- and 4-bit, act-order, bf16 / f16
@pytest.mark.parametrize("case", [
    _case(1024, 96, 1, 3, 32, perm=True, dtype="bfloat16"),
    _case(576, 200, 3, 4, 128, sym=True, dtype="float32"),
    _case(1024, 96, 12, 4, 64, perm=True, dtype="bfloat16"),
    _case(512, 160, 64, 3, -1, perm=True, dtype="bfloat16"),
    _case(512, 256, 200, 4, 32, dtype="float16"),
], ids=lambda c: f"m{c['m']}-w{c['bits']}-g{c['group_size']}-{c['dtype']}")
def test_lowers_to_triton_for_cuda(case):
  x, q = grid_qarray(case, np.random.default_rng(0))
  lowered = jax.jit(lambda x, q: qmatmul_pallas(x, q, interpret=False)).trace(x, q).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("xla.gpu.triton") == 1 and "mosaic" not in text.lower()
