"""``lut_gemm``: the XLA spec and the native CPU table-lookup kernel over the shared grid (:class:`LUTGemmBase`),
and a BCQ model's linears routed through it by ``qmatmul``."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from kernel_base import LUT_GEMM_GRID, LUTGemmBase, grid_bcq, numpy_lut_gemm

from qjax.kernels.lut_gemm import cpu
from qjax.kernels.qmatmul import path_name, qmatmul


class TestLUTGemmXLA(LUTGemmBase):
  implementation = "xla"

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="native CPU kernel not built")


@needs_kernel
class TestLUTGemmCPU(LUTGemmBase):
  implementation = "cpu"

  def unsupported(self, case):
    return f"M = {case['m']} > {cpu.MAX_M} (decode kernel)" if case["m"] > cpu.MAX_M else None


@needs_kernel
def test_cpu_refuses_prefill_and_odd_groups_and_the_dispatcher_falls_back():
  from qjax.kernels.lut_gemm import lut_gemm
  case = {**LUT_GEMM_GRID[5], "m": 5}
  x, q = grid_bcq(case, np.random.default_rng(0))
  with pytest.raises(NotImplementedError, match="M = 5"):
    jax.jit(lambda x, q: lut_gemm(x, q, implementation="cpu", fallback=False))(x, q)
  got = jax.jit(lambda x, q: lut_gemm(x, q, implementation="cpu"))(x, q)
  want = numpy_lut_gemm(np.asarray(x, np.float32), q)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  x, q = grid_bcq({**LUT_GEMM_GRID[5], "m": 1, "group_size": 36, "dtype": "float32"}, np.random.default_rng(0))
  with pytest.raises(NotImplementedError, match="group size 36"):
    jax.jit(lambda x, q: lut_gemm(x, q, implementation="cpu", fallback=False))(x, q)


def test_qmatmul_routes_bcq_weights_through_lut_gemm():
  """A linear's ``qmatmul`` on a BCQArray runs the LUT-GEMM op with the implementation asked for (the CPU kernel
  under ``auto`` when built), and its path is named after it."""
  x, q = grid_bcq({**LUT_GEMM_GRID[6], "m": 2, "dtype": "float32"}, np.random.default_rng(3))
  want = numpy_lut_gemm(np.asarray(x), q)
  for impl in ("auto", "xla", "cpu"):
    got = jax.jit(lambda x, q: qmatmul(x, q, implementation=impl))(x, q)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  assert path_name(q, implementation="xla") == "xla (decompress + matmul)"
  if cpu.available():
    assert path_name(q).startswith("cpu LUT-GEMM kernel")
    hlo = jax.jit(lambda x, q: qmatmul(x, q)).lower(x, q).as_text()
    assert "qjax_lut_gemm_cpu" in hlo
