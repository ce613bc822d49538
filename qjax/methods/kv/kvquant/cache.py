"""The KVQuant layer cache (quantized when written, attended through the cache-attend protocol), its closed-form
storage cost, and the quantized-past hook for cache-free evaluation."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax.core import packing
from qjax.core.errors import InputError
from qjax.core.formats.kv import QuantizedKV
from qjax.methods.kv.kvquant.codec import KVQuantCalibration, KVQuantLayer, _index_dtype, quantize_keys, quantize_values
from qjax.methods.kv.kvquant.config import KVQuantConfig
from qjax.models import layers
from qjax.models.kv_cache import KVCache, LayerCache


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
  """A :data:`qjax.evaluation.generation.CacheFactory` ``(config, batch, max_len, dtype) -> KVCache`` of
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
    return layers.attention(q, k_hat, v_hat, mask, scale, layers.ActivationHooks(), causal=True)

  return kv_past
