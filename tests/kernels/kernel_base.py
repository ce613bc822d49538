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


# (h, kvh, d, store L, pending P, b, t): GQA 9/3 (SmolLM2), MHA, 4:1 groups, a small head; stores of one group up to
# 2048 tokens; pending windows of one token to KIVI's R + G - 1 = 159
_KIVI_SHAPES = [(9, 3, 64, 320, 159, 1, 1), (4, 4, 128, 128, 40, 2, 3), (8, 2, 64, 2048, 1, 1, 1),
                (4, 2, 64, 64, 37, 2, 2)]
KIVI_GRID = [dict(h=h, kvh=kvh, d=d, L=L, P=P, b=b, t=t, bits=bits, G=g,
                  dtype="bfloat16" if i % 4 == 3 else "float32",
                  scale_dtype=("float16", "float16", "bfloat16", "float32")[i // 2 % 4])
             for i, (bits, g) in enumerate(itertools.product([2, 3, 4, 8], [32, 64]))
             for h, kvh, d, L, P, b, t in [_KIVI_SHAPES[(i + i // 4) % 4]]]


def kivi_operands(case: dict, rng: np.random.Generator):
  """The case's random ``kivi_attention`` operands ``(q, keys, values, k_pend, v_pend, mask_store, mask_pend,
  length)``: KIVI codes of normal keys (with a few large channels, as real keys have) and values; per row a store
  length that is a multiple of G (0 for one row when ``b > 1``); ``mask_store`` random beyond ``length`` (the
  kernel must ignore it there) and with a few holes below it; ``mask_pend`` causal over the last ``t`` pending
  tokens of a random count."""
  from qjax.methods.kv import kivi
  b, t, h, kvh, d, L, P, g = (case[k] for k in ("b", "t", "h", "kvh", "d", "L", "P", "G"))
  dt = case["dtype"]
  k = rng.normal(size=(b, kvh, L, d)) * np.where(rng.random(d) < 0.1, 8.0, 1.0)
  v = rng.normal(size=(b, kvh, L, d))
  keys = kivi.quantize_keys(jnp.asarray(k, jnp.float32), bits=case["bits"], group_size=g,
                            scale_dtype=case["scale_dtype"])
  values = kivi.quantize_values(jnp.asarray(v, jnp.float32), bits=case["bits"], group_size=g,
                                scale_dtype=case["scale_dtype"])
  length = rng.integers(1, L // g + 1, size=b) * g
  if b > 1:
    length[0] = 0
  mask_store = (np.arange(L)[None, None] < length[:, None, None]) & (rng.random((b, t, L)) < 0.9)
  mask_store |= (np.arange(L)[None, None] >= length[:, None, None]) & (rng.random((b, t, L)) < 0.5)
  n_pend = rng.integers(t, P + 1, size=b)
  mask_pend = np.arange(P)[None, None] <= (n_pend[:, None, None] - t + np.arange(t)[None, :, None])
  arr = lambda *s: jnp.asarray(rng.normal(size=s), dt)
  return (arr(b, t, h, d), keys, values, arr(b, P, kvh, d), arr(b, P, kvh, d), jnp.asarray(mask_store),
          jnp.asarray(mask_pend), jnp.asarray(length, jnp.int32))


def numpy_kivi_dequantize(x) -> np.ndarray:
  """A KIVITensor rebuilt in NumPy float64 from its fields (little-endian bit stream along ``head_dim``):
  ``[b, kvh, L, d]``."""
  bits, d, g = x.bits, x.head_dim, x.group_size
  stream = np.unpackbits(np.asarray(x.codes), axis=-1, bitorder="little")
  codes = (stream[..., :d * bits].reshape(*stream.shape[:-1], d, bits) * (1 << np.arange(bits))).sum(-1)
  scale, mn = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x.scale, x.mn))
  rep = (lambda a: np.repeat(a, g, axis=-2)) if x.per_channel else (lambda a: np.repeat(a, g, axis=-1))
  return codes * rep(scale) + rep(mn)


def numpy_kivi_attention(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale):
  """The spec in NumPy float64: ``[b, t, h, d]``."""
  f = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)
  k = np.concatenate([np.swapaxes(numpy_kivi_dequantize(keys), 1, 2), f(k_pend)], 1)
  v = np.concatenate([np.swapaxes(numpy_kivi_dequantize(values), 1, 2), f(v_pend)], 1)
  L = mask_store.shape[-1]
  visible = np.concatenate([np.asarray(mask_store) & (np.arange(L)[None, None] < np.asarray(length)[:, None, None]),
                            np.asarray(mask_pend)], -1)
  b, t, h, d = q.shape
  rep = h // k.shape[2]
  s = np.einsum("bthd,bshd->bhts", f(q), np.repeat(k, rep, 2)) * scale
  s = np.where(visible[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, np.repeat(v, rep, 2))


class KIVIAttentionBase:
  """``kivi_attention`` (:data:`KIVI_GRID`): the implementation named ``implementation`` (no fallback; a case it
  does not support must be listed by :meth:`unsupported`) against a NumPy float64 spec, fresh random operands per
  case."""
  implementation = "xla"

  def unsupported(self, case: dict) -> str | None:
    """Why the implementation refuses ``case`` (the test then checks that it raises NotImplementedError), or None."""
    return None

  def call(self, *operands, scale):
    from qjax.kernels.kivi_attention import kivi_attention
    return jax.jit(lambda *a: kivi_attention(*a, scale, implementation=self.implementation, fallback=False))(
        *operands)

  @pytest.mark.parametrize("case", KIVI_GRID, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
  def test_equals_numpy_spec(self, case):
    rng = np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode()))
    ops = kivi_operands(case, rng)
    scale = case["d"] ** -0.5
    if (reason := self.unsupported(case)) is not None:
      with pytest.raises(NotImplementedError):
        self.call(*ops, scale=scale)
      pytest.skip(reason)
    got = self.call(*ops, scale=scale)
    q = ops[0]
    assert got.dtype == q.dtype and got.shape == q.shape
    want = numpy_kivi_attention(*ops, scale)
    tol = 2e-2 if case["dtype"] == "bfloat16" else 2e-5
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol * np.abs(want).max())


# every (bits, group, offset) once, the shapes (partial last groups; in-features 172 not a multiple of 8 or 32),
# permutation and activation dtype rotating through them
LUT_GEMM_GRID = [dict(n_in=n_in, n_out=n_out, m=m, bits=bits, group_size=g, offset=offset, perm=i % 3 == 2,
                      dtype="bfloat16" if i % 4 == 3 else "float32")
                 for i, (bits, g, offset) in enumerate(itertools.product([1, 2, 3, 4], [-1, 32, 64, 128],
                                                                         [False, True]))
                 for n_in, n_out, m in [_SHAPES[(i + i // 4) % 4]]]


def grid_bcq(case: dict, rng: np.random.Generator):
  """The case's random ``(x [m, in], BCQArray)``: a greedy BCQ of a normal matrix with float16 alphas (and
  offsets), with ``perm`` a random column permutation."""
  from qjax.methods.weights import bcq
  w = jnp.asarray(rng.normal(size=(case["n_out"], case["n_in"])), jnp.float32)
  x = jnp.asarray(rng.normal(size=(case["m"], case["n_in"])), case["dtype"])
  q = bcq.quantize_weight(w, bits=case["bits"], group_size=case["group_size"], rounds=0, offset=case["offset"])
  if case["perm"]:
    q = dataclasses.replace(q, perm=jnp.asarray(rng.permutation(case["n_in"]), jnp.int32))
  return x, q


def numpy_lut_gemm(x: np.ndarray, q) -> np.ndarray:
  """``x @ W^T`` with ``W = sum_i alpha_i b_i + offset`` rebuilt in NumPy (float64) from the bit planes."""
  n_out, n = q.shape
  words = np.asarray(q.planes).astype(np.uint64)                           # [q, out, W]
  bits01 = (words[..., None] >> np.arange(32, dtype=np.uint64)) & 1          # [q, out, W, 32]
  b = bits01.reshape(q.bits, n_out, -1)[..., :n].astype(np.float64) * 2 - 1  # [q, out, in]
  g = n if q.group_size == -1 else q.group_size
  cols = np.arange(n) // g
  alpha = np.asarray(q.alpha, np.float64)[:, cols, :]                       # [out, in, q]
  w = np.einsum("qok,okq->ok", b, alpha)
  if q.offset is not None:
    w = w + np.asarray(q.offset, np.float64)[:, cols]
  if q.perm is not None:
    w = w[:, np.argsort(np.asarray(q.perm))]
  return np.asarray(x, np.float64) @ w.T


class LUTGemmBase:
  """``lut_gemm`` over BCQArrays (:data:`LUT_GEMM_GRID`): the implementation named ``implementation`` (no
  fallback; a case it refuses must be listed by :meth:`unsupported`) against a NumPy float64 spec."""
  implementation = "xla"

  def unsupported(self, case: dict) -> str | None:
    return None

  def call(self, x, q):
    from qjax.kernels.lut_gemm import lut_gemm
    return jax.jit(lambda x, q: lut_gemm(x, q, implementation=self.implementation, fallback=False))(x, q)

  @pytest.mark.parametrize("case", LUT_GEMM_GRID, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
  def test_equals_numpy_spec(self, case):
    rng = np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode()))
    x, q = grid_bcq(case, rng)
    if (reason := self.unsupported(case)) is not None:
      with pytest.raises(NotImplementedError):
        self.call(x, q)
      pytest.skip(reason)
    got = self.call(x, q)
    assert got.dtype == x.dtype and got.shape == (case["m"], case["n_out"])
    want = numpy_lut_gemm(np.asarray(x.astype(jnp.float32)), q)
    tol = 2e-2 if case["dtype"] == "bfloat16" else 2e-5
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=tol, atol=tol * np.abs(want).max())

  def test_corrupted_alpha_shows(self):
    """A test that can fail: scaling one group's alphas changes exactly that output row."""
    case = LUT_GEMM_GRID[10]
    x, q = grid_bcq(case, np.random.default_rng(1))
    bad = dataclasses.replace(q, alpha=q.alpha.at[3, 0].multiply(2))
    a, b = np.asarray(self.call(x, q), np.float32), np.asarray(self.call(x, bad), np.float32)
    assert not np.allclose(a[:, 3], b[:, 3]) and np.array_equal(np.delete(a, 3, 1), np.delete(b, 3, 1))
