"""The Pallas Triton ``lut_gemm`` kernel: the shared grid in interpret mode (on CPU the same kernel runs through the
Pallas interpreter, which fills unwritten outputs and out-of-bounds block reads with NaN, so a missing store or a
missing activation mask fails the comparison; the masks on the words, alphas and offsets past a row's end meet
zero activations there, which the interpreter cannot tell apart), several-block tilings with edges in M, N and K
(partial last groups, groups straddling K blocks), sensitivity to corrupted alphas and offsets, the routing of
``qmatmul`` on a BCQArray, refusals, and the lowering to Triton for CUDA."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_base import LUTGemmBase, grid_bcq, numpy_lut_gemm

from qjax.core.formats.bcq import BCQArray
from qjax.kernels.lut_gemm import lut_gemm, path_name
from qjax.kernels.lut_gemm.pallas_triton import Tiling, choose_tiling, lut_gemm_pallas
from qjax.kernels.qmatmul import qmatmul
from qjax.kernels.qmatmul import path_name as qmatmul_path_name
from qjax.methods.activations.quantizers import TokenQuantizer


class TestLUTGemmPallasTriton(LUTGemmBase):
  implementation = "pallas_triton"

  def unsupported(self, case: dict) -> str | None:
    """The kernel's refusals that a grid case can meet (none of the current grid does): more than 8 bit planes,
    groups smaller than the row that are no multiple of 32 columns."""
    g = case["group_size"]
    if case["bits"] > 8:
      return f"{case['bits']} bit planes"
    return f"group size {g}" if g != -1 and g < case["n_in"] and g % 32 else None


def _case(n_in, n_out, m, bits, group_size, offset=False, perm=False, dtype="float32"):
  return dict(n_in=n_in, n_out=n_out, m=m, bits=bits, group_size=group_size, offset=offset, perm=perm, dtype=dtype)


def _tol(x) -> float:
  return 2e-5 if x.dtype == jnp.float32 else 2e-2


def _check(got, x, q):
  """``got`` is finite and equals the NumPy spec (tolerance by activation dtype)."""
  got = np.asarray(got.astype(jnp.float32))
  want = numpy_lut_gemm(np.asarray(x.astype(jnp.float32)), q)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=_tol(x), atol=_tol(x) * np.abs(want).max())


# in 200 = 6 words + 8 columns, so every group size leaves a partial last group; M 37 and out 50 leave edge blocks
@pytest.mark.parametrize("bits,group_size,offset,tiling,dtype", [
    (1, 64, True, Tiling(bm=16, bn=16, bk=32, reduce=False, num_warps=4, num_stages=2), "float16"),   # 2 blocks/group
    (2, 32, False, Tiling(bm=16, bn=16, bk=128, reduce=False, num_warps=4, num_stages=2), "float32"),  # 4 groups/block
    (3, 96, True, Tiling(bm=4, bn=16, bk=64, reduce=True, num_warps=4, num_stages=2), "bfloat16"),     # straddling
    (4, -1, True, Tiling(bm=8, bn=32, bk=32, reduce=True, num_warps=4, num_stages=2), "float32"),
    (8, 160, False, Tiling(bm=2, bn=16, bk=128, reduce=True, num_warps=4, num_stages=2), "float16"),   # straddling
])
def test_several_blocks_per_axis_with_edges(bits, group_size, offset, tiling, dtype):
  case = _case(200, 50, 37, bits, group_size, offset=offset, perm=bits % 2 == 1, dtype=dtype)
  x, q = grid_bcq(case, np.random.default_rng(bits))
  _check(jax.jit(lambda x, q: lut_gemm_pallas(x, q, tiling=tiling))(x, q), x, q)


@pytest.mark.parametrize("field,plane", [("alpha", 0), ("alpha", 2), ("offset", None)])
def test_corrupted_field_of_the_last_partial_group_shows(field, plane):
  """Doubling one alpha (first or last bit plane) or offset of the last output feature (in the edge block of N) and
  the partial last group changes that output column well beyond the tolerance (the comparison is not vacuous), the
  kernel follows the corrupted weight, and every other column is bit-identical."""
  case = _case(172, 40, 3, 3, 64, offset=True)
  x, q = grid_bcq(case, np.random.default_rng(7))
  bad = (dataclasses.replace(q, offset=q.offset.at[-1, -1].multiply(2)) if field == "offset" else
         dataclasses.replace(q, alpha=q.alpha.at[-1, -1, plane].multiply(2)))
  run = jax.jit(lut_gemm_pallas)
  good, got = np.asarray(run(x, q)), np.asarray(run(x, bad))
  _check(got, x, bad)
  want = numpy_lut_gemm(np.asarray(x), q)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  assert np.array_equal(got[:, :-1], good[:, :-1])


def test_activation_quantizer_and_leading_dims_match_the_reference():
  case = _case(256, 24, 6, 2, 128, offset=True, perm=True)
  rng = np.random.default_rng(3)
  _, q = grid_bcq(case, rng)
  x = jnp.asarray(rng.normal(size=(2, 3, 256)), jnp.float32)
  act = TokenQuantizer(8)
  run = lambda impl: jax.jit(lambda x, q: lut_gemm(x, q, act, implementation=impl, fallback=False))(x, q)
  got, want = run("pallas_triton"), run("xla")
  assert got.shape == (2, 3, 24)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_qmatmul_routes_a_bcq_weight_to_the_kernel():
  x, q = grid_bcq(_case(576, 72, 2, 2, 64, offset=True, dtype="bfloat16"), np.random.default_rng(5))
  _check(jax.jit(lambda x, q: qmatmul(x, q, implementation="pallas_triton", fallback=False))(x, q), x, q)
  assert qmatmul_path_name(q, implementation="pallas_triton").startswith("pallas_triton kernel")


@pytest.mark.parametrize("group_size", [16, 48])
def test_unsupported_group_sizes_raise_and_fall_back(group_size):
  rng = np.random.default_rng(0)
  n_groups = -(-96 // group_size)
  q = BCQArray.from_binaries(jnp.asarray(rng.choice([-1.0, 1.0], size=(8, 96, 2))),
                             jnp.asarray(rng.random((8, n_groups, 2))), group_size=group_size)
  x = jnp.asarray(rng.normal(size=(2, 96)), jnp.float32)
  with pytest.raises(NotImplementedError, match="multiple of 32"):
    lut_gemm(x, q, implementation="pallas_triton", fallback=False)
  np.testing.assert_allclose(np.asarray(lut_gemm(x, q, implementation="pallas_triton")),
                             np.asarray(lut_gemm(x, q, implementation="xla")), rtol=1e-6)
  assert path_name(q, implementation="pallas_triton").startswith("xla")


def test_tilings_by_m():
  gemv, gemv4, small, gemm, big = (choose_tiling(m, 4096, 4096) for m in (1, 3, 16, 64, 512))
  assert (gemv.reduce, gemv.bm, gemv.bk, gemv4.reduce, gemv4.bm) == (True, 1, 256, True, 4)
  assert not small.reduce and small.bm == 16 and (gemm.bm, gemm.bn, big.bm, big.bn) == (64, 64, 128, 128)
  assert choose_tiling(1, 24, 40).bk == 64 and choose_tiling(64, 24, 4096).bn == 32
  x, q = grid_bcq(_case(256, 16, 2, 2, 96), np.random.default_rng(0))
  for bad in (Tiling(8, 16, 64, False, 4, 2), Tiling(1, 16, 16, True, 4, 2), Tiling(1, 24, 64, True, 4, 2)):
    with pytest.raises(ValueError):                  # a dot on 8 rows, half-word K blocks, a non-power-of-two block
      lut_gemm_pallas(x, q, tiling=bad)


# GEMV (multiply-reduce on 1 and 4 rows), the 16-row dot and GEMM tiles; 1 to 4 and 8 bit planes; groups straddling
# K blocks (96); offsets, act-order, bf16 / f16 / f32 (an IEEE float32 dot)
@pytest.mark.parametrize("case", [
    _case(1024, 96, 1, 1, 128, perm=True, dtype="bfloat16"),
    _case(576, 200, 3, 3, -1, offset=True, dtype="float16"),
    _case(1024, 96, 12, 4, 96, offset=True, perm=True, dtype="bfloat16"),
    _case(512, 160, 64, 2, 32, dtype="float32"),
    _case(512, 256, 200, 8, 64, offset=True, dtype="float16"),
], ids=lambda c: f"m{c['m']}-q{c['bits']}-g{c['group_size']}-{c['dtype']}")
def test_lowers_to_triton_for_cuda(case):
  x, q = grid_bcq(case, np.random.default_rng(0))
  lowered = jax.jit(lambda x, q: lut_gemm_pallas(x, q, interpret=False)).trace(x, q).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("xla.gpu.triton") == 1 and "mosaic" not in text.lower()
