"""KVQuant (Hooper et al. 2024): non-uniform, dense-and-sparse quantization of the KV cache.

Keys are quantized BEFORE RoPE, per channel with static ranges calibrated offline; values per token with ranges
computed on the fly. Both map the normalized activation to the nearest entry of a per-layer codebook of
``2**bits`` centroids fitted by 1-D k-means on calibration data ("nuq"), and keep a small fraction of outliers
exactly in a sparse side structure. With ``C = kv_heads * head_dim`` channels per token:

Keys (static, per channel ``c``; thresholds from calibration percentiles, ``f = outlier_fraction``)::

    lower_c, upper_c = percentile_{100 f/2}(K[:, c]), percentile_{100 (1 - f/2)}(K[:, c])
    zero_c = (upper_c + lower_c) / 2 ;  range_c = (upper_c - lower_c) / 2 ;  z = (k - zero_c) / range_c
    outlier  <=>  k > upper_c  or  k < lower_c        (|z| > 1; kept exact, up to a fixed count per token)

Values (dynamic, per token over its ``C`` channels): the ``n_v`` largest and ``n_v`` smallest entries are the
outliers, ``n_v = C - ceil((1 - f/2)(C - 1))`` (the count of entries at or beyond the reference's linear-
interpolation quantiles ``q_{f/2}``, ``q_{1-f/2}`` when the entries are distinct); of the others::

    zero = (max + min) / 2 ;  range = (max - min) / 2 ;  z = (v - zero) / range

Codes and reconstruction, with the sorted codebook ``c_0 <= ... <= c_{K-1}`` and midpoints
``m_j = (c_j + c_{j+1}) / 2``::

    code = #{j : z > m_j}   (the nearest centroid; a tie goes to the lower one)
    x_hat = c_code * range + zero,  outliers replaced by their exact values

The codebooks minimize ``sum_i w_i (z_i - c_{code_i})^2`` over the calibration non-outliers (Lloyd's algorithm,
:func:`kmeans_1d`; ``w = 1``, or with ``fisher`` the Fisher information ``(dL/dx)^2`` of each activation, ``L``
the window's mean next-token NLL, from one backward pass per calibration window). With ``nuq=False`` the codebook
is the uniform grid ``linspace(-1, 1, 2**bits)`` (the reference's ``quant_fn_zp``).

The first ``first_fp`` tokens of every sequence BY ABSOLUTE POSITION (``positions < first_fp``) are kept exact
(attention sinks). The reference applies ``first_few_fp16`` to the first rows of each call instead, so every
decoded token stays unquantized (its bug B13); here position decides, in prefill, decode and single-pass runs.

Semantics of a quantized cache (:class:`KVQuantLayerCache`): every token is quantized when it is written, and
attention reads the cache, so a query sees every key/value (its own included) quantized except those at
positions ``< first_fp`` -- in prefill as in decode (the reference's ``prefill_with_quant=True``; its default
exact prefill makes single-pass perplexity equal to the fp model, bug B14). As a token's quantization depends on
no other token, a single forward pass with :func:`past_hook` computes exactly what token-by-token decoding
through the cache computes, which is how perplexity is evaluated.

Deliberate differences from the reference (qllm-infer ``lib/kvquant``, notes section 2.11):
  * calibration statistics exclude positions ``< first_fp`` (kept exact at inference) and use at most
    ``max_calib_tokens`` tokens per layer (a seeded subsample, bounding memory to
    ``2 * max_calib_tokens * C * 4`` bytes per layer, twice that with ``fisher``);
  * k-means is deterministic (quantile initialization, ``kmeans_iters`` Lloyd iterations) instead of
    scikit-learn's k-means++;
  * the value codebook is fitted on values normalized exactly as at inference (per-token outliers by rank, range
    from the remaining entries) rather than with per-token calibration percentiles;
  * value outliers are chosen by rank (exactly ``n_v`` per side; the reference's inclusive thresholds keep more
    on ties); key outliers are stored up to a fixed capacity per token (``ceil(m + key_capacity * sqrt(m))``,
    ``m = f C`` the mean count), those beyond it (largest ``|z|`` kept) are clamped to the codebook;
  * storage is real: packed codes, the values' per-token ``zero, range`` and the outliers' values in the cache
    dtype with their channel indices, the exact first tokens, and each slot's position (keys are stored before
    RoPE and rotated when read).
"""
from __future__ import annotations

import jax.numpy as jnp

from qjax.core.errors import InputError
from qjax.core.formats.kv import QuantizedKV
from qjax.methods.kv.kvquant.cache import KVQuantLayerCache, cache_factory, effective_bits, past_hook
from qjax.methods.kv.kvquant.calibrate import calibrate, collect_kv, fisher_information, fit_layer, sample_positions
from qjax.methods.kv.kvquant.codec import KVQuantCalibration, KVQuantLayer, quantize_keys, quantize_values
from qjax.methods.kv.kvquant.config import KVQuantConfig
from qjax.methods.kv.kvquant.kmeans import assign, kmeans_1d, kmeans_objective
from qjax.methods.registry import KVCacheSetup, register_kv_method

__all__ = ["KVQuantCalibration", "KVQuantConfig", "KVQuantLayer", "KVQuantLayerCache", "QuantizedKV", "assign",
           "cache_factory", "calibrate", "collect_kv", "effective_bits", "fisher_information", "fit_layer",
           "kmeans_1d", "kmeans_objective", "past_hook", "quantize_keys", "quantize_values", "sample_positions",
           "setup"]


@register_kv_method(KVQuantConfig, name="kvquant", needs_calibration=True)
def setup(model, float_params, config: KVQuantConfig, calibration=None, *, progress: bool = False,
          seed: int = 0) -> KVCacheSetup:
  """The registered KV protocol: ``calibration`` is a fitted :class:`KVQuantCalibration` to reuse (``config``
  then comes from it) or :class:`qjax.calibration.Calibration` windows to fit one on ``float_params``."""
  report = None
  if isinstance(calibration, KVQuantCalibration):
    fitted = calibration
  elif calibration is not None:
    fitted, report = calibrate(float_params, config, calibration, progress=progress, seed=seed)
  else:
    raise InputError("a KVQuant cache needs calibration (windows to fit on, or a saved KVQuantCalibration)")
  c, fc = model.config, fitted.config
  return KVCacheSetup(f"kvquant-{fc.bits}", fc, cache_factory(fitted), past_hook(fitted),
                      effective_bits(fc, c.head_dim, c.num_kv_heads, dtype_bytes=jnp.dtype(model.dtype).itemsize),
                      fitted, report)
