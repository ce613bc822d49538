"""The XLA references against the shared bases, and the dispatcher's rules."""
from __future__ import annotations

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_base import KVAttentionBase, QMatmulBase

from qjax.core.formats.base import QuantizedTensor
from qjax.core.formats.qarray import QArray
from qjax.kernels.dispatch import Op
from qjax.kernels.qmatmul import OP, path_name
from qjax.methods.weights import rtn


class TestQMatmulXLA(QMatmulBase):
  implementation = "xla"


class TestKVAttentionXLA(KVAttentionBase):
  implementation = "xla"


def test_dispatch_falls_back_to_the_reference_and_keys_on_the_type_hierarchy():
  op = Op("toy", dispatch_arg=0)
  op.reference(object)(lambda a: "ref")
  calls = []

  @op.implementation("cpu", QuantizedTensor, platforms=("cpu",))
  def fast(a):
    calls.append(a)
    if a.bits == 3:
      raise NotImplementedError("3-bit not supported")
    return "fast"

  q4 = rtn.quantize_weight(jnp.ones((4, 8)), bits=4)
  q3 = rtn.quantize_weight(jnp.ones((4, 8)), bits=3)
  assert op(q4) == "fast"              # QArray found through its base QuantizedTensor
  assert op(q3) == "ref"               # NotImplementedError -> the reference
  assert op(jnp.ones(3)) == "ref"      # no implementation for dense arrays
  assert op(q4, implementation="xla") == "ref"
  assert [n for n, _ in op.select(q4)] == ["cpu", "xla"]
  assert op(q4, implementation="pallas_tpu") == "ref"          # a known name this op lacks: the reference
  with pytest.raises(NotImplementedError, match="no pallas_tpu implementation"):
    op(q4, implementation="pallas_tpu", fallback=False)        # ... unless a test asked for that one
  with pytest.raises(NotImplementedError, match="3-bit"):
    op(q3, implementation="cpu", fallback=False)
  with pytest.raises(ValueError, match="unknown implementation"):
    op(q4, implementation="pallas")
  with pytest.raises(ValueError, match="implementation names"):
    op.implementation("fast", QuantizedTensor, platforms=("cpu",))


def test_native_cpu_kernel_is_built_where_a_compiler_is():
  """``pip install -e .`` builds the optional extension whenever a C++ compiler exists, so its tests cannot skip
  silently on such a machine (CI)."""
  from qjax.kernels.qmatmul import cpu
  if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler: the XLA reference serves qmatmul")
  assert cpu.available(), cpu.IMPORT_ERROR


def test_qmatmul_paths_are_named():
  from qjax.kernels.qmatmul import cpu
  q = rtn.quantize_weight(jnp.ones((4, 8)), bits=4)
  assert path_name(q, implementation="xla") == "emulated (dequantize + matmul)"
  assert path_name(q) == ("cpu kernel (native, M <= 16; more rows: emulated)" if cpu.available()
                          else "emulated (dequantize + matmul)")
  assert path_name(np.ones((4, 8))) == "dense"
  assert OP.implementations()[0] == "xla" and isinstance(q, QArray)


@pytest.mark.parametrize("probs_bits", [None, 4])
def test_causal_blocks_equal_one_call(probs_bits):
  """Query blocks reading only their keys' prefix give the one-call result (for every query that sees a key; left
  padding included), also with a per-token quantizer of the probabilities, whose range contains 0 whatever
  trailing zeros are cut."""
  from qjax.kernels.kv_attention import xla
  from qjax.methods.activations.quantizers import TokenQuantizer
  from qjax.models.layers import ActivationHooks, causal_mask
  rng = np.random.default_rng(0)
  b, t, h, kvh, d = 2, 37, 6, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for n in (h, kvh, kvh))
  mask = causal_mask(jnp.asarray(np.arange(t)[None] >= np.array([[0], [5]]), jnp.int32))
  hooks = ActivationHooks(attn_probs=None if probs_bits is None else TokenQuantizer(probs_bits))
  full = xla.attention(q, k, v, mask, 0.3, hooks)
  probs = (lambda p: p) if probs_bits is None else hooks.attn_probs
  attend = lambda q, mask, k, v: xla.heads_output(probs(xla.masked_softmax(xla.heads_scores(q, k, 0.3), mask,
                                                                            v.dtype)), v)
  blocked = xla.causal_blocks(attend, q, (mask,), (k, v), block=8)
  real = np.asarray(mask).any(-1)            # padding queries see no key: their (unused) output is arbitrary
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(full)[real], rtol=1e-5, atol=1e-6)
  # a non-causal mask is what the promise excludes: the blocks then differ
  open_mask = jnp.ones_like(mask)
  assert not np.allclose(xla.causal_blocks(attend, q, (open_mask,), (k, v), block=8),
                         xla.attention(q, k, v, open_mask, 0.3, hooks), atol=1e-3)
