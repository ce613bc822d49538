"""KVQuant: k-means in JAX vs a numpy Lloyd's reference, the quantize/dequantize closed forms, outliers exact at
the calibrated rate, nothing passing through unquantized, real cache bytes, first tokens exact by absolute position
(bug B13 fixed), single-pass logits equal to token-by-token decoding, generation on stories260K, and the
calibration's save/load round trip."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.io import assets, text as data
from qjax import calibration
from qjax.evaluation import generation
from qjax.core.errors import InputError
from qjax.methods.kv import kvquant as kq
from qjax.models import ActivationHooks
from qjax.models.kv_cache import KVCache
from qjax.io.hf import load_model
from qjax.calibration import calibration_windows

FAST = dict(kmeans_iters=10)
update = jax.jit(lambda cache, k, v, index, positions: cache.update(k, v, index, positions))
quantize_keys = jax.jit(kq.quantize_keys, static_argnums=1)
quantize_values = jax.jit(kq.quantize_values, static_argnums=1)
dequantize = jax.jit(lambda q: q.dequantize(jnp.float32))


def numpy_lloyd(x, w, k, iters):
  """Reference weighted Lloyd's algorithm (float64): same initialization and tie rule as ``kmeans_1d``."""
  xs = np.sort(x[w > 0])
  c = xs[np.floor((np.arange(k) + 0.5) * len(xs) / k).astype(int)].astype(np.float64)
  for _ in range(iters):
    a = np.argmin(np.abs(x[:, None] - c[None]), axis=1)
    for j in range(k):
      m = np.sum(w[a == j])
      if m > 0:
        c[j] = np.sum(w[a == j] * x[a == j]) / m
  return c


def test_kmeans_matches_numpy_lloyd_and_reduces_objective():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(-0.5, 0.1, 300), rng.normal(0.3, 0.2, 500), rng.uniform(-1, 1, 200)])
  x = x.astype(np.float32)
  w = rng.uniform(0.5, 2.0, x.size).astype(np.float32) * (rng.uniform(size=x.size) > 0.1)
  got = np.asarray(kq.kmeans_1d(jnp.asarray(x), jnp.asarray(w), k=8, iters=20))
  np.testing.assert_allclose(got, numpy_lloyd(x, w, 8, 20), atol=1e-5)
  assert np.all(np.diff(got) >= 0)
  init = kq.kmeans_1d(jnp.asarray(x), jnp.asarray(w), k=8, iters=0)
  before, after = (float(kq.kmeans_objective(jnp.asarray(x), jnp.asarray(w), c)) for c in (init, got))
  assert after < 0.8 * before


def random_layer(rng, heads=2, d=8, bits=3, capacity=2, v_outliers=1):
  lower = rng.uniform(-2.0, -0.5, (heads, d)).astype(np.float32)
  upper = rng.uniform(0.5, 2.0, (heads, d)).astype(np.float32)
  books = [np.sort(rng.uniform(-1, 1, 2**bits)).astype(np.float32) for _ in range(2)]
  return kq.KVQuantLayer(lower, upper, *books, capacity, v_outliers)


def nearest(z, book):
  return book[np.argmin(np.abs(z[..., None] - book), axis=-1)]


def test_quantize_keys_closed_form_and_outlier_capacity():
  rng = np.random.default_rng(1)
  layer = random_layer(rng)
  k = rng.normal(0, 0.4, (3, 5, 2, 8)).astype(np.float32)
  k[0, 0, 0, :4] = [5.0, -6.0, 7.0, 4.0]             # 4 outliers in one token, capacity 2: |z| largest kept
  q = quantize_keys(jnp.asarray(k), layer)
  got = np.asarray(dequantize(q))
  zero, rng_ = layer.k_zero, layer.k_range
  z = (k - zero) / rng_
  want = nearest(z, layer.k_codebook) * rng_ + zero
  out = ((k > layer.k_upper) | (k < layer.k_lower)).reshape(3, 5, 16)
  score = np.where(out, np.abs(z).reshape(3, 5, 16), -1)
  rank = np.argsort(np.argsort(-score, axis=-1), axis=-1)
  kept = (out & (rank < layer.k_capacity)).reshape(k.shape)
  assert 0 < out.sum() - 2 and kept[0, 0, 0, :4].tolist() == [False, True, True, False]
  np.testing.assert_array_equal(np.sum(np.asarray(q.outlier_idx) < 16, axis=-1), kept.reshape(3, 5, 16).sum(-1))
  np.testing.assert_allclose(got, np.where(kept, k, want), atol=1e-6)
  # an outlier beyond the capacity is clamped to the codebook
  assert got[0, 0, 0, 0] == pytest.approx(layer.k_codebook[-1] * rng_[0, 0] + zero[0, 0], abs=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_values_closed_form(dtype):
  rng = np.random.default_rng(2)
  layer = random_layer(rng, v_outliers=2)
  v = np.asarray(jnp.asarray(rng.normal(0, 1.0, (2, 6, 2, 8)), dtype)).astype(np.float32)
  q = quantize_values(jnp.asarray(v, dtype), layer)
  got = np.asarray(dequantize(q)).reshape(2, 6, 16)
  x = v.reshape(2, 6, 16)
  order = np.argsort(x, axis=-1)
  out = np.zeros_like(x, bool)
  np.put_along_axis(out, np.concatenate([order[..., :2], order[..., -2:]], -1), True, axis=-1)
  lo = np.min(np.where(out, np.inf, x), -1, keepdims=True)
  hi = np.max(np.where(out, -np.inf, x), -1, keepdims=True)
  zero = np.asarray(jnp.asarray((hi + lo) / 2, dtype)).astype(np.float32)
  r = np.asarray(jnp.asarray((hi - lo) / 2, dtype)).astype(np.float32)
  want = nearest((x - zero) / r, layer.v_codebook) * r + zero        # zero, range rounded to dtype, then float32
  np.testing.assert_allclose(got, np.where(out, x, want), atol=1e-6)
  assert np.all(np.asarray(q.outlier_val, np.float32) == np.take_along_axis(x, np.asarray(q.outlier_idx, int), -1))


def test_outlier_fraction_matches_config_and_uniform_grid():
  rng = np.random.default_rng(3)
  scales = rng.uniform(0.2, 3.0, 32).astype(np.float32)
  k = (rng.standard_t(5, (6000, 32)) * scales).astype(np.float32)
  v = rng.standard_t(5, (6000, 32)).astype(np.float32)
  cfg = kq.KVQuantConfig(bits=3, outlier_fraction=0.02, **FAST)
  lower, upper, kb, vb, stats = kq.fit_layer(cfg, 4, 8, jnp.asarray(k), jnp.asarray(v), jnp.ones_like(k),
                                             jnp.ones_like(v))
  assert float(stats["key outlier fraction"]) == pytest.approx(0.02, rel=0.05)
  assert float(stats["value outlier fraction"]) == 2 * cfg.value_outliers(32) / 32
  assert float(stats["key k-means objective"]) < float(stats["key k-means objective init"])
  layer = kq.KVQuantLayer(np.asarray(lower), np.asarray(upper), np.asarray(kb), np.asarray(vb),
                          cfg.key_outlier_capacity(32), cfg.value_outliers(32))
  held_out = (rng.standard_t(5, (2000, 4, 8)) * scales.reshape(4, 8)).astype(np.float32)
  stored = np.asarray(quantize_keys(jnp.asarray(held_out), layer).outlier_idx) < 32
  assert np.mean(stored) * layer.k_capacity / 32 == pytest.approx(0.02, rel=0.25)
  uni = kq.fit_layer(kq.KVQuantConfig(bits=2, nuq=False, outlier_fraction=0), 4, 8, jnp.asarray(k), jnp.asarray(v),
                     jnp.ones_like(k), jnp.ones_like(v))
  np.testing.assert_allclose(np.asarray(uni[2]), [-1, -1 / 3, 1 / 3, 1], atol=1e-6)
  assert float(uni[4]["key outlier fraction"]) == float(uni[4]["value outlier fraction"]) == 0


def test_config_validation():
  for bad in (dict(bits=5), dict(outlier_fraction=0.6), dict(first_fp=-1), dict(kmeans_iters=0)):
    with pytest.raises(InputError):
      kq.KVQuantConfig(**bad)
  assert kq.KVQuantConfig().value_outliers(4096) == 21       # = #{x >= quantile_0.995} for 4096 distinct values
  assert kq.KVQuantConfig(outlier_fraction=0).key_outlier_capacity(64) == 0


def small_calib(rng, heads, d, first_fp=1, layers=2):
  cfg = kq.KVQuantConfig(bits=3, first_fp=first_fp, **FAST)
  c = heads * d
  return kq.KVQuantCalibration(cfg, tuple(
      random_layer(rng, heads, d, 3, cfg.key_outlier_capacity(c), cfg.value_outliers(c)) for _ in range(layers)))


def test_cache_first_tokens_exact_by_absolute_position_b13():
  rng = np.random.default_rng(4)
  calib = small_calib(rng, 2, 8, first_fp=3)
  cache = kq.KVQuantLayerCache.empty(calib.layers[0], 2, 8, 2, 8, 3, jnp.float32, jnp.uint16)
  k = jnp.asarray(rng.normal(0, 0.5, (2, 8, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(0, 0.5, (2, 8, 2, 8)), jnp.float32)
  # row 0: a 2-token prompt left padded to 4; row 1: a 4-token prompt; then 4 decode steps of one token
  pos = np.array([[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]], np.int32)
  cache = update(cache, k[:, :4], v[:, :4], jnp.int32(0), jnp.asarray(pos[:, :4]))[2]
  for s in range(4, 8):
    cache = update(cache, k[:, s:s + 1], v[:, s:s + 1], jnp.int32(s), jnp.asarray(pos[:, s:s + 1]))[2]
  k_all, v_all = (np.asarray(a) for a in jax.jit(type(cache).read)(cache))
  exact = pos < 3
  real = np.array([[False, False, True, True, True, True, True, True], [True] * 8])
  for got, want in ((k_all, np.asarray(k)), (v_all, np.asarray(v))):
    same = np.all(got == want, axis=(2, 3))
    assert np.all(same[exact & real])                          # incl. row 0's decoded position 2 (slot 4)
    assert not np.any(same[~exact])                            # decoded tokens beyond first_fp are quantized


@functools.cache
def calibrated(path):
  """A tiny random checkpoint and its 3-bit calibration (first 2 positions exact) on random token windows."""
  model, params = load_model(path)
  windows = np.random.default_rng(5).integers(0, model.config.vocab_size, (4, 32)).astype(np.int32)
  calib = kq.calibrate(params, kq.KVQuantConfig(bits=3, first_fp=2, **FAST),
                       calibration.Calibration(model, windows), progress=False)[0]
  return model, params, calib


@pytest.fixture(scope="module")
def llama(llama_dir):
  return calibrated(llama_dir)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_single_pass_equals_token_by_token_decode(family, request):
  model, params, calib = calibrated(request.getfixturevalue(f"{family}_dir"))
  ids = np.random.default_rng(6).integers(0, model.config.vocab_size, (2, 12)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :3] = 0                                              # left padding in row 1
  hooked = model.with_hooks(ActivationHooks(kv_past=kq.past_hook(calib)))
  single = np.asarray(jax.jit(lambda p, i, m: hooked.apply(p, i, m)[0])(params, ids, mask))
  step = jax.jit(lambda p, i, m, c: model.apply(p, i, m, None, c))
  cache = kq.cache_factory(calib)(model.config, 2, 12, jnp.float32)
  decoded = []
  for s in range(12):                                          # one token per call (multi-token writes: B13 test)
    logits, cache = step(params, ids[:, s:s + 1], mask[:, s:s + 1], cache)
    decoded.append(np.asarray(logits))
  decoded = np.concatenate(decoded, axis=1)
  real = mask.astype(bool)
  np.testing.assert_allclose(decoded[real], single[real], atol=2e-5, rtol=1e-5)
  fp = np.asarray(jax.jit(lambda p, i, m: model.apply(p, i, m)[0])(params, ids, mask))
  assert np.max(np.abs(fp[real] - single[real])) > 1e-3        # the quantization is really applied


def test_fisher_weighted_calibration(llama):
  model, params, calib = llama
  windows = np.random.default_rng(5).integers(0, model.config.vocab_size, (4, 32)).astype(np.int32)
  fisher = kq.calibrate(params, kq.KVQuantConfig(bits=3, first_fp=2, fisher=True, **FAST),
                        calibration.Calibration(model, windows), progress=False)[0]
  for a, b in zip(calib.layers, fisher.layers):
    np.testing.assert_array_equal(a.k_lower, b.k_lower)        # thresholds are unweighted
    assert not np.allclose(a.k_codebook, b.k_codebook)


def test_save_load_round_trip(llama, tmp_path):
  _, _, calib = llama
  d = calib.to_dict()
  np.savez(tmp_path / "kv.npz", **{k.replace("/", "."): v for k, v in d["arrays"].items()})
  (tmp_path / "kv.json").write_text(json.dumps(d["metadata"]))
  with np.load(tmp_path / "kv.npz") as f:
    arrays = {k.replace(".", "/"): f[k] for k in f.files}
  back = kq.KVQuantCalibration.from_dict({"metadata": json.loads((tmp_path / "kv.json").read_text()),
                                          "arrays": arrays})
  assert back.config == calib.config
  for a, b in zip(calib.layers, back.layers):
    for n in ("k_lower", "k_upper", "k_codebook", "v_codebook", "k_capacity", "v_outliers"):
      np.testing.assert_array_equal(getattr(a, n), getattr(b, n))


@pytest.fixture(scope="module")
def stories(stories_dir):
  model, params = load_model(stories_dir)
  tok = data.load_tokenizer(stories_dir)
  tokens = data.tokenize(tok, data.read_text(assets.asset(assets.CALIB_DATASETS["tinystories"])))
  cfg = kq.KVQuantConfig(bits=4, nsamples=4, seqlen=128, **FAST)
  return model, params, tok, kq.calibrate(params, cfg, calibration_windows(model, tokens, cfg.nsamples, cfg.seqlen), progress=False)[0]


@pytest.mark.parametrize("dtype,dtype_bytes", [(jnp.float32, 4), (jnp.float16, 2)])
def test_stored_bytes_equal_claimed(stories, dtype, dtype_bytes):
  model, _, _, calib = stories
  c = model.config
  cache = kq.cache_factory(calib)(c, 3, 40, dtype)
  bits = generation.cache_bytes_per_token(cache) * 8 / (2 * c.num_kv_heads * c.head_dim * c.num_layers)
  assert bits == pytest.approx(kq.effective_bits(calib.config, c.head_dim, c.num_kv_heads, dtype_bytes=dtype_bytes,
                                                 position_bytes=2, max_len=40), rel=1e-12)


def test_cache_holds_quantized_keys_and_values(stories):
  """Every non-outlier entry of a non-first token reads back as ``codebook[j] * range + zero``, != the input."""
  model, params, _, calib = stories
  layer = calib.layers[1]
  rng = np.random.default_rng(7)
  shape = (1, 6, model.config.num_kv_heads, model.config.head_dim)
  z = rng.uniform(-0.95, 0.95, shape)
  z[0, :, 0, :2] = [3.0, -3.0]                                 # two key outliers per token (capacity 3)
  k = jnp.asarray(z * layer.k_range + layer.k_zero, jnp.float32)
  v = jnp.asarray(rng.normal(0, 1, k.shape), jnp.float32)
  cache = kq.KVQuantLayerCache.empty(layer, 1, 6, *k.shape[2:], 1, jnp.float32, jnp.uint16)
  cache = update(cache, k, v, jnp.int32(0), jnp.arange(6)[None])[2]
  k_all, v_all = (np.asarray(a)[0, 1:].reshape(5, -1) for a in jax.jit(type(cache).read)(cache))
  kk, vv = np.asarray(k)[0, 1:].reshape(5, -1), np.asarray(v)[0, 1:].reshape(5, -1)
  k_grid = layer.k_codebook[:, None] * layer.k_range.reshape(-1) + layer.k_zero.reshape(-1)   # [K, C]
  k_in = (kk <= layer.k_upper.reshape(-1)) & (kk >= layer.k_lower.reshape(-1))
  on_grid = np.any(np.isclose(k_all[None], k_grid[:, None], rtol=1e-6, atol=1e-6), axis=0)
  assert np.all(on_grid[k_in]) and np.all(k_all[~k_in] == kk[~k_in]) and np.all(k_all[k_in] != kk[k_in])
  v_out = np.sum(v_all == vv, axis=-1)
  assert np.all(v_out == 2 * layer.v_outliers)                # only the per-token outliers read back exactly
  np.testing.assert_array_equal(np.asarray(update(cache, k, v, jnp.int32(0), jnp.arange(6)[None])[0])[0, 0],
                                np.asarray(k)[0, 0])           # position 0 exact


def test_generation_on_stories(stories):
  model, params, tok, calib = stories
  gen = generation.Generator(model, params, tok, cache_factory=kq.cache_factory(calib))
  out = gen.generate(["Once upon a time"], 12, stop_tokens=())
  assert len(out.tokens[0]) == 12 and out.texts[0].strip()
  dense = generation.cache_bytes_per_token(KVCache.dense(model.config, 1, out.max_len))
  assert out.cache_bytes_per_token < dense / 3
