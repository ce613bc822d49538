"""GPTQ: properties (output error below RTN, act-order no worse), equality with a torch implementation of the
reference algorithm, determinism, dead columns, damping retry, compile size, and model-level runs."""
import functools
import itertools
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import hf_reference
from synthetic import output_error, problem
from qjax import calibration
from qjax.core import tree
from qjax.methods.weights import gptq, rtn
from qjax.core.formats.qarray import QArray
from qjax.io.hf import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
from torch_gptq import gptq as torch_gptq  # noqa: E402


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4]), group_size=st.sampled_from([-1, 16, 32]),
       sym=st.booleans(), block_size=st.sampled_from([32, 128]))
def test_output_error_below_rtn_and_act_order_no_worse(seed, bits, group_size, sym, block_size):
  w, x, h = problem(seed)
  kw = dict(bits=bits, group_size=group_size, sym=sym, block_size=block_size, scale_dtype="float32")
  natural = gptq.quantize_weight(jnp.asarray(w), jnp.asarray(h), **kw).qarray.dequantize()
  ordered = gptq.quantize_weight(jnp.asarray(w), jnp.asarray(h), act_order=True, **kw).qarray.dequantize()
  base = rtn.quantize_weight(jnp.asarray(w), bits=bits, group_size=group_size, sym=sym).dequantize()
  assert output_error(x, w, natural) < output_error(x, w, base)
  assert output_error(x, w, ordered) <= output_error(x, w, natural) * 1.0001


@pytest.mark.parametrize("bits,group_size,sym,act_order,static", [
    (4, -1, False, False, False), (3, -1, True, True, False), (4, 128, False, False, False),
    (3, 32, False, False, False), (4, 32, False, True, False), (3, 32, False, True, True),
    (2, 64, True, False, True), (4, 192, False, False, False), (3, 48, False, True, False)])
def test_equals_torch_reference(bits, group_size, sym, act_order, static):
  """qjax reproduces the reference algorithm, including groups that start inside a block (quirk Q2)."""
  w, x, h = problem(1, out=48, n=256, tokens=600)
  w[:, 7] = 0.0
  h[7, :], h[:, 7] = 0.0, 0.0   # a dead column
  q = gptq.quantize_weight(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=group_size, sym=sym,
                           act_order=act_order, static_groups=static, scale_dtype="float32")
  ref, ref_loss = torch_gptq(torch.tensor(w), torch.tensor(h), bits=bits, group_size=group_size, sym=sym,
                             act_order=act_order, static_groups=static)
  ours = np.asarray(q.qarray.dequantize())
  # equal up to float summation order (ulp-level scale differences) and at most rare code flips at exact ties
  assert np.mean(np.abs(ours - ref.numpy()) > 1e-4) < 1e-3
  assert abs(output_error(x, w, ours) / output_error(x, w, ref.numpy()) - 1) < 1e-4
  assert abs(q.losses.sum() / ref_loss - 1) < 1e-3
  assert np.all(ours[:, 7] == 0)
  assert (q.qarray.perm is not None) == (act_order and not static and group_size > 0)


def test_deterministic_bit_identical():
  w, _, h = problem(3)
  a = gptq.quantize_weight(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=32, act_order=True).qarray
  b = gptq.quantize_weight(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=32, act_order=True).qarray
  for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


def test_cholesky_failure_retries_with_more_damping():
  w, _, _ = problem(4, n=32)
  h = np.eye(32, dtype=np.float32)
  h[5, 5] = -0.5  # indefinite: damping 0.01 and 0.1 of mean(diag) are not enough, 1.0 is
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r = gptq.quantize_weight(jnp.asarray(w), jnp.asarray(h), bits=4)
  assert r.percdamp == pytest.approx(1.0) and len(caught) == 2
  assert np.all(np.isfinite(np.asarray(r.qarray.dequantize())))


def test_trace_size_does_not_grow_with_columns():
  def eqns(n):
    w, h = jnp.zeros((8, n)), jnp.eye(n)
    fac = functools.partial(gptq._factorize.__wrapped__, act_order=True, block_size=64)
    f = functools.partial(gptq._gptq.__wrapped__, bits=4, group_size=32, sym=False, act_order=True,
                          static_groups=False, block_size=64)
    (perm, dead, u), _ = fac(h, 0.01)
    return len(jax.make_jaxpr(fac)(h, 0.01).eqns), len(jax.make_jaxpr(f)(w, perm, dead, u).eqns)
  assert eqns(512) == eqns(4096)


def test_shared_factor_is_bit_identical_to_own():
  """q/k/v share one factorization of their common Hessian: same codes, scales and losses as factorizing per
  linear."""
  w, _, h = problem(5)
  kw = dict(bits=3, group_size=32, act_order=True)
  fac = gptq.factorize(jnp.asarray(h), act_order=True)
  for rows in (w, w[:7]):
    own = gptq.quantize_weight(jnp.asarray(rows), jnp.asarray(h), **kw)
    shared = gptq.quantize_weight(jnp.asarray(rows), factor=fac, **kw)
    for la, lb in zip(jax.tree_util.tree_leaves(own.qarray), jax.tree_util.tree_leaves(shared.qarray)):
      np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    np.testing.assert_array_equal(own.losses, shared.losses)


def test_rejects_static_groups_without_groups():
  with pytest.raises(Exception, match="group"):
    gptq.GPTQConfig(static_groups=True)


FLAGS = [dict(zip(("group_size", "sym", "act_order", "static_groups", "true_sequential"), c))
         for c in itertools.product((-1, 32), (False, True), (False, True), (False, True), (False, True))
         if not (c[3] and c[0] == -1)]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_model_level_every_flag_combination(tmp_path, family):
  """Every flag combination (LLaMA; OPT a spread of them) on one-layer models whose linears are all 64 x 64, so
  each combination compiles the GPTQ core once."""
  if family == "llama":
    path = hf_reference.make_llama_checkpoint(tmp_path, num_hidden_layers=1, intermediate_size=64,
                                              num_key_value_heads=4)
  else:
    path = hf_reference.make_opt_checkpoint(tmp_path, num_hidden_layers=1, ffn_dim=64)
  model, params = load_model(path)
  windows = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 24)).astype(np.int32)
  calib = calibration.Calibration(model, windows, layer_report=True)
  ids = windows[:1]
  fp_logits = np.asarray(model.apply(params, ids)[0])
  for k, flags in enumerate(FLAGS if family == "llama" else FLAGS[::4]):  # OPT: a spread of 6 of the 24
    q, report = gptq.quantize(params, gptq.GPTQConfig(bits=4, **flags), calibration=calib, progress=False)
    if k == 0:  # without the layer report: no float-layer forward, no errors, the same result
      lean, lean_report = gptq.quantize(params, gptq.GPTQConfig(bits=4, **flags),
                                        calibration=calibration.Calibration(model, windows), progress=False)
      assert all(l.output_rel_error is None for l in lean_report.layers)
      assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                 zip(jax.tree.leaves(q), jax.tree.leaves(lean)))
    quantized = [v for v in tree.flatten(q).values() if isinstance(v, QArray)]
    assert len(quantized) == len(model.family.linears) * model.config.num_layers
    assert len(report.layers) == model.config.num_layers and all(l.output_rel_error > 0 for l in report.layers)
    logits = np.asarray(model.apply(q, ids)[0])
    assert np.all(np.isfinite(logits)) and not np.array_equal(logits, fp_logits)
