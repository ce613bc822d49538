"""A layer's fitted KVQuant codec (key thresholds, codebooks, outlier counts) and encoding keys and values with it."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import packing
from qjax.core.formats.kv import QuantizedKV
from qjax.methods.kv.kvquant.config import KVQuantConfig
from qjax.methods.kv.kvquant.kmeans import assign


@dataclasses.dataclass(frozen=True, eq=False)
class KVQuantLayer:
  """One layer's calibration (host arrays, float32): key thresholds ``k_lower, k_upper [kv_heads, head_dim]``,
  sorted codebooks ``k_codebook, v_codebook [2**bits]``, and the per-token outlier counts: ``k_capacity`` (key
  outliers stored) and ``v_outliers`` (value outliers per side). Hashed by identity (a static cache field)."""
  k_lower: np.ndarray
  k_upper: np.ndarray
  k_codebook: np.ndarray
  v_codebook: np.ndarray
  k_capacity: int
  v_outliers: int

  @property
  def k_zero(self) -> np.ndarray:
    return ((self.k_upper + self.k_lower) / 2).astype(np.float32)

  @property
  def k_range(self) -> np.ndarray:
    return ((self.k_upper - self.k_lower) / 2).astype(np.float32)


_LAYER_ARRAYS = ("k_lower", "k_upper", "k_codebook", "v_codebook")


@dataclasses.dataclass(frozen=True, eq=False)
class KVQuantCalibration:
  """Per-layer calibration of a model (``layers[i]`` for decoder layer ``i``) and the config that made it."""
  config: KVQuantConfig
  layers: tuple[KVQuantLayer, ...]

  def to_dict(self) -> dict:
    """``{"metadata": JSON-able dict, "arrays": {"layers_i/name": float32 array}}`` (see :meth:`from_dict`)."""
    arrays = {f"layers_{i}/{n}": np.asarray(getattr(l, n)) for i, l in enumerate(self.layers) for n in _LAYER_ARRAYS}
    return {"metadata": {"method": "kvquant", "config": dataclasses.asdict(self.config),
                         "num_layers": len(self.layers)}, "arrays": arrays}

  @classmethod
  def from_dict(cls, d: dict) -> "KVQuantCalibration":
    meta, arrays = d["metadata"], d["arrays"]
    config = KVQuantConfig(**meta["config"])
    out = []
    for i in range(meta["num_layers"]):
      a = {n: np.asarray(arrays[f"layers_{i}/{n}"], np.float32) for n in _LAYER_ARRAYS}
      c = a["k_lower"].size
      out.append(KVQuantLayer(**a, k_capacity=config.key_outlier_capacity(c), v_outliers=config.value_outliers(c)))
    return cls(config, tuple(out))


def _index_dtype(channels: int):
  """Outlier channel indices; ``channels`` itself marks an empty entry."""
  return jnp.uint8 if channels < 2**8 else jnp.uint16


def _safe_div(a, b):
  return jnp.where(b > 0, a / jnp.where(b > 0, b, 1), 0.0)


def _encode(z, codebook, bits):
  return packing.pack(assign(z, jnp.asarray(codebook)).astype(jnp.uint8), bits=bits, word_bits=8)


def quantize_keys(k: jax.Array, layer: KVQuantLayer) -> QuantizedKV:
  """Keys BEFORE RoPE ``k [..., kv_heads, head_dim]`` -> :class:`QuantizedKV` (static per-channel ranges).

  Outliers (``k > upper`` or ``k < lower``) are stored exactly in ``k.dtype``, the ``layer.k_capacity`` with the
  largest ``|z|`` per token; further outliers are clamped to the codebook.
  """
  heads, d = k.shape[-2:]
  c = heads * d
  kf = k.reshape(*k.shape[:-2], c)
  x = kf.astype(jnp.float32)
  zero, rng = jnp.asarray(layer.k_zero).reshape(c), jnp.asarray(layer.k_range).reshape(c)
  z = _safe_div(x - zero, rng)
  out = (x > jnp.asarray(layer.k_upper).reshape(c)) | (x < jnp.asarray(layer.k_lower).reshape(c))
  score, idx = jax.lax.top_k(jnp.where(out, jnp.abs(z), -1.0), layer.k_capacity)
  keep = score > 0
  val = jnp.where(keep, jnp.take_along_axis(kf, idx, axis=-1), 0).astype(k.dtype)
  bits = int(np.log2(layer.k_codebook.shape[0]))
  return QuantizedKV(_encode(z, layer.k_codebook, bits), zero, rng, jnp.asarray(layer.k_codebook),
                     jnp.where(keep, idx, c).astype(_index_dtype(c)), val, heads, d)


def quantize_values(v: jax.Array, layer: KVQuantLayer, dtype=None) -> QuantizedKV:
  """Values ``v [..., kv_heads, head_dim]`` -> :class:`QuantizedKV` with per-token ranges (dynamic).

  Per token, the ``layer.v_outliers`` largest and smallest of its ``C`` entries are outliers, stored exactly in
  ``dtype`` (default ``v.dtype``); ``zero, range`` come from the other entries and are stored in ``dtype`` (the
  codes use the stored, rounded values).
  """
  dtype = dtype or v.dtype
  heads, d = v.shape[-2:]
  c = heads * d
  vf = v.reshape(*v.shape[:-2], c)
  z, _, idx, zero, rng = _normalize_values(vf, layer.v_outliers, dtype)
  bits = int(np.log2(layer.v_codebook.shape[0]))
  return QuantizedKV(_encode(z, layer.v_codebook, bits), zero, rng, jnp.asarray(layer.v_codebook),
                     idx.astype(_index_dtype(c)), jnp.take_along_axis(vf, idx, axis=-1).astype(dtype), heads, d)


def _normalize_values(vf, n, dtype):
  """Per-token normalization of ``vf [..., C]`` -> ``(z float32 [..., C], outlier mask [..., C], outlier channels
  [..., 2n], zero, range [..., 1] in dtype)``: the ``n`` largest and ``n`` smallest entries of each row are the
  outliers (ties by lower channel), ``zero, range`` the midpoint and half-width of the others, rounded to
  ``dtype``, and ``z = (v - zero) / range`` (0 where ``range == 0``)."""
  x = vf.astype(jnp.float32)
  idx = jnp.concatenate([jax.lax.top_k(x, n)[1], jax.lax.top_k(-x, n)[1]], axis=-1)
  rows = math.prod(x.shape[:-1])
  out = jnp.zeros((rows, x.shape[-1]), bool).at[jnp.arange(rows)[:, None], idx.reshape(rows, 2 * n)].set(True)
  out = out.reshape(x.shape)
  lo = jnp.min(jnp.where(out, jnp.inf, x), axis=-1, keepdims=True)
  hi = jnp.max(jnp.where(out, -jnp.inf, x), axis=-1, keepdims=True)
  zero, rng = ((hi + lo) / 2).astype(dtype), ((hi - lo) / 2).astype(dtype)
  z = _safe_div(x - zero.astype(jnp.float32), rng.astype(jnp.float32))
  return z, out, idx, zero, rng
