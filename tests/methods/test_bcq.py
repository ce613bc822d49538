"""BCQ (LUT-GEMM's binary-coding quantization): against a NumPy transcription of the reference's
``quantize_bcq.quantize`` (from the notes, section 2.8), search properties, the exact uniform conversion, the
stored format and the model-level method."""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from qjax.calibration import Calibration
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.bcq import BCQArray
from qjax.core.formats.qarray import QArray
from qjax.io import checkpoint
from qjax.io.hf import load_model
from qjax.methods.weights import bcq, gptq, rtn


def reference_bcq(w: np.ndarray, bits: int, group_size: int, rounds: int):
  """The reference's computation on an fp32 matrix (in float32, as it runs on fp32 weights): greedy
  (``b = sign(r)``, ``alpha = mean |r|``), then ``rounds`` alternating iterations of ``k`` CG steps on
  ``B^T B alpha = B^T w`` from the current alpha (``+1e-6`` in both denominators), ``alpha <- sort(|alpha|)``
  descending, and ``B`` from the nearest of the ``2^k`` levels (ties go right). Returns ``(w_hat, alpha [rows,
  k])`` over the groups as rows."""
  g = w.shape[1] if group_size == -1 else group_size
  x = w.reshape(-1, g).astype(np.float32)
  r, alpha, b = x.copy(), [], []
  for _ in range(bits):
    bi = np.sign(r)
    ai = np.mean(np.abs(r), axis=1, keepdims=True)
    r -= bi * ai
    b.append(bi)
    alpha.append(ai[:, 0])
  b, alpha = np.stack(b, -1), np.stack(alpha, -1)                 # [rows, g, k], [rows, k]
  pats = np.array(list(itertools.product([1.0, -1.0], repeat=bits)), np.float32)
  for _ in range(rounds if bits > 1 else 0):
    a, rhs = np.einsum("rgk,rgl->rkl", b, b), np.einsum("rgk,rg->rk", b, x)
    res = rhs - np.einsum("rkl,rl->rk", a, alpha)
    p, rs = res, np.sum(res * res, -1, keepdims=True)
    for _ in range(bits):
      ap = np.einsum("rkl,rl->rk", a, p)
      step = rs / (np.sum(p * ap, -1, keepdims=True) + 1e-6)
      alpha, res = alpha + step * p, res - step * ap
      rs_new = np.sum(res * res, -1, keepdims=True)
      p, rs = res + rs_new / (rs + 1e-6) * p, rs_new
    alpha = -np.sort(-np.abs(alpha), axis=-1)
    levels = alpha @ pats.T                                          # [rows, 2^k]
    order = np.argsort(levels, axis=-1, kind="stable")
    srt = np.take_along_axis(levels, order, -1)
    mids = (srt[:, 1:] + srt[:, :-1]) / 2
    idx = np.stack([np.searchsorted(m, row, side="right") for m, row in zip(mids, x)])
    b = pats[np.take_along_axis(order, idx, -1)]
  return np.einsum("rgk,rk->rg", b, alpha).reshape(w.shape), alpha


@pytest.mark.parametrize("bits,group_size,rounds", [(3, 32, 0), (3, 32, 1), (4, 128, 5), (2, 64, 3)])
def test_matches_the_reference_computation(bits, group_size, rounds):
  w = np.random.default_rng(bits * 100 + rounds).normal(size=(48, 256)).astype(np.float32)
  want, want_alpha = reference_bcq(w, bits, group_size, rounds)
  r = bcq.search(jnp.asarray(w), bits=bits, group_size=group_size, rounds=rounds)
  got = np.asarray(jnp.einsum("oiq,oiq->oi", r.binaries, jnp.repeat(r.alpha, group_size, axis=1)))
  mse, want_mse = np.mean((got - w) ** 2), np.mean((want - w) ** 2)
  assert abs(mse / want_mse - 1) < 0.01
  assert float(r.mse[-1]) == pytest.approx(mse, rel=1e-4)
  np.testing.assert_allclose(np.asarray(r.alpha).reshape(-1, bits), want_alpha, rtol=1e-4, atol=1e-6)
  assert set(np.unique(np.asarray(r.binaries))) == {-1.0, 1.0}


@pytest.mark.parametrize("bits,group_size,offset,seed", [(2, 32, False, 0), (3, 64, False, 1), (4, -1, False, 2),
                                                         (3, 48, True, 3), (4, 128, True, 4)])
def test_alternating_never_increases_the_error_and_refined_beats_greedy(bits, group_size, offset, seed):
  """Property: each alternating round (refit, then nearest levels) lowers the MSE or keeps it; refined greedy
  (one refit) <= greedy. Width 200 leaves a partial last group for 48/64/128."""
  w = jnp.asarray(np.random.default_rng(seed).standard_t(4, size=(40, 200)), jnp.float32)
  mse = np.asarray(bcq.search(w, bits=bits, group_size=group_size, rounds=12, offset=offset).mse)
  assert np.all(np.diff(mse) <= 1e-6 * mse[:-1]), mse
  assert mse[-1] < 0.95 * mse[0]
  greedy = float(bcq.search(w, bits=bits, group_size=group_size, rounds=0, offset=offset).mse[-1])
  refined = float(bcq.search(w, bits=bits, group_size=group_size, search="refined", offset=offset).mse[-1])
  assert refined <= greedy * (1 + 1e-6) and refined < greedy
  assert greedy == pytest.approx(mse[0], rel=1e-6)


def test_zero_residuals_give_signs_not_zeros():
  """The reference's torch.sign makes 0 "binaries" on exact zeros; here sign(0) = +1 and the fit is finite."""
  w = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
  w[0] = 0.0
  w[1, ::2] = 0.0
  q = bcq.quantize_weight(jnp.asarray(w), bits=3, group_size=32, rounds=3)
  b = np.asarray(q.binaries())
  assert set(np.unique(b)) <= {-1.0, 1.0}
  d = np.asarray(q.dequantize())
  assert np.all(np.isfinite(d)) and np.abs(d[0]).max() < 1e-6


@pytest.mark.parametrize("bits,group_size,sym", list(itertools.product([2, 3, 4, 8], [-1, 32, 64], [False, True])))
def test_uniform_conversion_is_exact(bits, group_size, sym):
  """RTN -> BCQ reproduces the uniform dequantized weight: to float32 rounding with float32 scales; with float16
  storage the alphas stay exact and the offset is rounded once (fp16 half-ulp of the offset). Width 200: partial
  last groups; a permuted (act-order) QArray keeps its order."""
  rng = np.random.default_rng(bits)
  w = jnp.asarray(rng.normal(size=(24, 200)), jnp.float32)
  for scale_dtype in ("float32", "float16"):
    q = rtn.quantize_weight(w, bits=bits, group_size=group_size, sym=sym, scale_dtype=scale_dtype)
    b = bcq.from_qarray(q)
    assert isinstance(b, BCQArray) and b.alpha.dtype == jnp.dtype(scale_dtype)
    want, got = np.asarray(q.dequantize()), np.asarray(b.dequantize())
    if scale_dtype == "float32":
      np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * np.abs(want).max() * bits)
    else:
      bound = np.abs(np.asarray(b.offset, np.float32)).max() * 2.0**-11 + 1e-7
      assert np.abs(got - want).max() <= bound
  perm = jnp.asarray(rng.permutation(200), jnp.int32)
  qp = rtn.quantize_weight(w[:, perm], bits=bits, group_size=group_size, sym=sym, scale_dtype="float32")
  qp = type(qp)(**{**vars(qp), "perm": perm})
  np.testing.assert_allclose(np.asarray(bcq.from_qarray(qp).dequantize()), np.asarray(qp.dequantize()),
                             rtol=0, atol=4e-7 * bits * float(jnp.abs(w).max()))


def test_stored_bits_per_weight():
  """q bit planes + float16 alphas (+ offsets): q + 16 q / g (+ 16 / g) bits per weight."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 256)), jnp.float32)
  for bits, g, offset in [(3, 128, False), (4, 64, True), (2, -1, False)]:
    q = bcq.quantize_weight(w, bits=bits, group_size=g, rounds=1, offset=offset)
    gg = 256 if g == -1 else g
    assert q.nbytes * 8 / q.size == pytest.approx(bits + 16 * bits / gg + (16 / gg if offset else 0))
    assert q.planes.dtype == jnp.uint32 and q.planes.shape == (bits, 64, 8)


def test_config_validation():
  with pytest.raises(InputError, match="between 1 and 8"):
    bcq.BCQConfig(bits=9)
  with pytest.raises(InputError, match="--bcq-search"):
    bcq.BCQConfig(search="exhaustive")
  with pytest.raises(InputError, match="refined"):
    bcq.BCQConfig(search="refined", rounds=5)
  with pytest.raises(InputError, match="--bcq-from"):
    bcq.BCQConfig(source="gptq")


def test_model_level_checkpoint_round_trip_and_gptq_conversion(llama_dir, tmp_path):
  """``--method bcq`` quantizes every decoder linear; the model saves and loads through checkpoints with the
  same logits; a GPTQ model converted with :func:`bcq.convert` computes the same function."""
  model, params = load_model(llama_dir)
  q, _ = bcq.quantize(params, bcq.BCQConfig(bits=3, group_size=16, rounds=2), progress=False)
  flat = tree.flatten(q)
  assert sum(isinstance(v, BCQArray) for v in flat.values()) == len(model.family.linears) * model.config.num_layers
  checkpoint.save(tmp_path / "ck", q, source_dir=llama_dir, dtype="float32", method={"name": "bcq", "config": {}})
  loaded, _ = checkpoint.load_params(tmp_path / "ck")
  ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 12)), jnp.int32)
  a, b = model.apply(q, ids)[0], model.apply(loaded, ids)[0]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(model.apply(params, ids)[0]), atol=1e-3)
  windows = np.random.default_rng(1).integers(0, model.config.vocab_size, (4, 16)).astype(np.int32)
  g, _ = gptq.quantize(params, gptq.GPTQConfig(bits=4, group_size=16), calibration=Calibration(model, windows),
                       progress=False)
  converted = bcq.convert(g)
  assert not any(isinstance(v, QArray) for v in tree.flatten(converted).values())
  assert sum(isinstance(v, BCQArray) for v in tree.flatten(converted).values()) == len(tree.flatten(q)) - sum(
      not isinstance(v, BCQArray) for v in flat.values())
  np.testing.assert_allclose(np.asarray(model.apply(converted, ids)[0]), np.asarray(model.apply(g, ids)[0]),
                             atol=2e-3, rtol=1e-3)
