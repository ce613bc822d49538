"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before W8A8 quantization.

Per norm and the linears it feeds (the family map's ``norm_feeds``; LLaMA ``input_layernorm -> q, k, v`` and
``post_attention_layernorm -> gate, up``, OPT ``self_attn_layer_norm -> q, k, v`` and ``final_layer_norm ->
fc1``; ``o`` and ``down`` are not smoothed, as in the reference) the smoothing factors are (paper eq. 4, clamps
of the reference ``smooth_ln_fcs``)::

    s_j = clamp(max|X_j|^alpha / clamp(max_{fc, o} |W_fc[o, j]|, 1e-5)^(1 - alpha), 1e-5)

with ``max|X_j|`` the largest magnitude of input channel ``j`` over all calibration tokens. The norm's weight and
bias are divided by ``s`` and the linears' input columns multiplied by it (:mod:`qjax.methods.scaling`), a pure pytree
transform that keeps the float function. Quantization follows separately (any weight method, activation
quantizer of :mod:`qjax.methods.activations.quantizers`).

Differences from the reference: statistics come from the calibration windows of :mod:`qjax.calibration.layerwise`
(default TinyStories, not 512 Pile documents), collected layer by layer with a scan (no hooks, no autograd
graph) on the float model, and the factors are computed in float32 (the reference uses the model dtype, bf16).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.methods import scaling
from qjax.models import capture


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
  alpha: float = 0.5      # migration strength

  def __post_init__(self):
    if not 0 <= self.alpha <= 1:
      raise InputError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")


def smoothing_factors(act_absmax: jax.Array, weights, alpha: float) -> jax.Array:
  """``s [in]`` float32 for ``act_absmax [in]`` and the ``[out, in]`` weights fed by the same input."""
  w = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)), axis=0) for x in weights]), axis=0)
  w = jnp.maximum(w, 1e-5)
  a = jnp.asarray(act_absmax, jnp.float32)
  return jnp.maximum(a**alpha / w ** (1 - alpha), 1e-5)


def smooth(params, config: SmoothQuantConfig, calibration, progress: bool = True):
  """``(smoothed params, CalibrationReport)``, function-preserving in float; each layer's report records the
  largest factor per norm."""
  model = calibration.model
  scaling.check_foldable(model.config)
  fam = model.family

  def process(i, prefix, layer, x):
    heads = tuple(fam.linear_path(roles[0]) for _, roles in fam.norm_feeds)
    stats = capture.collect_stats(model, layer, x, heads, ("absmax",))
    flat = tree.flatten(layer)
    info = {}
    for (norm, roles), head in zip(fam.norm_feeds, heads):
      s = smoothing_factors(stats[head]["absmax"], [flat[f"{fam.linear_path(r)}/weight"] for r in roles],
                            config.alpha)
      layer = scaling.fold_into_norm(layer, fam, norm, s)
      info[f"{norm} max s"] = float(jnp.max(s))
    return layer, info

  return calibration.walk(params, process, progress=progress,
                                     desc=f"SmoothQuant a={config.alpha}")
