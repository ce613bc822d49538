"""``kivi_attention``: the XLA spec and the native CPU kernel (its AVX2 and portable paths) over the shared grid
(:class:`KIVIAttentionBase`), the native kernel's refusals, and the dense cache's ``kv_attention`` through the same
kernel (:class:`KVAttentionBase`)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from kernel_base import KIVI_GRID, KIVIAttentionBase, KVAttentionBase, kivi_operands, numpy_kivi_attention

from qjax.kernels.kivi_attention import cpu, kivi_attention

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="native CPU kernel not built")


class TestKIVIAttentionXLA(KIVIAttentionBase):
  implementation = "xla"


@needs_kernel
class TestKIVIAttentionCPU(KIVIAttentionBase):
  implementation = "cpu"


@needs_kernel
class TestKIVIAttentionCPUPortable(KIVIAttentionBase):
  """The portable (non-AVX2) path of the native kernel."""

  def call(self, *operands, scale):
    return jax.jit(lambda *a: cpu.kivi_attention_cpu(*a, scale, force_scalar=True))(*operands)


@needs_kernel
def test_odd_widths_and_prefill_fall_back():
  """5-bit codes run (portable unpack); more than 16 queries per row raise, and the dispatcher runs the spec."""
  case = {**KIVI_GRID[0], "bits": 5, "t": 1}
  ops = kivi_operands(case, np.random.default_rng(0))
  got = jax.jit(lambda *a: kivi_attention(*a, 0.125, implementation="cpu", fallback=False))(*ops)
  want = numpy_kivi_attention(*ops, 0.125)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  long = kivi_operands({**case, "t": 17, "P": 40}, np.random.default_rng(1))
  with pytest.raises(NotImplementedError):
    kivi_attention(*long, 0.125, implementation="cpu", fallback=False)
  np.testing.assert_allclose(np.asarray(kivi_attention(*long, 0.125, implementation="cpu")),
                             np.asarray(kivi_attention(*long, 0.125, implementation="xla")), rtol=1e-6)


@needs_kernel
class TestKVAttentionCPU(KVAttentionBase):
  """The dense cache's decode attention through the native kernel (an empty store, every slot a pending token)."""
  implementation = "cpu"
