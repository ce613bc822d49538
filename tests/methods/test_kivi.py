"""KIVI KV cache (``qjax.methods.kv.kivi``): the quantizer against a numpy closed form, the flush rule and the views
of the cache, stored bytes, the single-pass "quantized past" hook against token-by-token decoding, generation."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.io import text as data
from qjax.evaluation import generation
from qjax import models
from qjax.core.errors import InputError
from qjax.methods.kv import kivi
from qjax.models import ActivationHooks
from qjax.io.hf import load_model


def _np_qdq(x, bits, g, per_channel):
  """numpy KIVI quantize-dequantize of ``x [..., T, d]``: min-max per group of ``g`` tokens of one channel
  (``per_channel``, keys) or ``g`` channels of one token (values); float16 scale and minimum."""
  *lead, t, d = x.shape
  xg = x.reshape(*lead, t // g, g, d) if per_channel else x.reshape(*lead, t, d // g, g)
  axis = -2 if per_channel else -1
  maxq = 2**bits - 1
  mn = xg.min(axis, keepdims=True)
  scale = ((xg.max(axis, keepdims=True) - mn) / np.float32(maxq)).astype(np.float16).astype(np.float32)
  mn = mn.astype(np.float16).astype(np.float32)
  q = np.round(np.clip((xg - mn) / np.where(scale == 0, 1, scale), 0, maxq))
  return (q * scale + mn).reshape(x.shape)


@pytest.fixture(scope="module")
def llama(llama_dir):
  return load_model(llama_dir)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantizers_match_numpy_closed_form(bits):
  x = np.random.default_rng(bits).normal(size=(2, 3, 16, 8)).astype(np.float32) * 3
  x[0, 0, :4, 1] = 0.7    # a constant key group (max == min)
  x[1, 2, 5, :4] = -1.5   # a constant value group
  for quantize, per_channel, const in ((kivi.quantize_keys, True, (0, 0, slice(4), 1)),
                                       (kivi.quantize_values, False, (1, 2, 5, slice(4)))):
    qt = quantize(jnp.asarray(x), bits=bits, group_size=4)
    assert qt.bits == bits and qt.shape == x.shape and qt.codes.dtype == jnp.uint8
    assert qt.codes.shape == (2, 3, 16, bits)  # 8 channels x bits, packed into bytes
    assert qt.scale.shape == ((2, 3, 4, 8) if per_channel else (2, 3, 16, 2))
    got = np.asarray(qt.dequantize())
    np.testing.assert_allclose(got, _np_qdq(x, bits, 4, per_channel), rtol=1e-6, atol=1e-6)
    err = np.abs(got - x)
    assert err.max() > 1e-3 * 2 ** (8 - bits)  # really quantized
    assert np.isfinite(got).all()
    assert err[const].max() < 1e-3  # the max == min guard: exact up to the float16 minimum


def test_bad_configs_and_group_not_dividing_head_dim_are_rejected(llama):
  for bad in (dict(bits=1), dict(bits=9), dict(k_bits=1), dict(v_bits=16), dict(group_size=0),
              dict(group_size=8, residual=12), dict(residual=-32), dict(scale_dtype="int8")):
    with pytest.raises(InputError):
      kivi.KIVIConfig(**bad)
  x = jnp.zeros((1, 1, 6, 6))
  with pytest.raises(InputError, match="divide head_dim"):
    kivi.quantize_values(x, bits=4, group_size=4)
  with pytest.raises(InputError, match="multiple of the group size"):
    kivi.quantize_keys(x, bits=4, group_size=4)
  model, params = llama  # head_dim 16
  cfg = kivi.KIVIConfig(group_size=32, residual=0)
  with pytest.raises(InputError, match="must divide head_dim 16"):
    kivi.cache_factory(cfg)(model.config, 1, 64)
  with pytest.raises(InputError, match="must divide head_dim 16"):
    kivi.effective_bits(cfg, 16)
  with pytest.raises(InputError, match="must divide head_dim 16"):
    jax.eval_shape(model.with_hooks(ActivationHooks(kv_past=kivi.past_hook(cfg))).apply, params,
                   jnp.ones((1, 8), jnp.int32))


def _expected_view(x, x_hat, q0, n1):
  """``[b, T, kvh, d]``: what a call reads that takes the rows to ``n1`` tokens with ``q0`` quantized before it:
  tokens ``< q0`` quantized (``x_hat``), the rest up to ``n1`` exact, zeros after."""
  s = np.arange(x.shape[1])[None, :, None, None]
  return np.where(s < q0, x_hat, np.where(s < n1, x, 0))


@functools.lru_cache(maxsize=None)
def _update():
  return jax.jit(lambda lc, k, v, index, pos: lc.update(k, v, index, pos))


@pytest.mark.parametrize("residual", [8, 0])
def test_cache_flush_rule_views_and_state_token_by_token(residual):
  """2-bit keys, 4-bit values (B3: each dequantized with its own width), G = 4: every call reads the expected
  mix of quantized and exact tokens, and after it the quantized part and the residual hold what the flush rule
  says."""
  cfg = kivi.KIVIConfig(k_bits=2, v_bits=4, group_size=4, residual=residual)
  rng = np.random.default_rng(residual)
  t, b, kvh, d = 26, 2, 2, 8
  k = rng.normal(size=(b, t, kvh, d)).astype(np.float32)
  v = rng.normal(size=(b, t, kvh, d)).astype(np.float32)
  tt = t // 4 * 4
  k_hat = np.swapaxes(_np_qdq(np.swapaxes(k[:, :tt], 1, 2), 2, 4, True), 1, 2)
  k_hat = np.concatenate([k_hat, k[:, tt:]], 1)  # the incomplete last group is never read quantized
  v_hat = _np_qdq(v, 4, 4, False)
  lc = kivi.KIVILayerCache.empty(cfg, b, t, kvh, d)
  assert lc.k_res.shape[1] == residual + 3 and lc.keys.codes.shape[2] == (t - residual) // 4 * 4
  for n in range(t):
    ka, va, lc = _update()(lc, k[:, n:n + 1], v[:, n:n + 1], jnp.int32(n), jnp.full((b, 1), n, jnp.int32))
    q0, q1 = int(kivi.quantized_length(n, cfg)), int(kivi.quantized_length(n + 1, cfg))
    assert q0 == max(n - residual, 0) // 4 * 4 and n + 1 - q1 in range(min(n + 1, residual), residual + 4)
    for got, x, x_hat in ((ka, k, k_hat), (va, v, v_hat)):
      np.testing.assert_allclose(np.asarray(got), _expected_view(x, x_hat, q0, n + 1), rtol=1e-6, atol=1e-6)
    if q0:
      assert np.abs(np.asarray(ka)[:, :q0] - k[:, :q0]).max() > 0.05   # keys really quantized
      assert np.abs(np.asarray(va)[:, :q0] - v[:, :q0]).max() > 0.01   # values too (4 bits)
      assert np.abs(np.asarray(va)[:, :q0] - v[:, :q0]).max() < 0.5    # ... with 4 bits, not 2 (B3)
    # state after the call: groups < q1 stored, the residual holds tokens q1 .. n
    scale = np.asarray(lc.keys.scale)
    assert (scale[:, :, :q1 // 4] != 0).all() and (scale[:, :, q1 // 4:] == 0).all()
    assert (np.asarray(lc.values.scale)[:, :, :q1] != 0).all() and (np.asarray(lc.values.scale)[:, :, q1:] == 0).all()
    np.testing.assert_array_equal(np.asarray(lc.k_res)[:, :n + 1 - q1], k[:, q1:n + 1])
    np.testing.assert_array_equal(np.asarray(lc.v_res)[:, :n + 1 - q1], v[:, q1:n + 1])


@pytest.mark.parametrize("prompt", [3, 9, 13, 20])
def test_prefill_of_any_length_with_left_padding(prompt):
  """B4: prompts shorter than R work. A prompt call reads its tokens exactly; the next decode step reads the
  flushed groups quantized. Row 1 is left padded by 2 slots and reads exactly what an unpadded row would."""
  cfg = kivi.KIVIConfig(bits=3, group_size=4, residual=8)
  rng = np.random.default_rng(prompt)
  b, kvh, d, pad, max_len = 2, 2, 8, 2, 24
  k = rng.normal(size=(b, prompt + 1, kvh, d)).astype(np.float32)
  v = rng.normal(size=(b, prompt + 1, kvh, d)).astype(np.float32)
  mask = np.ones((b, prompt), np.int32)
  mask[1, :pad] = 0
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  lc = kivi.KIVILayerCache.empty(cfg, b, max_len, kvh, d)
  ka, va, lc = _update()(lc, k[:, :prompt], v[:, :prompt], jnp.int32(0), jnp.asarray(pos))
  np.testing.assert_array_equal(np.asarray(ka)[0, :prompt], k[0, :prompt])
  np.testing.assert_array_equal(np.asarray(va)[1, pad:prompt], v[1, pad:prompt])
  assert not np.asarray(ka)[1, :pad].any() and not np.asarray(ka)[:, prompt:].any()
  n = np.array([prompt, prompt - pad])  # real tokens per row
  ka, va, lc = _update()(lc, k[:, prompt:], v[:, prompt:], jnp.int32(prompt), jnp.asarray(n[:, None], jnp.int32))
  for row, start in ((0, 0), (1, pad)):
    x = np.concatenate([k[row, start:prompt], k[row, prompt:]])   # the row's real tokens, in order
    q0 = int(kivi.quantized_length(n[row], cfg))
    got = np.asarray(ka)[row, start:prompt + 1]
    np.testing.assert_array_equal(got[q0:], x[q0:])
    if q0:
      want = np.swapaxes(_np_qdq(np.swapaxes(x[None, :q0], 1, 2), 3, 4, True), 1, 2)[0]
      np.testing.assert_allclose(got[:q0], want, rtol=1e-6, atol=1e-6)
      assert np.abs(got[:q0] - x[:q0]).max() > 0.01


def test_stored_bytes_equal_the_closed_form(stories_dir):
  config = models.ModelConfig.from_dir(stories_dir)  # 5 layers, 4 KV heads, head_dim 8
  cfg = kivi.KIVIConfig(bits=2, group_size=8, residual=32)
  cache = kivi.cache_factory(cfg)(config, 3, 256)
  layer = cache.layers[0]
  assert layer.keys.codes.dtype == jnp.uint8 and layer.keys.codes.shape == (3, 4, 224, 2)   # 8 x 2 bits
  assert layer.values.scale.shape == (3, 4, 224, 1) and layer.keys.scale.shape == (3, 4, 28, 8)
  assert layer.keys.scale.dtype == jnp.float16 and layer.k_res.shape == (3, 39, 4, 8)
  # per layer and KV head: 224 tokens x (2 + 2) code bytes, 28 x 8 + 224 x 1 (scale, min) pairs x 2 x 2 bytes,
  # 2 x 39 residual tokens x 8 x 4 bytes
  per_head = 224 * 4 + (28 * 8 + 224) * 4 + 2 * 39 * 32
  assert generation.cache_bytes_per_token(cache) == 5 * 4 * per_head / 256
  assert kivi.bytes_per_token(cfg, config, 256) == 5 * 4 * per_head / 256
  for c, bits in ((cfg, 2 + 4), (kivi.KIVIConfig(bits=4, group_size=8, residual=0), 4 + 4),
                  (kivi.KIVIConfig(k_bits=2, v_bits=3, group_size=8, residual=32), 2.5 + 4),
                  (kivi.KIVIConfig(bits=4, group_size=8, scale_dtype="float32"), 4 + 8)):
    assert kivi.effective_bits(c, 8) == bits
    long = kivi.bytes_per_token(c, config, 1 << 20) * 8 / (5 * 2 * 4 * 8)
    assert abs(long - bits) < 1e-2
  assert kivi.effective_bits(kivi.KIVIConfig(bits=4, group_size=32), 128) == 5.0


def _cached_logits(model, params, cfg, ids, mask, prefill):
  """Logits ``[b, T - prefill + 1, vocab]`` of positions ``prefill - 1 ..``: the first ``prefill`` slots in one
  call into an empty KIVI cache, then one call per slot."""
  apply = jax.jit(lambda p, i, m, c: model.apply(p, i, m, None, c))
  logits, cache = apply(params, ids[:, :prefill], mask[:, :prefill],
                        kivi.cache_factory(cfg)(model.config, ids.shape[0], ids.shape[1]))
  out = [logits[:, -1]]
  for n in range(prefill, ids.shape[1]):
    logits, cache = apply(params, ids[:, n:n + 1], mask[:, n:n + 1], cache)
    out.append(logits[:, 0])
  return np.stack(out, 1)


def _hook_logits(model, params, cfg, ids, mask, prefill=0):
  m = model.with_hooks(ActivationHooks(kv_past=kivi.past_hook(cfg, prefill)))
  return np.asarray(jax.jit(m.apply)(params, ids, mask)[0])


@pytest.mark.parametrize("prefill, scale_dtype", [(1, "float32"), (9, "float32"), (1, "float16")])
def test_single_pass_hook_equals_cached_decoding(llama, prefill, scale_dtype):
  """Random LLaMA (GQA, head_dim 16), 2-bit keys / 3-bit values, G = 4, R = 4, a left-padded batch: the hook's
  single-pass logits equal those of running the cache, token by token (``prefill = 1``) or after a prompt call of
  9 slots; both differ clearly from the fp model. Padding changes nothing: row 1 equals its unpadded self.

  Equality is to float rounding with float32 scales. With float16 scales, float-rounding differences of the keys
  and values (batch shapes differ) now and then round a scale or minimum to the neighbouring float16, which moves
  logits by ~1e-4: agreement to 2e-3 there (a wrong quantized/exact split moves them by > 0.05)."""
  model, params = llama
  cfg = kivi.KIVIConfig(k_bits=2, v_bits=3, group_size=4, residual=4, scale_dtype=scale_dtype)
  tol = dict(rtol=1e-4, atol=1e-4) if scale_dtype == "float32" else dict(rtol=0, atol=2e-3)
  ids = np.random.default_rng(0).integers(4, model.config.vocab_size, size=(2, 26)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :5] = 0
  hook = _hook_logits(model, params, cfg, ids, mask, 0 if prefill == 1 else prefill)
  cached = _cached_logits(model, params, cfg, ids, mask, prefill)
  real = mask[:, prefill - 1:].astype(bool)
  np.testing.assert_allclose(cached[real], hook[:, prefill - 1:][real], **tol)
  if scale_dtype == "float16":
    return
  fp = np.asarray(jax.jit(model.apply)(params, ids, mask)[0])
  assert np.abs(hook[:, 12:] - fp[:, 12:]).max() > 0.05
  if prefill == 1:
    alone = _hook_logits(model, params, cfg, ids[1:, 5:], mask[1:, 5:])
    np.testing.assert_allclose(hook[1, 5:], alone[0], **tol)
  else:  # the prompt call itself is exact
    np.testing.assert_allclose(hook[:, :prefill][mask[:, :prefill] == 1], fp[:, :prefill][mask[:, :prefill] == 1],
                               rtol=1e-5, atol=1e-5)


def test_generation_on_stories260k(stories_dir):
  """8-bit KIVI with no residual window (every complete group of 8 tokens quantized) keeps fp's greedy
  continuation (the text ``tests/test_generate.py`` checks for the fp cache); the result reports the cache's bytes."""
  model, params = load_model(stories_dir)
  cfg = kivi.KIVIConfig(bits=8, group_size=8, residual=0)
  gen = generation.Generator(model, params, data.load_tokenizer(stories_dir), cache_factory=kivi.cache_factory(cfg))
  r = gen.generate(["Once upon a time"], 24, max_len=40)
  assert len(r.tokens[0]) == 24 and len(gen.encode("Once upon a time")) + 24 > 2 * 8  # groups were flushed
  assert r.texts[0].startswith(", there was a little girl named Lily. She loved to play outside in the")
  assert r.cache_bytes_per_token == kivi.bytes_per_token(cfg, model.config, 40) < 5 * 2 * 4 * 8 * 4  # < fp32


def test_cached_decoding_through_the_native_kernel_equals_the_xla_path(llama, monkeypatch):
  """The decode steps through ``kivi_attention``'s native CPU kernel (packed codes; the test checks it was
  traced) and through the XLA spec (the store dequantized whole) give the same logits (a left-padded batch;
  prompt call, then token by token)."""
  from qjax.kernels.kivi_attention import cpu
  if not cpu.available():
    pytest.skip("native CPU kernel not built")
  traced = []
  native = cpu.kivi_attention_cpu
  monkeypatch.setattr(cpu, "kivi_attention_cpu", lambda *a, **k: (traced.append(a[0].shape), native(*a, **k))[1])
  model, params = llama
  cfg = kivi.KIVIConfig(k_bits=2, v_bits=4, group_size=4, residual=4)
  ids = np.random.default_rng(1).integers(4, model.config.vocab_size, size=(2, 22)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :3] = 0
  got = _cached_logits(model.with_kernel("cpu"), params, cfg, ids, mask, 5)
  assert {shape[1] for shape in traced} == {5, 1}                    # the prompt call (t <= 16) and the steps
  n = len(traced)
  want = _cached_logits(model.with_kernel("xla"), params, cfg, ids, mask, 5)
  assert len(traced) == n
  real = mask[:, 4:].astype(bool)
  # 1e-4: the two paths sum in different orders, and a 2-bit code at a rounding boundary can flip (seen: 4e-5)
  np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
