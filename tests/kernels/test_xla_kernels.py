"""The XLA references against the shared bases, and the dispatcher's rules."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernel_base import KVAttentionBase, QMatmulBase
from qjax.kernels.dispatch import Op
from qjax.kernels.qmatmul import OP, path_name
from qjax.methods.weights import rtn
from qjax.core.formats.base import QuantizedTensor
from qjax.core.formats.qarray import QArray


class TestQMatmulXLA(QMatmulBase):
  implementation = "xla"


class TestKVAttentionXLA(KVAttentionBase):
  implementation = "xla"


def test_dispatch_falls_back_to_the_reference_and_keys_on_the_type_hierarchy():
  op = Op("toy", dispatch_arg=0)
  op.reference(object)(lambda a: "ref")
  calls = []

  @op.implementation("fast", QuantizedTensor, platforms=("cpu",))
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
  assert [n for n, _ in op.select(q4)] == ["fast", "xla"]
  with pytest.raises(ValueError, match="unknown implementation"):
    op(q4, implementation="pallas")


def test_qmatmul_paths_are_named():
  q = rtn.quantize_weight(jnp.ones((4, 8)), bits=4)
  assert path_name(q) == "emulated (dequantize + matmul)"
  assert path_name(np.ones((4, 8))) == "dense"
  assert OP.implementations()[0] == "xla" and isinstance(q, QArray)
