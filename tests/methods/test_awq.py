"""AWQ: the Hessian error identity, scale search no worse than RTN, clipping never worse per group, function-
preserving folds of every scaling group, and model-level runs on LLaMA and OPT."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import hf_reference
from synthetic import problem
from qjax import calibration
from qjax.methods import scaling
from qjax.core import tree
from qjax.core.errors import InputError
from qjax.methods.weights import awq, rtn
from qjax.models import CausalLM
from qjax.core.formats.qarray import QArray
from qjax.io.hf import load_model


def salient_problem(seed, out=32, n=96, tokens=400):
  """``problem`` with 4 input channels 20x larger (AWQ's salient channels)."""
  w, x, _ = problem(seed, out, n, tokens)
  x[:, np.random.default_rng(seed).choice(n, 4, replace=False)] *= 20.0
  return w, x, (2 * x.T @ x / tokens).astype(np.float32)


def explicit_error(x, d):
  """``||X D^T||_F^2`` in float64."""
  return float(np.sum((x.astype(np.float64) @ np.asarray(d, np.float64).T) ** 2))


def test_hessian_error_equals_explicit():
  w, x, h = problem(0)
  d = np.random.default_rng(1).normal(size=w.shape).astype(np.float32)
  ours = float(awq.output_error(jnp.asarray(d), jnp.asarray(h))) * x.shape[0] / 2
  assert ours == pytest.approx(explicit_error(x, d), rel=1e-4)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([3, 4]), group_size=st.sampled_from([-1, 32]),
       sym=st.booleans())
def test_scale_search_beats_rtn_on_salient_channels(seed, bits, group_size, sym):
  w, x, h = salient_problem(seed)
  q = dict(bits=bits, group_size=group_size, sym=sym)
  found = awq.search_scale(jnp.asarray(w), jnp.asarray(h), jnp.asarray(np.mean(np.abs(x), 0)), n_grid=20, **q)
  s = np.asarray(found.scales)
  assert np.all(s > 0) and np.max(s) * np.min(s) == pytest.approx(1.0, rel=1e-5)
  plain = np.asarray(rtn.quantize_weight(jnp.asarray(w), scale_dtype="float32", **q).dequantize())
  scaled = np.asarray(awq.fake_quantize(jnp.asarray(w * s), **q)) / s
  base, err = explicit_error(x, plain - w), explicit_error(x, scaled - w)
  # E(0) is plain RTN; the Hessian objective is the explicit output error; salient channels make alpha > 0 pay
  assert float(found.errors[0]) * x.shape[0] / 2 == pytest.approx(base, rel=1e-3)
  assert float(np.min(found.errors)) * x.shape[0] / 2 == pytest.approx(err, rel=1e-3)
  assert float(found.alpha) > 0 and err < base


@pytest.mark.parametrize("bits,group_size,sym", [(3, 40, False), (4, 32, True), (3, -1, False)])
def test_clipping_never_increases_a_group_error(bits, group_size, sym):
  w, x, h = problem(2, n=96)   # g40: a partial last group of 16 columns
  q = dict(bits=bits, group_size=group_size, sym=sym)
  found = awq.search_clip(jnp.asarray(w), jnp.asarray(h), clip_grid=20, max_shrink=0.5, **q)
  g = group_size if group_size > 0 else w.shape[1]

  def group_errors(wq):   # [out, G]: each group's partial dot product error, explicitly over the tokens
    return np.stack([np.sum((x[:, j:j + g].astype(np.float64) @ (wq - w)[:, j:j + g].T) ** 2, axis=0)
                     for j in range(0, w.shape[1], g)], axis=1)

  unclipped = group_errors(np.asarray(awq.fake_quantize(jnp.asarray(w), **q)))
  clipped = group_errors(np.asarray(awq.fake_quantize(found.weight, **q)))
  assert np.allclose(np.asarray(found.errors[0]) * x.shape[0] / 2, unclipped, rtol=1e-3, atol=1e-3)
  assert np.all(clipped <= unclipped * (1 + 1e-4) + 1e-4)
  assert clipped.sum() < unclipped.sum() and np.any(np.asarray(found.ratio) < 1)
  assert np.all(np.abs(np.asarray(found.weight)) <= np.abs(w) + 1e-7)


@pytest.fixture(scope="module")
def mha_llama_dir(tmp_path_factory):
  """LLaMA without GQA, so that ``v -> o`` is a scaling group (``llama_dir`` has GQA)."""
  return hf_reference.make_llama_checkpoint(tmp_path_factory.mktemp("mha"), num_key_value_heads=4,
                                            num_hidden_layers=1)


CONFIG = awq.AWQConfig(bits=4, group_size=32)


def calib_for(model, n=4, t=24):
  return calibration.Calibration(model, np.random.default_rng(0).integers(0, model.config.vocab_size, (n, t)),
                                 layer_report=True)


def rel_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize("fixture,groups", [
    ("mha_llama_dir", ["input_layernorm", "self_attn/v_proj", "post_attention_layernorm", "mlp/up_proj"]),
    ("opt_dir", ["self_attn_layer_norm", "self_attn/v_proj", "final_layer_norm", "fc1"])])
def test_folds_are_function_preserving(request, fixture, groups):
  """Random positive scales folded into every scaling group of every layer, then the searched AWQ scales (the
  float half of AWQ), leave the float32 logits unchanged."""
  model, params = load_model(request.getfixturevalue(fixture))
  assert [g.prev for g in awq.scale_groups(model)] == groups
  apply = jax.jit(model.apply)
  ids = np.arange(20, dtype=np.int32)[None] % model.config.vocab_size
  ref = apply(params, ids)[0]
  rng = np.random.default_rng(0)

  def fold_random(_, layer):
    for g in awq.scale_groups(model):
      s = np.exp(rng.normal(size=tree.flatten(layer)[f"{g.paths[0]}/weight"].shape[1])).astype(np.float32)
      layer = (scaling.fold_into_norm(layer, model.family, g.prev, s) if g.into_norm
               else scaling.fold_between_linears(layer, g.prev, g.paths[0], s))
    return layer

  folded = scaling.map_layers(params, model.family, model.config.num_layers, fold_random)
  assert rel_diff(apply(folded, ids)[0], ref) < 1e-5

  alphas = []

  def scale_only(i, prefix, layer, x):
    layer, _, a = awq.scale_layer(model, CONFIG, prefix, layer, x)
    alphas.extend(a.values())
    return layer, {}

  scaled, _ = calibration.walk_layers(params, calib_for(model), scale_only, propagate="fp", progress=False)
  assert any(a > 0 for a in alphas)
  assert rel_diff(apply(scaled, ids)[0], ref) < 1e-5


def test_unfoldable_groups_are_skipped(llama_dir, opt_dir):
  llama, _ = load_model(llama_dir)
  opt, _ = load_model(opt_dir)
  gelu = CausalLM(dataclasses.replace(opt.config, hidden_act="gelu"))
  assert "self_attn/v_proj" not in [g.prev for g in awq.scale_groups(llama)]    # GQA
  assert "fc1" not in [g.prev for g in awq.scale_groups(gelu)]


@pytest.mark.parametrize("fixture", ["llama_dir", "opt_dir"])
def test_model_level(request, fixture):
  model, params = load_model(request.getfixturevalue(fixture))
  q, report = awq.quantize(params, CONFIG, calibration=calib_for(model), progress=False)
  flat = tree.flatten(q)
  quantized = [p for p, v in flat.items() if isinstance(v, QArray)]
  assert len(quantized) == len(model.family.linears) * model.config.num_layers
  groups = awq.scale_groups(model)
  for layer in report.layers:
    assert 0 < layer.output_rel_error < 1
    errors = {k: v for k, v in layer.linear_losses.items() if not k.startswith("alpha/")}
    assert sorted(errors) == sorted(p for _, p in model.family.linears)
    assert all(0 < v < 1 for v in errors.values())
    assert sorted(k for k in layer.linear_losses if k.startswith("alpha/")) == sorted(f"alpha/{g.prev}"
                                                                                     for g in groups)


def test_targets_select_the_quantized_linears(opt_dir):
  """Only fc2 targeted: only the ``fc1 -> fc2`` group is searched and only fc2 is quantized."""
  model, params = load_model(opt_dir)
  cfg = dataclasses.replace(CONFIG, targets=(r".*/fc2/weight",))
  q, report = awq.quantize(params, cfg, calibration=calib_for(model), progress=False)
  assert sorted(p for p, v in tree.flatten(q).items() if isinstance(v, QArray)) == [
      f"{model.family.layer_path(i)}/fc2/weight" for i in range(model.config.num_layers)]
  assert all(sorted(l.linear_losses) == ["alpha/fc1", "fc2"] for l in report.layers)


def test_rejects_post_ln_and_bad_config(opt_dir):
  model, params = load_model(opt_dir)
  post_ln = CausalLM(dataclasses.replace(model.config, do_layer_norm_before=False))
  with pytest.raises(InputError, match="post-LN"):
    awq.quantize(params, awq.AWQConfig(), calibration=calib_for(post_ln), progress=False)
  with pytest.raises(InputError):
    awq.AWQConfig(n_grid=0)
  with pytest.raises(InputError):
    awq.AWQConfig(max_shrink=0.01)
