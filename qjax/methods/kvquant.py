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

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax import calibration as calibration_lib
from qjax import data, packing
from qjax.errors import InputError
from qjax.methods.registry import KVCacheSetup, register_kv_method
from qjax.models import layers
from qjax.models.kv_cache import KVCache, LayerCache


@dataclasses.dataclass(frozen=True)
class KVQuantConfig:
  """KVQuant settings. ``nsamples`` windows of ``seqlen`` tokens (capped at the model context) calibrate;
  ``key_capacity`` sets the per-token room for key outliers (see :meth:`key_outlier_capacity`)."""
  bits: int = 4
  outlier_fraction: float = 0.01
  first_fp: int = 1
  nuq: bool = True
  fisher: bool = False
  kmeans_iters: int = 50
  nsamples: int = 16
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


# ----------------------------------------------------------------------------------------------- k-means


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans_1d(x: jax.Array, w: jax.Array, *, k: int, iters: int) -> jax.Array:
  """Weighted 1-D k-means (Lloyd's algorithm) -> sorted centroids ``[k]`` float32.

  ``x, w [n]`` float32, samples with ``w = 0`` ignored. Initialization: the sorted weighted-in samples at ranks
  ``floor((j + 1/2) n_in / k)``. Each iteration assigns ``x`` to the nearest centroid (``#{j : x > m_j}`` with the
  midpoints ``m_j``) and moves each centroid to the weighted mean of its samples (an empty cluster keeps its
  centroid). In 1-D the clusters are intervals, so the centroids stay sorted.
  """
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  xs = jnp.sort(jnp.where(w > 0, x, jnp.inf))
  n_in = jnp.sum(w > 0)
  ranks = jnp.floor((jnp.arange(k) + 0.5) * n_in / k).astype(jnp.int32)
  init = xs[jnp.clip(ranks, 0, x.shape[0] - 1)]
  init = jnp.where(jnp.isfinite(init), init, 0.0)              # no weighted-in sample at all

  def step(_, c):
    a = assign(x, c)
    total = jax.ops.segment_sum(w * x, a, k)
    mass = jax.ops.segment_sum(w, a, k)
    return jnp.where(mass > 0, total / jnp.where(mass > 0, mass, 1), c)

  return jax.lax.fori_loop(0, iters, step, init)


def assign(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Nearest-centroid codes ``#{j : z > (c_j + c_{j+1}) / 2}`` (int32, shape of ``z``) for a sorted codebook."""
  mids = (codebook[1:] + codebook[:-1]) / 2
  return jnp.sum(z[..., None] > mids, axis=-1, dtype=jnp.int32)


def kmeans_objective(x: jax.Array, w: jax.Array, codebook: jax.Array) -> jax.Array:
  """``sum_i w_i (x_i - c_{code_i})^2`` float32."""
  return jnp.sum(w * (x - codebook[assign(x, codebook)]) ** 2)


# ----------------------------------------------------------------------------------------- calibration data


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


# ------------------------------------------------------------------------------------ quantize / dequantize


def _index_dtype(channels: int):
  """Outlier channel indices; ``channels`` itself marks an empty entry."""
  return jnp.uint8 if channels < 2**8 else jnp.uint16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """Quantized keys or values of ``[..., kv_heads, head_dim]`` activations, one row of ``C`` channels per token.

  ``codes [..., ceil(C/8) * bits]`` uint8 (:func:`qjax.packing.pack`, 8-bit words), ``zero, range`` broadcastable
  to ``[..., C]`` (keys: calibrated ``[C]`` float32; values: ``[..., 1]`` per token), ``codebook [2**bits]``
  float32, outliers ``outlier_idx [..., cap]`` (channel; ``C`` = empty) and ``outlier_val [..., cap]`` (exact).
  """
  codes: jax.Array
  zero: jax.Array
  range: jax.Array
  codebook: jax.Array
  outlier_idx: jax.Array
  outlier_val: jax.Array
  heads: int = dataclasses.field(metadata=dict(static=True))
  head_dim: int = dataclasses.field(metadata=dict(static=True))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """``x_hat = codebook[code] * range + zero``, outliers exact -> ``[..., heads, head_dim]`` ``dtype``."""
    c = self.heads * self.head_dim
    bits = int(np.log2(self.codebook.shape[0]))
    lead = self.codes.shape[:-1]
    codes = packing.unpack(self.codes, bits=bits, n=c, dtype=jnp.int32)
    x = (self.codebook[codes] * self.range + self.zero).astype(dtype).reshape(-1, c)
    idx = self.outlier_idx.reshape(x.shape[0], self.outlier_idx.shape[-1]).astype(jnp.int32)
    x = x.at[jnp.arange(x.shape[0])[:, None], idx].set(self.outlier_val.reshape(idx.shape).astype(dtype), mode="drop")
    return x.reshape(*lead, self.heads, self.head_dim)


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


# ------------------------------------------------------------------------------------------- the cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVQuantLayerCache(LayerCache):
  """One layer's quantized cache of ``batch`` rows and ``max_len`` slots (``C = kv_heads * head_dim``).

  Per slot: packed key and value codes ``k_codes, v_codes [b, L, ceil(C/8) bits]`` uint8; key outliers
  ``k_idx, k_val [b, L, k_capacity]``; value outliers ``v_idx, v_val [b, L, 2 v_outliers]``; the values'
  ``v_zero, v_range [b, L, 1]``; the slot's position ``positions [b, L]`` (keys are stored before RoPE). Per row:
  the exact keys and values of positions ``0 .. first_fp - 1``, ``k_first, v_first [b, first_fp, kv_heads,
  head_dim]``. Non-code arrays are in the cache dtype. ``calib`` is static.
  """
  k_codes: jax.Array
  k_idx: jax.Array
  k_val: jax.Array
  v_codes: jax.Array
  v_idx: jax.Array
  v_val: jax.Array
  v_zero: jax.Array
  v_range: jax.Array
  positions: jax.Array
  k_first: jax.Array
  v_first: jax.Array
  calib: KVQuantLayer = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def empty(cls, calib: KVQuantLayer, batch: int, max_len: int, heads: int, head_dim: int, first_fp: int, dtype,
            position_dtype) -> "KVQuantLayerCache":
    c = heads * head_dim
    nb = packing.packed_length(c, int(np.log2(calib.k_codebook.shape[0])), 8)
    idx = _index_dtype(c)
    z = lambda *s, dt=dtype: jnp.zeros((batch, *s), dt)
    return cls(z(max_len, nb, dt=jnp.uint8), z(max_len, calib.k_capacity, dt=idx), z(max_len, calib.k_capacity),
               z(max_len, nb, dt=jnp.uint8), z(max_len, 2 * calib.v_outliers, dt=idx),
               z(max_len, 2 * calib.v_outliers), z(max_len, 1), z(max_len, 1), z(max_len, dt=position_dtype),
               z(first_fp, heads, head_dim), z(first_fp, heads, head_dim), calib)

  def update(self, k, v, index, positions, rope=None):
    """Quantizes and writes ``k`` (before RoPE), ``v [b, t, kv_heads, head_dim]`` at slots ``index ..``; the
    tokens at positions ``< first_fp`` also go to the exact buffers (the last token of the call with that
    position: left padding repeats position 0 before the real first token). Returns the dequantized ``(k_all
    after RoPE, v_all [b, max_len, kv_heads, head_dim], new cache)``."""
    dtype = self.k_val.dtype
    qk = quantize_keys(k.astype(dtype), self.calib)
    qv = quantize_values(v.astype(dtype), self.calib, dtype)
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), index, axis=1)
    new = dataclasses.replace(
        self, k_codes=put(self.k_codes, qk.codes), k_idx=put(self.k_idx, qk.outlier_idx),
        k_val=put(self.k_val, qk.outlier_val), v_codes=put(self.v_codes, qv.codes),
        v_idx=put(self.v_idx, qv.outlier_idx), v_val=put(self.v_val, qv.outlier_val), v_zero=put(self.v_zero, qv.zero),
        v_range=put(self.v_range, qv.range),
        positions=put(self.positions, positions), k_first=_write_first(self.k_first, k, positions),
        v_first=_write_first(self.v_first, v, positions))
    k_all, v_all = new.read()
    pos = new.positions.astype(jnp.int32)
    return (k_all if rope is None else rope(k_all, pos)), v_all, new

  def read(self):
    """Dequantized keys (before RoPE) and values ``[b, max_len, kv_heads, head_dim]`` in the cache dtype."""
    c, dtype = self.calib, self.k_val.dtype
    heads, d = self.k_first.shape[2:]
    k = QuantizedKV(self.k_codes, jnp.asarray(c.k_zero).reshape(-1), jnp.asarray(c.k_range).reshape(-1),
                    jnp.asarray(c.k_codebook), self.k_idx, self.k_val, heads, d).dequantize(dtype)
    v = QuantizedKV(self.v_codes, self.v_zero.astype(jnp.float32), self.v_range.astype(jnp.float32),
                    jnp.asarray(c.v_codebook), self.v_idx, self.v_val, heads, d).dequantize(dtype)
    return _exact_first(k, self.k_first, self.positions), _exact_first(v, self.v_first, self.positions)


def _write_first(buf, x, positions):
  """``buf [b, F, ...]`` with ``buf[:, p] = x[:, j]`` for the last ``j`` where ``positions[:, j] == p < F``."""
  f, t = buf.shape[1], x.shape[1]
  if f == 0:
    return buf
  match = positions[:, :, None] == jnp.arange(f)                 # [b, t, F]
  last = t - 1 - jnp.argmax(match[:, ::-1], axis=1)             # [b, F]
  new = jnp.take_along_axis(x, last[:, :, None, None], axis=1).astype(buf.dtype)
  return jnp.where(jnp.any(match, axis=1)[:, :, None, None], new, buf)


def _exact_first(x_hat, first, positions):
  """``x_hat [b, s, ...]`` with the slots at positions ``< F`` replaced by ``first[:, position]``."""
  f = first.shape[1]
  if f == 0:
    return x_hat
  pos = positions.astype(jnp.int32)
  exact = jnp.take_along_axis(first, jnp.clip(pos, 0, f - 1)[:, :, None, None], axis=1)
  return jnp.where((pos < f)[:, :, None, None], exact, x_hat)


def cache_factory(calib: KVQuantCalibration):
  """A :data:`qjax.generation.CacheFactory` ``(config, batch, max_len, dtype) -> KVCache`` of
  :class:`KVQuantLayerCache` layers. Positions are stored as uint16 when the model context fits, else int32."""
  def make(config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    if len(calib.layers) != config.num_layers:
      raise InputError(f"KVQuant calibration has {len(calib.layers)} layers, the model {config.num_layers}")
    pdt = _position_dtype(config.max_position_embeddings)
    lay = tuple(KVQuantLayerCache.empty(l, batch, max_len, config.num_kv_heads, config.head_dim,
                                        calib.config.first_fp, dtype, pdt) for l in calib.layers)
    return KVCache(lay, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))
  return make


def _position_dtype(context: int):
  """Slot positions: uint16 when every position of the context fits, else int32."""
  return jnp.uint16 if context <= 2**16 else jnp.int32


def effective_bits(config: KVQuantConfig, head_dim: int, kv_heads: int, *, dtype_bytes: int = 2,
                   position_bytes: int = 2, max_len: int | None = None) -> float:
  """Stored bits per cached element (keys and values) of :class:`KVQuantLayerCache`, closed form.

  Per token and layer, with ``C = kv_heads * head_dim``, index bytes ``i = 1 if C < 256 else 2``, ``e =
  dtype_bytes``: codes ``2 * ceil(C/8) * bits`` bytes, key outliers ``k_capacity (e + i)``, value outliers
  ``2 n_v (e + i)``, the values' zero and range ``2 e``, the position ``position_bytes``; plus, amortized over
  ``max_len`` slots when given, the exact first tokens ``2 first_fp C e / max_len``. Bits = ``8 * bytes / (2 C)``.
  """
  c = kv_heads * head_dim
  i = np.dtype(_index_dtype(c)).itemsize
  per_token = (2 * packing.packed_length(c, config.bits, 8) + config.key_outlier_capacity(c) * (dtype_bytes + i)
               + 2 * config.value_outliers(c) * (dtype_bytes + i) + 2 * dtype_bytes + position_bytes)
  if max_len is not None:
    per_token += 2 * config.first_fp * c * dtype_bytes / max_len
  return 8 * per_token / (2 * c)


# ------------------------------------------------------------------------------------ quantized past (ppl)


def past_hook(calib: KVQuantCalibration):
  """``ActivationHooks.kv_past`` for a cache-free forward pass: every query attends to the keys and values as
  the KVQuant cache holds them (quantized, exact at positions ``< first_fp``; dequantized in the compute dtype),
  so logits equal token-by-token decoding through :func:`cache_factory` caches of that dtype (``layer_index``
  picks the decoder layer's calibration)."""
  first = calib.config.first_fp

  def kv_past(q, k, v, positions, mask, scale, rope, layer_index):
    layer = calib.layers[layer_index]
    exact = (positions < first)[:, :, None, None]
    k_hat = jnp.where(exact, k, quantize_keys(k, layer).dequantize(k.dtype))
    v_hat = jnp.where(exact, v, quantize_values(v, layer).dequantize(v.dtype))
    if rope is not None:
      k_hat = rope(k_hat, positions)
    return layers.attention(q, k_hat, v_hat, mask, scale, layers.ActivationHooks())

  return kv_past


# ----------------------------------------------------------------------------------------- calibration


def calibration_for(model, tokens: np.ndarray, config: KVQuantConfig, seed: int = 0):
  """:class:`qjax.calibration.Calibration` of ``config.nsamples`` seeded windows of ``config.seqlen`` tokens
  (capped at the model context) of ``tokens``."""
  seqlen = min(config.seqlen, model.config.max_position_embeddings)
  return calibration_lib.Calibration(model, data.calibration_windows(tokens, config.nsamples, seqlen, seed))


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
    got = calibration_lib.capture_linears(model, layer_params, xi, (kp, vp), outputs=True)
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


def calibrate_with_report(params, config: KVQuantConfig, calibration: calibration_lib.Calibration,
                          progress: bool = True, seed: int = 0):
  """``(KVQuantCalibration, CalibrationReport)``: layer by layer on the float model (:func:`walk_layers` with
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

  _, report = calibration_lib.walk_layers(params, calibration, process, propagate="fp", progress=progress,
                                          desc=f"KVQuant {config.bits}-bit")
  return KVQuantCalibration(config, tuple(fitted)), report


def calibrate(params, config: KVQuantConfig, calibration: calibration_lib.Calibration,
              progress: bool = True, seed: int = 0) -> KVQuantCalibration:
  """The per-layer KVQuant calibration of the model (see :func:`calibrate_with_report`)."""
  return calibrate_with_report(params, config, calibration, progress, seed)[0]


@register_kv_method(KVQuantConfig, name="kvquant", needs_calibration=True)
def setup(model, float_params, config: KVQuantConfig, calibration=None, *, progress: bool = False,
          seed: int = 0) -> KVCacheSetup:
  """The registered KV protocol: ``calibration`` is a fitted :class:`KVQuantCalibration` to reuse (``config``
  then comes from it) or :class:`qjax.calibration.Calibration` windows to fit one on ``float_params``."""
  if isinstance(calibration, KVQuantCalibration):
    fitted = calibration
  elif isinstance(calibration, calibration_lib.Calibration):
    fitted = calibrate(float_params, config, calibration, progress=progress, seed=seed)
  else:
    raise InputError("a KVQuant cache needs calibration (windows to fit on, or a saved KVQuantCalibration)")
  c, fc = model.config, fitted.config
  return KVCacheSetup(f"kvquant-{fc.bits}", fc, cache_factory(fitted), past_hook(fitted),
                      effective_bits(fc, c.head_dim, c.num_kv_heads, dtype_bytes=jnp.dtype(model.dtype).itemsize),
                      fitted)
