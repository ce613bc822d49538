"""KVQuant calibration: per layer, keys and values of the float model at sampled positions (optionally Fisher-
weighted), fitted into thresholds and codebooks."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax.methods.kv.kvquant.codec import KVQuantCalibration, KVQuantLayer, _normalize_values, _safe_div
from qjax.methods.kv.kvquant.config import KVQuantConfig
from qjax.methods.kv.kvquant.kmeans import kmeans_1d, kmeans_objective
from qjax.models import capture


def sample_positions(n: int, seqlen: int, config: KVQuantConfig, seed: int = 0) -> np.ndarray:
  """Token positions ``[n, m]`` int32 used from each calibration window: all of ``first_fp .. seqlen - 1`` when
  ``n * (seqlen - first_fp) <= max_calib_tokens``, else ``m = ceil(max_calib_tokens / n)`` of them drawn without
  replacement (``default_rng(seed)``, the run's seed), sorted."""
  lo = min(config.first_fp, seqlen - 1)
  avail = seqlen - lo
  m = min(avail, -(-config.max_calib_tokens // n))
  if m == avail:
    return np.broadcast_to(np.arange(lo, seqlen, dtype=np.int32), (n, m)).copy()
  rng = np.random.default_rng(seed)
  return np.stack([np.sort(rng.choice(avail, m, replace=False)) + lo for _ in range(n)]).astype(np.int32)


def _kv_paths(model) -> tuple[str, str]:
  fam = model.family
  return fam.linear_path("k"), fam.linear_path("v")


@functools.partial(jax.jit, static_argnums=0)
def collect_kv(model, layer_params, x, positions_used):
  """Pre-RoPE keys and values (the k_proj / v_proj outputs) of one decoder layer at the token positions
  ``positions_used [n, m]`` of each window of ``x [n, T, hidden]`` -> ``(K, V)`` float32 ``[n * m, C]`` (a scan
  over the windows)."""
  kp, vp = _kv_paths(model)

  def body(_, xs):
    xi, used = xs
    got = capture.capture_linears(model, layer_params, xi, (kp, vp), outputs=True)
    return None, (got[kp][used].astype(jnp.float32), got[vp][used].astype(jnp.float32))

  _, (k, v) = jax.lax.scan(body, None, (x, positions_used))
  return k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])


@functools.partial(jax.jit, static_argnums=0)
def fisher_information(model, params, windows, positions_used):
  """Fisher weights ``(dL/dK)^2, (dL/dV)^2`` of every layer's pre-RoPE keys and values, ``L`` the window's mean
  next-token NLL: ``{layer i: (FK, FV [n * m, C])}`` float32 at ``positions_used [n, m]`` of ``windows [n, T]``.
  One forward and backward pass per window (a scan); holds ``2 * num_layers * n * m * C`` floats."""
  fam = model.family
  kp, vp = _kv_paths(model)
  names = [f"{fam.layer_path(i)}/{p}" for i in range(model.config.num_layers) for p in (kp, vp)]
  c = model.config.num_kv_heads * model.config.head_dim
  t = windows.shape[1]

  def body(_, xs):
    ids, used = xs

    def loss(deltas):
      def add(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        return y + deltas[name].astype(y.dtype) if context.method_name == "__call__" and name in deltas else y

      with nn.intercept_methods(add):
        logits, _ = model.apply(params, ids[None])
      logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
      return -jnp.mean(jnp.take_along_axis(logp, ids[1:, None], axis=-1))

    g = jax.grad(loss)({n: jnp.zeros((1, t, c), jnp.float32) for n in names})
    return None, {n: g[n][0, used] ** 2 for n in names}

  _, out = jax.lax.scan(body, None, (windows, positions_used))
  out = {n: o.reshape(-1, c) for n, o in out.items()}
  return {i: (out[f"{fam.layer_path(i)}/{kp}"], out[f"{fam.layer_path(i)}/{vp}"])
          for i in range(model.config.num_layers)}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def fit_layer(config: KVQuantConfig, heads: int, head_dim: int, k, v, wk, wv):
  """One layer's calibration from ``k, v [N, C]`` float32 (pre-RoPE keys, values) and k-means weights ``wk, wv
  [N, C]`` -> ``(k_lower, k_upper [heads, head_dim], k_codebook, v_codebook [2**bits], stats)``.

  Key thresholds are the per-channel percentiles ``f/2`` and ``1 - f/2`` (linear interpolation, as numpy); the
  key codebook is fitted on the normalized non-outlier keys, the value codebook on the values normalized per
  token as :func:`quantize_values` does. ``stats``: the key outlier fraction, the fraction of key outliers
  beyond the per-token capacity, the value outlier fraction and the k-means objective (per weighted sample) of
  each codebook before and after the iterations.
  """
  f, c = config.outlier_fraction, heads * head_dim
  lower = jnp.percentile(k, 100 * f / 2, axis=0)
  upper = jnp.percentile(k, 100 * (1 - f / 2), axis=0)
  zk = _safe_div(k - (upper + lower) / 2, (upper - lower) / 2)
  k_out = (k > upper) | (k < lower)
  cap = config.key_outlier_capacity(c)
  n_out = jnp.sum(k_out, axis=-1)
  overflow = jnp.sum(jnp.maximum(n_out - cap, 0)) / jnp.maximum(jnp.sum(n_out), 1)
  zv, v_out = _normalize_values(v, config.value_outliers(c), jnp.float32)[:2]
  books, stats = [], {"key outlier fraction": jnp.mean(k_out), "key outliers beyond capacity": overflow,
                      "value outlier fraction": jnp.mean(v_out)}
  for name, z, out, w in (("key", zk, k_out, wk), ("value", zv, v_out, wv)):
    x, w = z.reshape(-1), (w * ~out).reshape(-1)
    w = w / jnp.maximum(jnp.mean(w), 1e-30)
    if config.nuq:
      init = kmeans_1d(x, w, k=2**config.bits, iters=0)
      book = kmeans_1d(x, w, k=2**config.bits, iters=config.kmeans_iters)
      stats[f"{name} k-means objective init"] = kmeans_objective(x, w, init) / jnp.sum(w)
    else:
      book = jnp.linspace(-1.0, 1.0, 2**config.bits, dtype=jnp.float32)
    stats[f"{name} k-means objective"] = kmeans_objective(x, w, book) / jnp.sum(w)
    books.append(book)
  return lower.reshape(heads, head_dim), upper.reshape(heads, head_dim), books[0], books[1], stats


def calibrate(params, config: KVQuantConfig, calibration, progress: bool = True, seed: int = 0):
  """``(KVQuantCalibration, CalibrationReport)`` of the model on ``calibration`` (a
  :class:`qjax.calibration.Calibration`): layer by layer on the float model (its ``walk`` with
  ``propagate="fp"``; the parameters are not changed), keys and values collected at :func:`sample_positions`
  of every window and fitted by :func:`fit_layer`; each layer's report has its ``stats``."""
  model = calibration.model
  n, t = calibration.windows.shape
  used = jnp.asarray(sample_positions(n, t, config, seed))
  fisher = (fisher_information(model, params, jnp.asarray(calibration.windows, jnp.int32), used)
            if config.fisher else None)
  heads, d = model.config.num_kv_heads, model.config.head_dim
  fitted = []

  def process(i, prefix, layer, x):
    k, v = collect_kv(model, layer, x, used)
    wk, wv = fisher[i] if fisher is not None else (jnp.ones_like(k), jnp.ones_like(v))
    lower, upper, kb, vb, stats = fit_layer(config, heads, d, k, v, wk, wv)
    c = heads * d
    fitted.append(KVQuantLayer(np.asarray(lower), np.asarray(upper), np.asarray(kb), np.asarray(vb),
                               config.key_outlier_capacity(c), config.value_outliers(c)))
    return layer, {name: float(val) for name, val in stats.items()}

  _, report = calibration.walk(params, process, propagate="fp", progress=progress, desc=f"KVQuant {config.bits}-bit")
  return KVQuantCalibration(config, tuple(fitted)), report
