"""QAT fake quantizers: the LSQ gradients against their closed form, the clipped STE, and that a trained quantizer
converts to the QArray it simulated bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.core.formats.qarray import QArray
from qjax.methods.qat import fake_quant as fq
from qjax.methods.weights import rtn


def _w(seed=0, shape=(6, 40)):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


@pytest.mark.parametrize("bits,group_size", [(4, -1), (3, 16), (2, 8)])
def test_lsq_step_gradient_equals_the_closed_form(bits, group_size):
  w = _w(1)
  step, _ = fq.lsq_init(w, bits, group_size=group_size)
  step = step * 0.6       # a small step: some values fall outside [Q_n, Q_p] and take the clipped branch
  g_out = jax.random.normal(jax.random.PRNGKey(2), w.shape)
  f = lambda s: jnp.sum(fq.lsq_fake(w, s, bits, group_size=group_size) * g_out)
  got = np.asarray(jax.grad(f)(step))
  # LSQ eq. 3 per element, summed over the values sharing a step, times g = 1 / sqrt(N Q_p)
  qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  wn, s, go = np.asarray(w, np.float64), np.asarray(step, np.float64), np.asarray(g_out, np.float64)
  n = w.shape[1] if group_size == -1 else group_size
  s_col = np.repeat(s, n, axis=1)[:, :w.shape[1]]
  v = wn / s_col
  d = np.where(v <= qn, qn, np.where(v >= qp, qp, np.round(v) - v))
  assert np.any(v <= qn) or np.any(v >= qp)
  per = d * go
  groups = np.add.reduceat(per, np.arange(0, w.shape[1], n), axis=1)
  want = groups / np.sqrt(n * qp)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_lsq_input_gradient_is_one_inside_and_zero_outside():
  w = _w(3)
  step, _ = fq.lsq_init(w, 3)
  step = step * 0.5
  gw = np.asarray(jax.grad(lambda w: jnp.sum(fq.lsq_fake(w, step, 3)))(w))
  v = np.asarray(w) / np.asarray(step)
  inside = (v > -4) & (v < 3)
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(gw, inside.astype(np.float32))


def test_uniform_fake_has_the_clipped_ste():
  x = jnp.linspace(-3.0, 3.0, 61)
  scale, zero = jnp.float32(0.25), jnp.float32(4.0)        # grid [-1, 2.75]: the clip acts outside
  g = np.asarray(jax.grad(lambda x: jnp.sum(fq.uniform_fake(x, scale, zero, jnp.float32(15))))(x))
  r = np.round(np.asarray(x) / 0.25) + 4
  np.testing.assert_array_equal(g, ((r >= 0) & (r <= 15)).astype(np.float32))
  assert 0 < g.sum() < g.size


@pytest.mark.parametrize("sym,group_size", [(False, -1), (True, 16), (False, 12)])
def test_minmax_fake_is_rtn_and_its_ste_is_the_identity(sym, group_size):
  w = _w(4)
  fake = fq.minmax_fake(w, 4, sym=sym, group_size=group_size)
  q = rtn.quantize_weight(w, bits=4, group_size=group_size, sym=sym, scale_dtype="float32")
  np.testing.assert_array_equal(np.asarray(fake), np.asarray(q.dequantize()))
  c = jax.random.normal(jax.random.PRNGKey(8), w.shape)
  g = jax.grad(lambda w: jnp.sum(fq.minmax_fake(w, 4, sym=sym, group_size=group_size) * c))(w)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(c))      # the range holds every value: STE = identity


@pytest.mark.parametrize("sym", [True, False])
def test_a_trained_lsq_quantizer_converts_to_its_qarray_exactly(sym):
  w = _w(5, (5, 48))
  step, zero = fq.lsq_init(w, 4, group_size=16, sym=sym)
  key = jax.random.PRNGKey(6)
  step = step * jax.random.uniform(key, step.shape, minval=0.7, maxval=1.3)    # "trained": off the MinMax fit
  if zero is not None:
    zero = zero + jax.random.uniform(key, zero.shape, minval=-0.8, maxval=0.8)
  fake = fq.lsq_fake(w, step, 4, group_size=16, zero=zero)
  codes, scale, z = fq.lsq_codes(w, step, 4, group_size=16, zero=zero)
  q = QArray.from_codes(codes, scale, z, bits=4, group_size=16, sym=sym, scale_dtype="float32")
  np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(fake))


def test_lsq_starts_at_rtn():
  w = _w(7)
  step, _ = fq.lsq_init(w, 4, group_size=8)
  rt = rtn.quantize_weight(w, bits=4, group_size=8, sym=True, scale_dtype="float32").dequantize()
  np.testing.assert_array_equal(np.asarray(fq.lsq_fake(w, step, 4, group_size=8)), np.asarray(rt))


def test_grad_scale_keeps_the_value_and_scales_the_gradient():
  x = jnp.float32(0.1234567)
  assert fq.grad_scale(x, 0.37) == x
  assert np.isclose(float(jax.grad(lambda x: fq.grad_scale(x, 0.37) * 2.0)(x)), 0.74)
