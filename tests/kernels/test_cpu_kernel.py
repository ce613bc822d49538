"""The native CPU qmatmul (``qjax/kernels/qmatmul/cpu.py``, an XLA FFI handler) against the shared base's NumPy spec,
its portable scalar path, its refusals, and its use inside a jitted ``lax.scan`` (as decode layers run it)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_base import QMATMUL_GRID, QMatmulBase, grid_qarray, numpy_qmatmul

from qjax.kernels.qmatmul import cpu, path_name, qmatmul
from qjax.methods.weights import rtn

pytestmark = [
    pytest.mark.skipif(not cpu.available(), reason=f"native CPU kernel not built: {cpu.IMPORT_ERROR} "
                                                   "(pip install -e . with a C++17 compiler builds it)"),
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernel runs on the CPU backend only"),
]


class TestQMatmulCPU(QMatmulBase):
  implementation = "cpu"

  def unsupported(self, case: dict) -> str | None:
    if case["m"] > cpu.MAX_M:
      return f"M = {case['m']} > {cpu.MAX_M}: prefill is served by the XLA path"
    return None


def _qarray(rng, n_out, n_in, m=2, **kw):
  w = jnp.asarray(rng.normal(size=(n_out, n_in)), jnp.float32)
  return jnp.asarray(rng.normal(size=(m, n_in)), jnp.float32), rtn.quantize_weight(w, **kw)


def _assert_spec(got, x, q, tol=2e-5):
  want = numpy_qmatmul(np.asarray(x, np.float32), q)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("case", [c for c in QMATMUL_GRID if c["m"] <= cpu.MAX_M][::3],
                         ids=lambda c: f"b{c['bits']}-g{c['group_size']}-in{c['n_in']}-m{c['m']}")
def test_portable_scalar_path_equals_spec(case):
  x, q = grid_qarray(case, np.random.default_rng(7))
  got = jax.jit(lambda x, q: cpu.qmatmul_cpu(x, q, force_scalar=True))(x, q)
  _assert_spec(got.astype(jnp.float32), x.astype(jnp.float32), q, 2e-2 if case["dtype"] == "bfloat16" else 2e-5)


@pytest.mark.parametrize("bits,group_size", [(1, 64), (5, 32), (6, -1), (7, 64)])
def test_other_bit_widths(bits, group_size):
  x, q = _qarray(np.random.default_rng(bits), 33, 300, m=5, bits=bits, group_size=group_size)
  _assert_spec(jax.jit(cpu.qmatmul_cpu)(x, q), x, q)


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_scale_dtypes_groups_past_k_and_f16_activations(scale_dtype):
  rng = np.random.default_rng(3)
  x, q = _qarray(rng, 20, 100, m=4, bits=4, group_size=128, scale_dtype=scale_dtype)   # one partial group
  _assert_spec(cpu.qmatmul_cpu(x, q), x, q)
  got = cpu.qmatmul_cpu(x.astype(jnp.float16), q)
  assert got.dtype == jnp.float16
  _assert_spec(got.astype(jnp.float32), x.astype(jnp.float16).astype(jnp.float32), q, 2e-3)


def test_many_rows_split_over_threads_and_leading_dims():
  rng = np.random.default_rng(4)
  x, q = _qarray(rng, 1000, 512, m=6, bits=4, group_size=64)
  got = jax.jit(cpu.qmatmul_cpu)(x.reshape(2, 3, 512), q)
  assert got.shape == (2, 3, 1000)
  _assert_spec(got.reshape(6, 1000), x, q)
  np.testing.assert_array_equal(np.asarray(jax.jit(cpu.qmatmul_cpu)(x, q)).reshape(2, 3, 1000), got)


def test_runs_under_jit_inside_scan():
  """A decode-like loop: a scanned stack of layers, each a QArray GEMV on the carried activation."""
  rng = np.random.default_rng(5)
  layers = [rtn.quantize_weight(jnp.asarray(rng.normal(size=(64, 64)) / 8, jnp.float32), bits=4, group_size=32)
            for _ in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  x0 = jnp.asarray(rng.normal(size=(1, 64)), jnp.float32)

  def step(x, q):
    y = jnp.tanh(qmatmul(x, q, implementation="cpu", fallback=False))
    return y, y.sum()

  got, sums = jax.jit(lambda x, w: jax.lax.scan(step, x, w))(x0, stacked)
  want = np.asarray(x0, np.float64)
  for q in layers:
    want = np.tanh(numpy_qmatmul(want, q))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  assert sums.shape == (3,)


def test_independent_calls_in_one_program():
  """Sibling custom calls (as q/k/v projections) that XLA may run concurrently, each splitting its rows over the
  same intra-op pool."""
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(2, 384)), jnp.float32)
  qs = [rtn.quantize_weight(jnp.asarray(rng.normal(size=(n, 384)), jnp.float32), bits=b, group_size=g)
        for n, b, g in [(768, 4, 64), (640, 8, -1), (512, 2, 32), (896, 3, 128)]]
  outs = jax.jit(lambda x, qs: [qmatmul(x, q, implementation="cpu", fallback=False) for q in qs])(x, qs)
  for got, q in zip(outs, qs):
    _assert_spec(got, x, q)


def test_a_corrupted_scale_is_detected():
  """The spec check can fail: one doubled scale (one row, one group) breaks exactly that output column."""
  rng = np.random.default_rng(6)
  x, q = _qarray(rng, 24, 256, m=3, bits=4, group_size=64, scale_dtype="float16")
  bad = dataclasses.replace(q, scale=q.scale.at[5, 2].multiply(2))
  got = np.asarray(cpu.qmatmul_cpu(x, bad))
  with pytest.raises(AssertionError):
    _assert_spec(got, x, q)
  want = numpy_qmatmul(np.asarray(x), q)
  wrong = np.abs(got - want).max(axis=0) > 1e-3 * np.abs(want).max()
  assert np.flatnonzero(wrong).tolist() == [5]


def test_refusals_and_auto_dispatch():
  rng = np.random.default_rng(8)
  x, q = _qarray(rng, 16, 96, m=2, bits=3, group_size=32)
  assert path_name(q) == "cpu kernel (native, M <= 16; more rows: emulated)"
  _assert_spec(qmatmul(x, q), x, q)                                     # auto picks the kernel
  big = jnp.asarray(rng.normal(size=(cpu.MAX_M + 1, 96)), jnp.float32)
  with pytest.raises(NotImplementedError, match="M = 17"):
    cpu.qmatmul_cpu(big, q)
  _assert_spec(qmatmul(big, q), big, q)                                 # auto falls back to the reference
  with pytest.raises(NotImplementedError, match="group size 48"):
    cpu.qmatmul_cpu(x, rtn.quantize_weight(jnp.ones((4, 96)), bits=3, group_size=48))
  u8 = dataclasses.replace(q, codes=jnp.zeros((16, 36), jnp.uint8), word_bits=8)
  with pytest.raises(NotImplementedError, match="uint8 words"):
    cpu.qmatmul_cpu(x, u8)


def test_model_kernel_choice_end_to_end(llama_dir):
  """``CausalLM.kernel``: a W4 g32 model decodes the same greedy tokens through the native kernel ("auto" on CPU)
  as through the XLA reference, with decode logits equal to float rounding; the summary names each path."""
  from qjax import api
  from qjax.evaluation.generation import Generator
  from qjax.evaluation.kernel_paths import linear_paths
  from qjax.io.hf import load_model
  from qjax.methods.weights.rtn import RTNConfig
  model, params = load_model(llama_dir)
  q = api.quantize_model(model, params, api.Recipe(weights=(api.Rule(r".*", RTNConfig(bits=4, group_size=32)),)))
  prompt = list(range(1, 9))
  runs = {k: Generator(q.model.with_kernel(k), q.params).generate([prompt], 12, max_len=32, stop_tokens=())
          for k in ("auto", "xla")}
  assert list(runs["auto"].tokens[0]) == list(runs["xla"].tokens[0]) and len(runs["xla"].tokens[0]) == 12
  ids = jnp.asarray([prompt[:1]], jnp.int32)                              # one row: M = 1, the kernel's case
  auto, xla = (np.asarray(q.model.with_kernel(k).apply(q.params, ids)[0]) for k in ("auto", "xla"))
  np.testing.assert_allclose(auto, xla, rtol=1e-5, atol=1e-5 * np.abs(xla).max())
  hlo = {k: jax.jit(q.model.with_kernel(k).apply).lower(q.params, ids).as_text() for k in ("auto", "xla")}
  assert "qjax_qmatmul_cpu" in hlo["auto"] and "qjax_qmatmul_cpu" not in hlo["xla"]   # the choice took effect
  assert linear_paths(q.model.with_kernel("xla"), q.params) == ["emulated (dequantize + matmul)"]
  assert linear_paths(q.model, q.params) == [cpu.qmatmul_qarray.path(None, None)]
  with pytest.raises(ValueError, match="unknown kernel 'triton'"):
    q.model.with_kernel("triton")
