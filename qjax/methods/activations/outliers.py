"""Outlier test bed: plant activation outliers in a model without changing its function.

Large LLMs develop a few hidden channels whose normalized activations are orders of magnitude above the rest
(LLM.int8(), SmoothQuant); small models such as stories260K do not, so per-token activation quantization looks
harmless on them. :func:`plant_outliers` reproduces the phenomenon: for the chosen channels ``j`` (the same in
every layer, as in real models) it multiplies the norm weight (and bias) by ``factor`` and divides input column
``j`` of the linears that norm feeds by ``factor`` (:func:`qjax.methods.scaling.fold_into_norm` with ``s_j = 1 /
factor``). The float function is unchanged up to rounding; the inputs of those linears now carry outliers.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qjax.core.errors import InputError
from qjax.methods import scaling
from qjax.models import CausalLM


@dataclasses.dataclass(frozen=True)
class OutlierConfig:
  channels: int = 4          # outlier channels per norm
  factor: float = 50.0       # magnitude multiplier
  norms: str = "attention"   # "attention": the norm before q, k, v; "all": every norm that feeds linears
  seed: int = 0

  def __post_init__(self):
    if self.channels < 1:
      raise InputError(f"outlier channels must be positive, got {self.channels}")
    if not self.factor > 0:
      raise InputError(f"outlier factor must be positive, got {self.factor}")
    if self.norms not in ("attention", "all"):
      raise InputError(f"outlier norms must be 'attention' or 'all', got {self.norms!r}")


def outlier_channels(hidden: int, config: OutlierConfig) -> np.ndarray:
  """The planted channel indices (sorted, drawn once with ``config.seed``)."""
  if config.channels > hidden:
    raise InputError(f"cannot plant {config.channels} outlier channels in a hidden size of {hidden}")
  return np.sort(np.random.default_rng(config.seed).choice(hidden, config.channels, replace=False))


def plant_outliers(model: CausalLM, params, config: OutlierConfig = OutlierConfig()):
  """Returns the parameter tree with outliers planted (see module doc)."""
  fam, c = model.family, model.config
  scaling.check_foldable(c)
  s = np.ones(c.hidden_size, np.float32)
  s[outlier_channels(c.hidden_size, config)] = 1.0 / config.factor
  norms = [n for n, _ in fam.norm_feeds][: 1 if config.norms == "attention" else None]

  def plant(i, layer):
    for norm in norms:
      layer = scaling.fold_into_norm(layer, fam, norm, jnp.asarray(s))
    return layer

  return scaling.map_layers(params, fam, c.num_layers, plant)
