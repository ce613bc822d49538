"""Shared test bases of the kernel ops: every implementation of an op gets a test class that subclasses the op's
base and sets ``implementation``; the base checks it against an independent NumPy spec over a grid of shapes and
formats, with fresh random inputs per case."""
from __future__ import annotations

import dataclasses
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.kernels.kv_attention import kv_attention
from qjax.kernels.qmatmul import qmatmul
from qjax.methods.weights import rtn
from qjax.models.kv_cache import KVCache

# (in, out, M): in-features 172 (partial groups for 32/64/128), 576 (partial for 128), 1536, 4096; out-features that
# are no multiple of a power-of-two block; M = 1, 3, 16, 64.
_SHAPES = [(172, 40, 1), (576, 200, 3), (1536, 72, 16), (4096, 24, 64)]
# every (bits, group, sym) once, the shapes, permutation and activation dtype rotating through them
QMATMUL_GRID = [dict(n_in=n_in, n_out=n_out, m=m, bits=bits, group_size=g, sym=sym, perm=i % 2 == 1,
                     dtype="bfloat16" if i % 4 == 3 else "float32")
                for i, (bits, g, sym) in enumerate(itertools.product([2, 3, 4, 8], [-1, 32, 64, 128], [False, True]))
                for n_in, n_out, m in [_SHAPES[(i + i // 4) % 4]]]


def grid_qarray(case: dict, rng: np.random.Generator):
  """The case's random ``(x [m, in], QArray)``: RTN codes of a normal matrix with float16 scales (the stored
  dtype), and with ``perm`` a random column permutation (act-order storage)."""
  w = jnp.asarray(rng.normal(size=(case["n_out"], case["n_in"])), jnp.float32)
  x = jnp.asarray(rng.normal(size=(case["m"], case["n_in"])), case["dtype"])
  q = rtn.quantize_weight(w, bits=case["bits"], group_size=case["group_size"], sym=case["sym"],
                          scale_dtype="float16")
  if case["perm"]:
    q = dataclasses.replace(q, perm=jnp.asarray(rng.permutation(case["n_in"]), jnp.int32))
  return x, q


def numpy_qmatmul(x: np.ndarray, q) -> np.ndarray:
  """``x @ W^T`` with ``W = scale * (codes - zero)`` rebuilt in NumPy from the QArray's fields (float64)."""
  codes = np.asarray(q.unpacked_codes(), np.float64)                       # [out, in]
  n = codes.shape[1]
  g = n if q.group_size == -1 else q.group_size
  cols = np.arange(n) // g
  scale = np.asarray(q.scale, np.float64)[:, cols]
  zero = np.asarray(q.zero_point(), np.float64)[:, cols]
  w = scale * (codes - zero)
  if q.perm is not None:
    w = w[:, np.argsort(np.asarray(q.perm))]
  return np.asarray(x, np.float64) @ w.T


class QMatmulBase:
  """``qmatmul`` over QArrays (:data:`QMATMUL_GRID`): the implementation named ``implementation`` (no fallback to
  the reference: a case it does not support must be listed by :meth:`unsupported`) against a NumPy float64 spec,
  fresh random inputs per case."""
  implementation = "xla"

  def unsupported(self, case: dict) -> str | None:
    """Why the implementation refuses ``case`` (the test then checks that it raises NotImplementedError), or None."""
    return None

  @pytest.mark.parametrize("case", QMATMUL_GRID, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
  def test_equals_numpy_spec(self, case):
    rng = np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode()))  # stable across processes
    x, q = grid_qarray(case, rng)
    call = jax.jit(lambda x, q: qmatmul(x, q, implementation=self.implementation, fallback=False))
    if (reason := self.unsupported(case)) is not None:
      with pytest.raises(NotImplementedError):
        call(x, q)
      pytest.skip(reason)
    got = call(x, q)
    assert got.dtype == x.dtype and got.shape == (case["m"], case["n_out"])
    want = numpy_qmatmul(np.asarray(x.astype(jnp.float32)), q)
    tol = 2e-2 if case["dtype"] == "bfloat16" else 2e-5
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol * np.abs(want).max())

  def test_dense_weight(self):
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(24, 40)).astype(np.float32), rng.normal(size=(2, 5, 40)).astype(np.float32)
    got = qmatmul(jnp.asarray(x), jnp.asarray(w), implementation=self.implementation)
    np.testing.assert_allclose(np.asarray(got), x @ w.T, rtol=1e-5, atol=1e-5)


def numpy_attention(q, k, v, valid):
  """GQA attention in float64 (``valid [b, t, s]``)."""
  b, t, h, d = q.shape
  kvh = k.shape[2]
  k = np.repeat(k, h // kvh, axis=2)
  v = np.repeat(v, h // kvh, axis=2)
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
  s = np.where(valid[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


class KVAttentionBase:
  """``kv_attention`` on a dense layer cache: prefill then one decode step equal the full causal attention."""
  implementation = "xla"

  def test_prefill_then_decode_equals_full_attention(self):
    rng = np.random.default_rng(1)
    b, t, h, kvh, d, max_len = 2, 6, 4, 2, 8, 16
    q = rng.normal(size=(b, t + 1, h, d)).astype(np.float32)
    k = rng.normal(size=(b, t + 1, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, t + 1, kvh, d)).astype(np.float32)
    cfg = type("C", (), {"num_kv_heads": kvh, "head_dim": d, "num_layers": 1})()
    cache = KVCache.dense(cfg, b, max_len)
    layer = cache.layers[0]
    mask, valid = cache.append_mask(jnp.ones((b, t), jnp.int32))
    out, layer = kv_attention(layer, jnp.asarray(q[:, :t]), jnp.asarray(k[:, :t]), jnp.asarray(v[:, :t]),
                              index=jnp.int32(0), positions=None, rope=None, mask=mask, scale=d**-0.5,
                              implementation=self.implementation)
    causal = np.tril(np.ones((t + 1, t + 1), bool))[None].repeat(b, 0)
    want = numpy_attention(q, k, v, causal)
    np.testing.assert_allclose(np.asarray(out), want[:, :t], rtol=1e-5, atol=1e-5)
    step_mask = jnp.asarray(np.arange(max_len)[None, None, :] <= t).repeat(b, 0)
    out, _ = kv_attention(layer, jnp.asarray(q[:, t:]), jnp.asarray(k[:, t:]), jnp.asarray(v[:, t:]),
                          index=jnp.int32(t), positions=None, rope=None, mask=step_mask, scale=d**-0.5,
                          implementation=self.implementation)
    np.testing.assert_allclose(np.asarray(out), want[:, t:], rtol=1e-5, atol=1e-5)
