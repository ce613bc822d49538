"""ZeroQuant: DeepSpeed's symmetric weight quantizer per row group, W4/8A8 by module, layer-wise distillation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import calibration
from qjax.core import tree
from qjax.methods.activations.quantizers import ActQuantConfig
from qjax.core.errors import InputError
from qjax.methods.weights import zeroquant as zq
from qjax.core.formats.qarray import QArray
from qjax.io.hf import load_model


def _deepspeed(rows: np.ndarray, bits: int) -> np.ndarray:
  """DeepSpeed ``SymQuantizer`` on each row of ``rows [G, g]`` (float32)."""
  s = np.float32(2) * np.abs(rows).max(axis=1, keepdims=True) / np.float32(2**bits)
  return np.clip(np.round(rows / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s


def _closed_form(w: np.ndarray, bits: int, g: int) -> np.ndarray:
  """Groups of ``g`` consecutive columns inside each row, the last one partial."""
  g = w.shape[1] if g == -1 else g
  out = np.empty_like(w)
  for r in range(w.shape[0]):
    for j in range(0, w.shape[1], g):
      out[r, j:j + g] = _deepspeed(w[r:r + 1, j:j + g], bits)[0]
  return out


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16])
def test_weight_quantizer_is_the_deepspeed_formula_per_row_group(bits, group_size):
  w = np.random.default_rng(bits).standard_normal((5, 40)).astype(np.float32)  # g16: last group has 8 columns
  q = zq.quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, scale_dtype="float32")
  assert isinstance(q, QArray) and q.sym and q.bits == bits and q.scale.shape == (5, 1 if group_size == -1 else 3)
  np.testing.assert_array_equal(np.asarray(q.dequantize()), _closed_form(w, bits, group_size))
  codes = np.asarray(q.unpacked_codes())
  assert codes.min() >= 0 and codes.max() <= 2**bits - 1 and codes.min() == 0  # the -absmax entry is code 0


def test_groups_never_straddle_rows():
  w = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
  w[0, 5] = 100.0                                   # the reference's group [w0,4 w0,5 w1,0 w1,1] would hold it
  q = np.asarray(zq.quantize_weight(jnp.asarray(w), bits=4, group_size=4, scale_dtype="float32").dequantize())
  for r in range(4):
    alone = zq.quantize_weight(jnp.asarray(w[r:r + 1]), bits=4, group_size=4, scale_dtype="float32")
    np.testing.assert_array_equal(q[r], np.asarray(alone.dequantize())[0])
  flattened = _deepspeed(w.reshape(-1, 4), 4).reshape(w.shape)   # DeepSpeed's reshape(num_groups, -1)
  assert not np.allclose(flattened[1], q[1])
  np.testing.assert_array_equal(q, _closed_form(w, 4, 4))


def test_zero_group_and_fake_quantizer_with_identity_gradient():
  w = jax.random.normal(jax.random.PRNGKey(0), (6, 20)).at[2, :8].set(0.0)
  for scale_dtype in ("float16", "float32"):
    q = zq.quantize_weight(w, bits=4, group_size=8, scale_dtype=scale_dtype)
    fake = zq.fake_quantize_weight(w, bits=4, group_size=8, scale_dtype=scale_dtype)
    np.testing.assert_array_equal(np.asarray(fake), np.asarray(q.dequantize()))
    assert np.all(np.asarray(fake[2, :8]) == 0)     # absmax 0: zero codes, no NaN
  c = jax.random.normal(jax.random.PRNGKey(1), w.shape)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(zq.fake_quantize_weight(v, bits=3) * c)))(w)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(c))


def test_config():
  assert zq.ZeroQuantConfig().act_config() == ActQuantConfig(bits=8, sym=True, group_size=-1,
                                                            attention_matmuls=False, scheme="absmax")
  assert not zq.ZeroQuantConfig(abits=16).act_config().enabled
  for bad in (dict(bits_mlp=1), dict(bits_attn=9), dict(abits=12), dict(group_size=0), dict(lkd_steps=0),
              dict(lkd_lr=0.0), dict(lkd_batch=0)):
    with pytest.raises(InputError):
      zq.ZeroQuantConfig(**bad)
  assert zq.ZeroQuantConfig(lkd=True, lkd_layers=(0, -1)).distilled(5) == {0, 4}
  assert zq.ZeroQuantConfig(lkd=True).distilled(3) == {0, 1, 2}
  assert zq.ZeroQuantConfig(lkd_layers=(1,)).distilled(3) == set()
  with pytest.raises(InputError, match="out of range"):
    zq.ZeroQuantConfig(lkd=True, lkd_layers=(5,)).distilled(5)


@pytest.mark.parametrize("fixture,attn,mlp", [("llama_dir", ("q_proj", "k_proj", "v_proj", "o_proj"),
                                                ("gate_proj", "up_proj", "down_proj")),
                                               ("opt_dir", ("q_proj", "k_proj", "v_proj", "out_proj"),
                                                ("fc1", "fc2"))])
def test_mixed_precision_by_module(request, fixture, attn, mlp):
  model, params = load_model(request.getfixturevalue(fixture))
  q = zq.quantize(params, zq.ZeroQuantConfig(), model=model, progress=False)[0]
  flat, qflat = tree.flatten(params), tree.flatten(q)
  bits = {p.split("/")[-2]: v.bits for p, v in qflat.items() if isinstance(v, QArray)}
  assert len([v for v in qflat.values() if isinstance(v, QArray)]) == (len(attn) + len(mlp)) * 2
  assert bits == {**{n: 8 for n in attn}, **{n: 4 for n in mlp}}
  for p, v in qflat.items():
    if not isinstance(v, QArray):
      assert v is flat[p]
  ids = np.arange(12, dtype=np.int32)[None] % model.config.vocab_size
  logits = model.with_hooks(zq.ZeroQuantConfig().act_config().hooks()).apply(q, ids)[0]
  assert np.all(np.isfinite(np.asarray(logits)))
  with pytest.raises(InputError, match="calibration"):
    zq.quantize(params, zq.ZeroQuantConfig(lkd=True), model=model)
  with pytest.raises(InputError, match="already quantized"):
    zq.quantize(q, {p: zq.ZeroQuantConfig() for p in tree.matching(q, zq.ZeroQuantConfig().targets)},
                calibration=calibration.Calibration(model, _windows(model, 2, 8)))


def _windows(model, n, seqlen, seed=0):
  return np.random.default_rng(seed).integers(3, model.config.vocab_size, (n, seqlen)).astype(np.int32)


LKD = dict(lkd=True, lkd_steps=40, lkd_lr=1e-4, lkd_batch=4)


@pytest.fixture(scope="module")
def stories(stories_dir):
  model, params = load_model(stories_dir)
  calib = calibration.Calibration(model, _windows(model, 8, 32))
  q, report = zq.quantize(params, zq.ZeroQuantConfig(**LKD), calibration=calib, progress=False)
  return model, params, calib, q, report


def test_lkd_lowers_every_layer_output_mse(stories):
  model, params, calib, q, report = stories
  assert len(report.layers) == model.config.num_layers
  for layer in report.layers:
    assert layer.linear_losses["mse_after"] < 0.9 * layer.linear_losses["mse_before"], layer
  plain, plain_report = zq.quantize(params, zq.ZeroQuantConfig(), calibration=calib, progress=False)
  ref = zq.quantize(params, zq.ZeroQuantConfig(), model=model, progress=False)[0]
  assert [r.linear_losses["mse"] for r in plain_report.layers] == [r.linear_losses["mse_before"]
                                                                  for r in report.layers]
  _assert_same(plain, ref)


def _assert_same(a, b, paths=None):
  fa, fb = tree.flatten(a), tree.flatten(b)
  for p in paths or fa:
    for x, y in zip(jax.tree_util.tree_leaves(fa[p]), jax.tree_util.tree_leaves(fb[p]), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lkd_is_deterministic_and_per_layer(stories):
  """Same seed -> identical result; a layer's LKD depends only on its teacher inputs and the seed."""
  model, params, calib, q, _ = stories
  fam = model.family
  sub, report = zq.quantize(params, zq.ZeroQuantConfig(**LKD, lkd_layers=(1, -1)), calibration=calib,
                                        progress=False)
  assert set(report.layers[1].linear_losses) == {"mse_before", "mse_after"}
  assert set(report.layers[0].linear_losses) == {"mse"}
  last = model.config.num_layers - 1
  for i in (1, last):
    _assert_same(sub, q, [p for p in tree.flatten(q) if p.startswith(fam.layer_path(i) + "/")])
  plain = zq.quantize(params, zq.ZeroQuantConfig(), model=model, progress=False)[0]
  _assert_same(sub, plain, [p for p in tree.flatten(q) if p.startswith(fam.layer_path(0) + "/")])
  other, _ = zq.quantize(params, zq.ZeroQuantConfig(**LKD, lkd_layers=(1,), seed=1), calibration=calib,
                                     progress=False)
  p = f"{fam.layer_path(1)}/mlp/up_proj/weight"
  assert not np.array_equal(np.asarray(tree.flatten(other)[p].codes), np.asarray(tree.flatten(q)[p].codes))


def test_student_is_causal(stories):
  """B1 fixed: the student's output at position t does not depend on inputs after t."""
  model, params, *_ = stories
  prefix = model.family.layer_path(0)
  layer = tree.unflatten({p[len(prefix) + 1:]: v for p, v in tree.flatten(params).items()
                          if p.startswith(prefix + "/")})
  cfg = zq.ZeroQuantConfig()
  student = model.with_hooks(cfg.act_config().hooks())
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, model.config.hidden_size))
  x2 = x.at[:, 9:].set(jax.random.normal(jax.random.PRNGKey(1), (2, 7, model.config.hidden_size)))
  run = lambda v: np.asarray(zq.student_outputs(student, layer, v, bits=cfg.layer_bits(model, prefix),
                                                group_size=-1, scale_dtype="float16"))
  a, b = run(x), run(x2)
  np.testing.assert_array_equal(a[:, :9], b[:, :9])
  assert not np.allclose(a[:, 9:], b[:, 9:])


def test_lkd_on_opt_in_bfloat16(opt_dir):
  """OPT in bfloat16: LKD trains in float32 (B2 fixed) and returns the checkpoint's dtypes."""
  model, params = load_model(opt_dir, dtype="bfloat16")
  calib = calibration.Calibration(model, _windows(model, 8, 16))
  q, report = zq.quantize(params, zq.ZeroQuantConfig(**LKD, lkd_layers=(-1,)), calibration=calib, progress=False)
  losses = report.layers[-1].linear_losses
  assert losses["mse_after"] < losses["mse_before"]
  flat = tree.flatten(q)
  assert sum(isinstance(v, QArray) for v in flat.values()) == 12
  assert {v.dtype if isinstance(v, QArray) else v.dtype.name for v in flat.values()} == {"bfloat16"}
