"""KVQuant settings, validated on construction."""
from __future__ import annotations

import dataclasses
import math

from qjax.core.errors import InputError
from qjax.core.options import Flag, option
from qjax.methods.kv.flags import KV_BITS


@dataclasses.dataclass(frozen=True)
class KVQuantConfig:
  """KVQuant settings. ``nsamples`` windows of ``seqlen`` tokens (capped at the model context) calibrate;
  ``key_capacity`` sets the per-token room for key outliers (see :meth:`key_outlier_capacity`)."""
  bits: int = option(4, KV_BITS)
  outlier_fraction: float = option(0.01, Flag("--kv-outliers", "fraction of values kept exact (dense-and-sparse)"))
  first_fp: int = option(1, Flag("--kv-first-fp", "first tokens (absolute positions) kept in full precision"))
  nuq: bool = option(True, Flag("--kv-uniform", "uniform grid instead of the k-means codebook", negate=True))
  fisher: bool = option(False, Flag("--kv-fisher", "Fisher-weighted k-means"))
  kmeans_iters: int = 50
  nsamples: int = option(16, Flag("--kv-calib-nsamples", "calibration windows"))
  seqlen: int = 2048
  max_calib_tokens: int = 32768        # the reference's 16 x 2048: no subsampling at the defaults
  key_capacity: float = 3.0

  def __post_init__(self):
    if self.bits not in (2, 3, 4):
      raise InputError(f"KVQuant bits must be 2, 3 or 4, got {self.bits}")
    if not 0 <= self.outlier_fraction < 0.5:
      raise InputError(f"KVQuant outlier fraction must be in [0, 0.5), got {self.outlier_fraction}")
    if self.first_fp < 0:
      raise InputError(f"KVQuant first_fp must be >= 0, got {self.first_fp}")
    if self.kmeans_iters < 1 or self.nsamples < 1 or self.seqlen < 2 or self.max_calib_tokens < 1:
      raise InputError("KVQuant kmeans_iters, nsamples and max_calib_tokens must be positive and seqlen >= 2")
    if self.key_capacity < 0:
      raise InputError(f"KVQuant key_capacity must be >= 0, got {self.key_capacity}")

  def value_outliers(self, channels: int) -> int:
    """Value outliers per token and side, ``n_v = C - ceil((1 - f/2)(C - 1))`` (0 when ``f = 0``)."""
    if self.outlier_fraction == 0:
      return 0
    return channels - math.ceil((1 - self.outlier_fraction / 2) * (channels - 1) - 1e-9)

  def key_outlier_capacity(self, channels: int) -> int:
    """Key outliers stored per token: ``ceil(m + key_capacity * sqrt(m))`` with ``m = f C`` (the mean count and
    ``key_capacity`` binomial standard deviations), at most ``C``."""
    m = self.outlier_fraction * channels
    return min(channels, math.ceil(m + self.key_capacity * math.sqrt(m) - 1e-9))
