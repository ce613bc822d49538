"""Activation quantization, the int8 paths (W8A8, LLM.int8), SmoothQuant and the outlier test bed."""
from __future__ import annotations

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.methods.activations import outliers, quantizers as act_quant
from qjax.io import assets, text as data
from qjax import calibration
from qjax.core.formats import int8
from qjax.evaluation import perplexity
from qjax.methods import scaling
from qjax.core import tree
from qjax.kernels import int8_matmul
from qjax.methods.weights import llm_int8, rtn
from qjax.methods.activations import smoothquant
from qjax.io.hf import load_model
from qjax.calibration import calibration_windows
from qjax.models import capture


def _np_minmax(x, bits, sym):
  """Independent numpy version of the reference quantizer (notes 2.1, Q1 fixed) on the last axis."""
  x = np.asarray(x, np.float64).astype(np.float32)
  maxq = 2**bits - 1
  xmin = np.minimum(x.min(-1, keepdims=True), 0)
  xmax = np.maximum(x.max(-1, keepdims=True), 0)
  if sym:
    xmax = np.maximum(-xmin, xmax)
    xmin = -xmax
  dead = (xmin == 0) & (xmax == 0)
  xmin, xmax = np.where(dead, -1, xmin), np.where(dead, 1, xmax)
  scale = ((xmax - xmin) / np.float32(maxq)).astype(np.float32)
  zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
  q = np.clip(np.round(x / scale) + zero, 0, maxq)
  return (scale * (q - zero)).astype(np.float32)


@pytest.mark.parametrize("bits,sym,group", [(8, False, -1), (8, True, -1), (4, False, 16), (6, True, 24)])
def test_token_quantizer_matches_closed_form(bits, sym, group):
  x = np.random.default_rng(bits).standard_t(3, size=(3, 5, 48)).astype(np.float32)
  got = np.asarray(act_quant.TokenQuantizer(bits, sym, group)(jnp.asarray(x)))
  g = 48 if group == -1 else group
  want = _np_minmax(x.reshape(3, 5, -1, g), bits, sym).reshape(x.shape)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert not np.allclose(got, x)


def test_absmax_scheme_is_deepspeed_formula():
  x = np.random.default_rng(1).normal(size=(4, 32)).astype(np.float32)
  got = np.asarray(act_quant.TokenQuantizer(8, True, scheme="absmax")(jnp.asarray(x)))
  s = 2 * np.abs(x).max(-1, keepdims=True) / 256
  np.testing.assert_allclose(got, s * np.clip(np.round(x / s), -128, 127), atol=1e-6)


@pytest.mark.parametrize("sym,scheme", [(False, "minmax"), (True, "minmax"), (True, "absmax")])
def test_int8_codes_reproduce_fake_quantization(sym, scheme):
  q = act_quant.TokenQuantizer(8, sym, scheme=scheme)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 40)) + 0.5, jnp.float32)
  codes, scale, zero = q.int8_codes(x)
  assert codes.dtype == jnp.int8 and zero.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(scale * (codes.astype(jnp.float32) - zero)), np.asarray(q.fake(x)))


def test_straight_through_gradient_is_identity():
  q = act_quant.TokenQuantizer(4)
  x = jnp.linspace(-1, 2, 24).reshape(2, 12)
  g = jax.grad(lambda x: jnp.sum(q(x) * jnp.arange(12.0)))(x)
  np.testing.assert_array_equal(np.asarray(g), np.tile(np.arange(12.0), (2, 1)))


@pytest.mark.parametrize("wsym,asym", [(False, False), (False, True), (True, False), (True, True)])
def test_w8a8_int_matmul_equals_float_reference(wsym, asym):
  r = np.random.default_rng(3)
  w = jnp.asarray(r.normal(size=(48, 96)), jnp.float32)
  x = jnp.asarray(r.normal(size=(2, 5, 96)) + 0.4, jnp.float32)
  qw = rtn.quantize_weight(w, bits=8, sym=wsym, scale_dtype="float32")
  iw = int8.from_qarray(qw)
  assert iw.codes.dtype == jnp.int8 and (iw.zero is None) == wsym
  np.testing.assert_array_equal(np.asarray(iw.dequantize()), np.asarray(qw.dequantize()))
  act = act_quant.TokenQuantizer(8, sym=not asym)
  got, want = int8_matmul.w8a8_matmul(x, iw, act), int8_matmul.reference(x, qw, act)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=2e-6 * float(jnp.max(jnp.abs(want))))
  # and the int path really is an integer dot_general
  hlo = jax.jit(int8_matmul.w8a8_matmul, static_argnums=2).lower(x, iw, act).as_text()
  assert re.search(r"dot_general.*xi8>.*-> tensor<[0-9x]*xi32>", hlo), hlo


def test_llm_int8_matches_numpy_decomposition():
  r = np.random.default_rng(4)
  w = r.normal(size=(32, 64)).astype(np.float32)
  x = r.normal(size=(6, 64)).astype(np.float32)
  x[2, 5], x[4, 17] = 9.0, -7.5
  lw = llm_int8.quantize_weight(jnp.asarray(w), threshold=6.0)
  absw = np.abs(w).max(1, keepdims=True)
  cb = np.round(127 * w / absw)
  np.testing.assert_array_equal(np.asarray(lw.codes), cb)
  outl = np.abs(x).max(0) >= 6.0
  assert outl.sum() == 2
  xr = np.where(outl, 0, x)
  sx = np.abs(xr).max(1, keepdims=True) / 127
  want = (np.round(xr / sx) @ cb.T) * sx * (absw.T / 127) + np.where(outl, x, 0) @ (cb * absw / 127).T
  got = np.asarray(int8_matmul.llm_int8_matmul(jnp.asarray(x), lw))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert np.abs(got - x @ w.T).max() < 0.05 * np.abs(x @ w.T).max()


def _ids(vocab, n=2, t=24, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, (n, t)), jnp.int32)


@pytest.fixture(scope="module", params=["llama", "opt"])
def random_model(request, llama_dir, opt_dir):
  return load_model(llama_dir if request.param == "llama" else opt_dir)


def test_w8a8_fake_and_int8_paths_agree(random_model):
  model, params = random_model
  q = rtn.quantize(params, rtn.RTNConfig(bits=8, scale_dtype="float32"), progress=False)[0]
  qi = tree.unflatten({p: int8.from_qarray(v) if isinstance(v, int8.QArray) else v
                       for p, v in tree.flatten(q).items()})
  m = model.with_hooks(act_quant.ActQuantConfig(bits=8).hooks())
  ids = _ids(model.config.vocab_size)
  fp = model.apply(params, ids)[0]
  fake, real = jax.jit(m.apply)(q, ids)[0], jax.jit(m.apply)(qi, ids)[0]
  err = float(jnp.max(jnp.abs(fake - fp)))
  assert err > 0
  # each matmul agrees to float rounding; a rounding-level difference can flip one activation code in a later
  # layer, so the whole model agrees to a small fraction of the quantization error itself
  assert float(jnp.max(jnp.abs(fake - real))) < 0.1 * err
  one = dataclasses.replace(m, config=dataclasses.replace(model.config, num_layers=1))
  np.testing.assert_allclose(np.asarray(one.apply(qi, ids)[0]), np.asarray(one.apply(q, ids)[0]),
                             rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(fp))))


def test_quantized_attention_matmuls_stay_causal(random_model):
  """V is quantized per token (the reference's per-channel-over-all-keys V leaks future tokens)."""
  model, params = random_model
  m = model.with_hooks(act_quant.ActQuantConfig(bits=4, attention_matmuls=True).hooks())
  ids = _ids(model.config.vocab_size, 1, 20)
  a = m.apply(params, ids)[0]
  b = m.apply(params, ids.at[:, 12:].set(3))[0]
  np.testing.assert_array_equal(np.asarray(a[:, :12]), np.asarray(b[:, :12]))
  assert float(jnp.max(jnp.abs(a - model.apply(params, ids)[0]))) > 0


def test_smoothing_factors_reference_formula():
  r = np.random.default_rng(5)
  a = np.abs(r.normal(size=16)).astype(np.float32) * 10
  a[3] = 0.0
  ws = [r.normal(size=(8, 16)).astype(np.float32), r.normal(size=(4, 16)).astype(np.float32)]
  ws[0][:, 7] = 0
  ws[1][:, 7] = 0
  wmax = np.maximum(np.max([np.abs(w).max(0) for w in ws], axis=0), 1e-5)
  want = np.maximum(a**0.6 / wmax**0.4, 1e-5)
  np.testing.assert_allclose(np.asarray(smoothquant.smoothing_factors(a, ws, 0.6)), want, rtol=1e-6)


def _calib(model, n=4, t=16):
  return calibration.Calibration(model, np.asarray(_ids(model.config.vocab_size, n, t, seed=9)), layer_report=True)


def test_smoothquant_is_function_preserving(random_model):
  model, params = random_model
  s, report = smoothquant.smooth(params, smoothquant.SmoothQuantConfig(0.5), _calib(model),
                                             progress=False)
  ids = _ids(model.config.vocab_size)
  a, b = model.apply(params, ids)[0], model.apply(s, ids)[0]
  assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 1e-5
  fam = model.family
  norm = fam.norm_feeds[0][0]
  w0 = tree.flatten(params)[f"{fam.layer_path(0)}/{norm}/weight"]
  assert not np.allclose(np.asarray(tree.flatten(s)[f"{fam.layer_path(0)}/{norm}/weight"]), np.asarray(w0))
  assert all(l.output_rel_error < 1e-10 for l in report.layers)


def test_plant_outliers_is_function_preserving_and_plants(random_model):
  model, params = random_model
  cfg = outliers.OutlierConfig(channels=2, factor=50.0)
  p = outliers.plant_outliers(model, params, cfg)
  ids = _ids(model.config.vocab_size)
  a, b = model.apply(params, ids)[0], model.apply(p, ids)[0]
  assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 1e-5
  fam, ch = model.family, outliers.outlier_channels(model.config.hidden_size, cfg)
  x = capture.embed_windows(model, p, jnp.asarray(_ids(model.config.vocab_size, 2, 16)))
  q = fam.linear_path(fam.norm_feeds[0][1][0])
  stats = capture.collect_stats(model, tree.unflatten(
      {k[len(fam.layer_path(0)) + 1:]: v for k, v in tree.flatten(p).items() if k.startswith(fam.layer_path(0) + "/")}),
      x, (q,), ("absmax",))
  absmax = np.asarray(stats[q]["absmax"])
  others = np.delete(absmax, ch)
  assert absmax[ch].min() > 10 * np.median(others)


def test_fold_rejects_post_ln_and_weightless_norms():
  from qjax.core.errors import InputError
  with pytest.raises(InputError, match="post-LN"):
    scaling.check_foldable(types.SimpleNamespace(do_layer_norm_before=False, layer_norm_affine=True))
  with pytest.raises(InputError, match="no weights"):
    scaling.check_foldable(types.SimpleNamespace(do_layer_norm_before=True, layer_norm_affine=False))


def test_outliers_break_w8a8_and_smoothquant_and_llm_int8_recover(stories_dir):
  """The issue's outlier experiment on stories260K, on a few windows (the README has the full numbers)."""
  model, params = load_model(stories_dir)
  tok = data.load_tokenizer(stories_dir)
  tokens = data.tokenize(tok, data.read_text(assets.named_text("tinystories", assets.PPL_DATASETS)))
  calib_tokens = data.tokenize(tok, data.read_text(assets.named_text("tinystories", assets.CALIB_DATASETS)))
  planted = outliers.plant_outliers(model, params, outliers.OutlierConfig(4, 50.0))
  a8 = model.with_hooks(act_quant.ActQuantConfig(bits=8).hooks())
  w8 = rtn.RTNConfig(bits=8, scale_dtype="float32")
  ppl = lambda m, p: perplexity.perplexity(m, p, tokens, 256, 12, progress=False).ppl
  fp = ppl(model, params)
  clean = ppl(a8, rtn.quantize(params, w8, progress=False)[0])
  broken = ppl(a8, rtn.quantize(planted, w8, progress=False)[0])
  calib = calibration_windows(model, calib_tokens, 16, 256, 0)
  smoothed, _ = smoothquant.smooth(planted, smoothquant.SmoothQuantConfig(0.5), calib, progress=False)
  sq = ppl(a8, rtn.quantize(smoothed, w8, progress=False)[0])
  li8 = ppl(model, llm_int8.quantize(planted, progress=False)[0])
  assert clean < 1.01 * fp
  assert broken > 1.015 * fp and broken > fp + 5 * (clean - fp)
  assert sq < 1.02 * fp and li8 < 1.02 * fp
