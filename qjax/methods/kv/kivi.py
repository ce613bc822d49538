"""KIVI: a tuning-free 2..8-bit KV cache (Liu et al. 2024; reference notes section 2.10).

Quantizer (asymmetric min-max, as the reference ``quant_and_pack_{k,v}cache``), per group ``x`` of ``G`` values
with ``maxq = 2**bits - 1``::

    mn = min(x);  scale = (max(x) - mn) / maxq          # both stored in scale_dtype (float16 by default)
    q  = round(clip((x - mn) / scale, 0, maxq))         # clamp before round; scale == 0 -> divide by 1 (q = 0)
    x_hat = q * scale + mn

``mn`` and ``scale`` are rounded to their storage type (float16 by default: the reference runs in fp16) before ``q``
is computed, so the codes are the nearest ones for the stored parameters; ``max == min`` (a division by zero in the
reference) gives ``q = 0``, ``x_hat = mn``. Keys (after RoPE) are quantized **per channel** in groups of ``G``
consecutive tokens; values **per token** in groups of ``G`` consecutive channels (``G`` must divide ``head_dim``).
Codes are packed along ``head_dim`` for every token (uint8 words, :mod:`qjax.core.packing`), so a cache appends tokens
without repacking.

The cache (:class:`KIVILayerCache`, built by :func:`cache_factory`) keeps each row's oldest tokens quantized and
the newest in full precision. **Flush rule**, identical for keys and values: a row holding ``n`` tokens keeps the
first ``quantized_length(n) = G * floor(max(n - R, 0) / G)`` quantized and the other ``R .. R + G - 1`` (all of
them while ``n < R + G``) exact, i.e. a group of ``G`` tokens is quantized as soon as ``R`` newer tokens exist.
Groups are counted from each row's first real token, so left padding changes nothing. (The reference flushes keys
``R`` tokens at a time when the residual reaches ``R`` and values one token at a time beyond ``R``.)

**Attention semantics.** One call (prefill or decode step) appends its tokens; its queries read the call's own
tokens exactly and the earlier tokens as the cache held them before the call; the flush happens after. Hence
decoding token ``t`` reads tokens ``s < quantized_length(t)`` quantized and ``quantized_length(t) <= s <= t``
exactly; a prompt prefilled in one call is attended to exactly (as the reference's default
``prefill_with_quant=False``) and is quantized for the following decode steps. :func:`past_hook` computes the same
thing in a single cache-free pass (perplexity).

Fixes of the reference: B3 (values dequantized with the key bit width: every quantized tensor carries its own
bits), B4 (prompts shorter than ``R``: any prompt length works), the unguarded ``max == min``, and padding (the
reference passes no attention mask). Any bits in 2..8 (the reference asserts {2, 4}).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qjax.core import packing, uniform
from qjax.core.errors import InputError
from qjax.core.formats.kv import KIVITensor, group_view
from qjax.core.options import Flag, option
from qjax.kernels.kivi_attention import kivi_attention
from qjax.kernels.kivi_attention import path_name as kivi_attention_path
from qjax.methods.kv.flags import KV_BITS
from qjax.methods.registry import KVCacheSetup, register_kv_method
from qjax.models import layers
from qjax.models.kv_cache import KVCache, LayerCache

_WORD_BITS = 8             # uint8 code words: packed codes are exact for any head_dim multiple of 8
_static = dict(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class KIVIConfig:
  """``bits`` for keys and values unless ``k_bits`` / ``v_bits`` is given (2..8); ``group_size`` G (key groups
  of G tokens, value groups of G channels); ``residual`` R (a multiple of G, 0 allowed): full-precision tokens kept
  besides the incomplete group (see the flush rule in the module docstring); ``scale_dtype``: storage type of the
  scales and minima."""
  bits: int = option(4, KV_BITS)
  group_size: int = option(32, Flag("--kv-group-size", "tokens per key group and channels per value group "
                                                       "(must divide head_dim)"))
  residual: int = option(128, Flag("--kv-residual", "recent tokens kept in full precision, a multiple of the "
                                                    "group size"))
  k_bits: int | None = option(None, Flag("--kv-k-bits", "key bits when they differ from --kv-bits"))
  v_bits: int | None = option(None, Flag("--kv-v-bits", "value bits when they differ from --kv-bits"))
  scale_dtype: str = "float16"

  def __post_init__(self):
    for name in ("bits", "k_bits", "v_bits"):
      b = getattr(self, name)
      if b is not None and not 2 <= b <= 8:
        raise InputError(f"KIVI {name} must be in 2..8, got {b}")
    if self.group_size < 1:
      raise InputError(f"KIVI group size must be positive, got {self.group_size}")
    if self.scale_dtype not in ("float16", "bfloat16", "float32"):
      raise InputError(f"KIVI scale dtype must be float16, bfloat16 or float32, got {self.scale_dtype!r}")
    if self.residual < 0 or self.residual % self.group_size:
      raise InputError(f"KIVI residual length must be a non-negative multiple of the group size "
                       f"{self.group_size}, got {self.residual}")

  @property
  def key_bits(self) -> int:
    return self.bits if self.k_bits is None else self.k_bits

  @property
  def value_bits(self) -> int:
    return self.bits if self.v_bits is None else self.v_bits

  def check_head_dim(self, head_dim: int):
    if head_dim % self.group_size:
      raise InputError(f"KIVI group size {self.group_size} must divide head_dim {head_dim} (value groups are "
                       f"{self.group_size} channels of one token)")


def _quantize(x, bits: int, g: int, per_channel: bool, scale_dtype: str) -> KIVITensor:
  xg = group_view(x.astype(jnp.float32), g, per_channel)
  axis = -2 if per_channel else -1
  maxq = 2**bits - 1
  mn = jnp.min(xg, axis, keepdims=True)
  scale = ((jnp.max(xg, axis, keepdims=True) - mn) / maxq).astype(scale_dtype)
  mn = mn.astype(scale_dtype)
  s = scale.astype(jnp.float32)
  q = jnp.round(jnp.clip(uniform.true_divide(xg - mn.astype(jnp.float32), jnp.where(s == 0, 1.0, s)), 0, maxq))
  codes = packing.pack(q.reshape(x.shape).astype(jnp.uint8), bits=bits, axis=-1, word_bits=_WORD_BITS)
  return KIVITensor(codes, jnp.squeeze(scale, axis), jnp.squeeze(mn, axis), bits=bits, group_size=g,
                    head_dim=x.shape[-1], per_channel=per_channel, dtype=jnp.dtype(x.dtype).name)


def _check_bits(bits: int):
  if not 2 <= bits <= 8:
    raise InputError(f"KIVI bits must be in 2..8, got {bits}")


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def quantize_keys(k: jax.Array, *, bits: int, group_size: int, scale_dtype: str = "float16") -> KIVITensor:
  """Keys ``[batch, heads, T, head_dim]`` (``T`` a multiple of ``group_size``): per channel, groups of
  ``group_size`` consecutive tokens."""
  _check_bits(bits)
  if k.shape[-2] % group_size:
    raise InputError(f"KIVI key groups: {k.shape[-2]} tokens is not a multiple of the group size {group_size}")
  return _quantize(k, bits, group_size, True, scale_dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "scale_dtype"))
def quantize_values(v: jax.Array, *, bits: int, group_size: int, scale_dtype: str = "float16") -> KIVITensor:
  """Values ``[batch, heads, T, head_dim]`` (``group_size`` divides ``head_dim``): per token, groups of
  ``group_size`` consecutive channels."""
  _check_bits(bits)
  if v.shape[-1] % group_size:
    raise InputError(f"KIVI group size {group_size} must divide head_dim {v.shape[-1]}")
  return _quantize(v, bits, group_size, False, scale_dtype)


def quantized_length(n, config: KIVIConfig):
  """Tokens of a row held quantized once it holds ``n`` tokens: ``G * floor(max(n - R, 0) / G)``."""
  return jnp.maximum(n - config.residual, 0) // config.group_size * config.group_size


def _rows(x, idx):
  """``out[b, j] = x[b, idx[b, j]]`` (indices clipped): ``x [b, n, ...]``, ``idx [b, m]`` -> ``[b, m, ...]``."""
  return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0, mode="clip"))(x, idx)


def _write(store, new, start, count):
  """``store[b, :, start[b] + j] = new[b, :, j]`` for ``j < count[b]`` (axis 2); the other ``j`` are dropped."""
  j = jnp.arange(new.shape[2])
  idx = jnp.where(j < count[:, None], start[:, None] + j, store.shape[2])
  return jax.vmap(lambda s, i, n: s.at[:, i].set(n, mode="drop"))(store, idx, new)


def _qdq(quantize, x, bits: int, config: KIVIConfig):
  """Quantize-dequantize ``x [b, T, kvh, d]`` (model layout; ``T`` a multiple of G)."""
  q = quantize(jnp.swapaxes(x, 1, 2), bits=bits, group_size=config.group_size, scale_dtype=config.scale_dtype)
  return jnp.swapaxes(q.dequantize(), 1, 2)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KIVILayerCache(LayerCache):
  """One layer's KIVI cache for ``b`` rows of up to ``max_len`` slots (``L = G * floor(max(max_len - R, 0) / G)``
  quantized tokens, ``W = min(R + G - 1, max_len)`` residual tokens).

  ``keys``, ``values``: :class:`KIVITensor` ``[b, kv_heads, L, head_dim]``, token ``i`` of a row (counted from
  its first real token) at index ``i``; ``k_res``, ``v_res [b, W, kv_heads, head_dim]`` (cache dtype): the row's
  unquantized tokens ``quantized_length(n) .. n - 1`` at ``0 ..``. Keys are stored after RoPE. A row's left padding
  is recovered from the model's default positions (they count real tokens): ``pad = slot - position`` of the
  call's last token, which is always real.
  """
  keys: KIVITensor
  values: KIVITensor
  k_res: jax.Array
  v_res: jax.Array
  config: KIVIConfig = dataclasses.field(**_static)
  max_len: int = dataclasses.field(**_static)

  @classmethod
  def empty(cls, config: KIVIConfig, batch: int, max_len: int, kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> "KIVILayerCache":
    config.check_head_dim(head_dim)
    g, r = config.group_size, config.residual
    cap = max(max_len - r, 0) // g * g
    dtype = jnp.dtype(dtype)

    def store(bits, per_channel):
      z = lambda *shape, dt=config.scale_dtype: jnp.zeros((batch, kv_heads, *shape), dt)
      rows, cols = (cap // g, head_dim) if per_channel else (cap, head_dim // g)
      return KIVITensor(z(cap, packing.packed_length(head_dim, bits, _WORD_BITS), dt=jnp.uint8), z(rows, cols),
                        z(rows, cols), bits=bits, group_size=g, head_dim=head_dim, per_channel=per_channel,
                        dtype=dtype.name)

    res = lambda: jnp.zeros((batch, min(r + g - 1, max_len), kv_heads, head_dim), dtype)
    return cls(store(config.key_bits, True), store(config.value_bits, False), res(), res(), config, max_len)

  def _advance(self, k, v, index, positions, rope):
    """One call's bookkeeping: ``(pk, pv, q0, n1, pad, new cache)``. ``pk, pv [b, W + t, kv_heads, head_dim]``
    hold each row's pending tokens ``q0 .. n1 - 1`` at ``0 ..`` (its residual, then the call's real tokens; keys
    after RoPE; the rest is filler); ``q0 = quantized_length(n0)`` tokens are read quantized (``n0`` tokens before
    the call), ``n1`` is the count after it, ``pad`` the row's left padding; the new cache is flushed to
    ``quantized_length(n1)``."""
    c, t = self.config, k.shape[1]
    if rope is not None:
      k = rope(k, positions)
    w = self.k_res.shape[1]
    pad = index + t - 1 - positions[:, -1]                # [b] left padding of each row
    n0, n1 = jnp.maximum(index - pad, 0), positions[:, -1] + 1
    q0, q1 = quantized_length(n0, c), quantized_length(n1, c)
    # Pending tokens q0 .. n1 - 1 of each row: its residual, then the call's real tokens (the last n1 - n0).
    j = jnp.arange(w + t)
    r0 = (n0 - q0)[:, None]
    src = jnp.where(j < r0, j, j - r0 + w + (t - n1 + n0)[:, None])
    pk = _rows(jnp.concatenate([self.k_res, k.astype(self.k_res.dtype)], 1), src)
    pv = _rows(jnp.concatenate([self.v_res, v.astype(self.v_res.dtype)], 1), src)
    keys = self._flush(self.keys, pk, q0, q1 - q0, quantize_keys)
    values = self._flush(self.values, pv, q0, q1 - q0, quantize_values)
    keep = jnp.arange(w)[None] + (q1 - q0)[:, None]
    new = KIVILayerCache(keys, values, _rows(pk, keep), _rows(pv, keep), c, self.max_len)
    return pk, pv, q0, n1, pad, new

  def update(self, k, v, index, positions, rope=None):
    """Appends ``k`` (before RoPE), ``v [b, t, kv_heads, head_dim]`` at slots ``index ..``; returns ``(k_all,
    v_all [b, max_len, kv_heads, head_dim], new cache)``: slot ``s`` of row ``b`` holds its token ``i = s -
    pad_b``, read quantized if ``i < quantized_length(n0)`` (``n0`` tokens before the call), exactly if ``i <
    n1`` (tokens after), as zeros otherwise (padding, future slots). Then flushes to ``quantized_length(n1)``.
    (The dequantized view of the whole store: what the XLA reference attends over; :meth:`attend` reads the
    codes.)"""
    pk, pv, q0, n1, pad, new = self._advance(k, v, index, positions, rope)
    cap, p = new.keys.codes.shape[2], pk.shape[1]
    i = jnp.arange(self.max_len)[None] - pad[:, None]     # [b, max_len] token index of each slot
    sel = jnp.where((i < 0) | (i >= n1[:, None]), cap + p, jnp.where(i < q0[:, None], i, cap + i - q0[:, None]))

    def view(store, pending):
      deq = jnp.swapaxes(store.dequantize(), 1, 2)
      return _rows(jnp.concatenate([deq, pending, jnp.zeros_like(pending[:, :1])], 1), sel)

    return view(new.keys, pk), view(new.values, pv), new

  def attend(self, q, k, v, *, index, positions, rope, mask, scale, hooks=None, implementation: str = "auto"):
    """``(out [b, t, h, d], new cache)``: the call's bookkeeping (:meth:`_advance`), then
    :func:`qjax.kernels.kivi_attention.kivi_attention` over the store's packed codes (the ``q0`` tokens read
    quantized) and the pending tokens, with the slot mask ``mask [b, t, max_len]`` mapped to both. With attention
    quantizers in ``hooks`` (W8A8 attention) the reference path over :meth:`update`'s view runs instead."""
    if any(getattr(hooks, n, None) is not None for n in ("attn_q", "attn_k", "attn_probs", "attn_v")):
      return super().attend(q, k, v, index=index, positions=positions, rope=rope, mask=mask, scale=scale,
                            hooks=hooks, implementation=implementation)
    pk, pv, q0, n1, pad, new = self._advance(k, v, index, positions, rope)
    cap, p = new.keys.codes.shape[2], pk.shape[1]
    slot_mask = lambda tok: jnp.take_along_axis(                   # mask[b, :, pad + tok] for tok [b, n]
        mask, jnp.broadcast_to(jnp.clip(pad[:, None] + tok, 0, mask.shape[-1] - 1)[:, None], (*mask.shape[:2],
                                                                                             tok.shape[1])), axis=2)
    store_tok = jnp.broadcast_to(jnp.arange(cap)[None], (q.shape[0], cap))
    pend_tok = q0[:, None] + jnp.arange(p)[None]
    mask_store = slot_mask(store_tok) & (store_tok < q0[:, None])[:, None]
    mask_pend = slot_mask(pend_tok) & (pend_tok < n1[:, None])[:, None]
    out = kivi_attention(q, new.keys, new.values, pk.astype(q.dtype), pv.astype(q.dtype), mask_store, mask_pend, q0,
                         scale, implementation=implementation)
    return out, new

  def attention_path(self, implementation: str = "auto") -> str:
    return kivi_attention_path(self.keys, implementation)

  @staticmethod
  def _flush(store: KIVITensor, pending, start, count, quantize) -> KIVITensor:
    """Quantizes ``pending [b, n, kvh, d]`` (row tokens ``start ..``, ``start`` a multiple of G) and writes its
    first ``count`` tokens (a multiple of G) into ``store``."""
    g = store.group_size
    n = -(-pending.shape[1] // g) * g
    x = jnp.pad(pending, ((0, 0), (0, n - pending.shape[1]), (0, 0), (0, 0)))
    new = quantize(jnp.swapaxes(x, 1, 2), bits=store.bits, group_size=g, scale_dtype=store.scale.dtype.name)
    per = g if store.per_channel else 1                   # tokens per row of scale / mn
    return dataclasses.replace(store, codes=_write(store.codes, new.codes, start, count),
                               scale=_write(store.scale, new.scale, start // per, count // per),
                               mn=_write(store.mn, new.mn, start // per, count // per))


def _make_cache(config: KIVIConfig, model_config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  mc = model_config
  layers_ = tuple(KIVILayerCache.empty(config, batch, max_len, mc.num_kv_heads, mc.head_dim, dtype)
                  for _ in range(mc.num_layers))
  return KVCache(layers_, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def cache_factory(config: KIVIConfig):
  """A :data:`qjax.evaluation.generation.CacheFactory` ``(model_config, batch, max_len, dtype) -> KVCache`` of empty
  :class:`KIVILayerCache` layers."""
  return functools.partial(_make_cache, config)


def bytes_per_token(config: KIVIConfig, model_config, max_len: int, dtype=jnp.float32) -> float:
  """Closed form of :func:`qjax.evaluation.generation.cache_bytes_per_token` for a KIVI cache of ``max_len`` slots: per layer
  and KV head, ``L`` tokens of packed K and V codes, their scales and minima (``2 L / G`` rows of
  ``head_dim`` for K, ``2 L`` rows of ``head_dim / G`` for V) and ``2 W`` residual tokens, over ``max_len``."""
  g, r, d = config.group_size, config.residual, model_config.head_dim
  cap, w = max(max_len - r, 0) // g * g, min(r + g - 1, max_len)
  codes = cap * sum(packing.packed_length(d, b, _WORD_BITS) for b in (config.key_bits, config.value_bits))
  params = 2 * (cap // g * d + cap * (d // g)) * jnp.dtype(config.scale_dtype).itemsize
  residual = 2 * w * d * jnp.dtype(dtype).itemsize
  return model_config.num_layers * model_config.num_kv_heads * (codes + params + residual) / max_len


def effective_bits(config: KIVIConfig, head_dim: int) -> float:
  """Bits per cached K/V element in the long-context limit (residual window negligible), K and V averaged:
  ``(code_bits(k_bits) + code_bits(v_bits)) / 2 + 2 s / G`` (an ``s``-bit scale and minimum per G elements, s = 16
  for float16) with ``code_bits(b) = 8 * packed_length(head_dim, b) / head_dim`` (= ``b`` when ``head_dim % 8 ==
  0``)."""
  config.check_head_dim(head_dim)
  code = sum(8 * packing.packed_length(head_dim, b, _WORD_BITS) for b in (config.key_bits, config.value_bits))
  return code / (2 * head_dim) + 2 * 8 * jnp.dtype(config.scale_dtype).itemsize / config.group_size


@dataclasses.dataclass(frozen=True)
class _QuantizedPast:
  config: KIVIConfig
  prefill: int

  def __call__(self, q, k, v, positions, mask, scale, rope, layer=0):
    c, g, t = self.config, self.config.group_size, k.shape[1]
    if rope is not None:
      k = rope(k, positions)
    pad = t - 1 - positions[:, -1]
    i = jnp.arange(t)[None] - pad[:, None]               # [b, t] token index of each slot (< 0: padding)
    in_row = lambda x: _rows(x, jnp.arange(-(-t // g) * g)[None] + pad[:, None])  # row order, G-padded
    k_hat = _rows(_qdq(quantize_keys, in_row(k), c.key_bits, c), i).astype(k.dtype)
    v_hat = _rows(_qdq(quantize_values, in_row(v), c.value_bits, c), i).astype(v.dtype)
    exact = (i[:, None, :] >= quantized_length(i, c)[:, :, None]) | (jnp.arange(t) < self.prefill)[None, :, None]
    return layers.mixed_attention(q, k, v, k_hat, v_hat, exact, mask, scale)


def past_hook(config: KIVIConfig, prefill: int = 0):
  """``ActivationHooks.kv_past`` simulating the KIVI cache in one cache-free forward pass ("quantized past").

  Query at row token index ``t`` reads key/value ``s <= t`` quantized (:func:`quantize_keys` groups of its row's
  tokens ``G j .. G j + G - 1``, :func:`quantize_values`) when ``s < quantized_length(t)`` and exactly otherwise,
  except that the queries in the first ``prefill`` slots read everything exactly. Rows may be left padded (default
  positions). With ``prefill = 0`` the logits equal those of decoding the sequence token by token through
  :func:`cache_factory`'s cache from an empty cache; with ``prefill = P`` those of prefilling the first ``P`` slots
  in one call and decoding the rest (generation).

  Contrast with the reference (notes 2.10, 2.11 B14): with ``prefill_with_quant=False`` its single-pass
  evaluations attend to exact K/V only (they equal the fp model); with ``True`` every query of a window reads the
  state the cache reaches at the END of the window (keys ``s < floor(T/R) R``, values ``s < T - R`` quantized,
  whatever the query position), which depends on the window length and quantizes tokens that decoding would still
  read exactly. Here each query sees what it would see when generated.
  """
  return _QuantizedPast(config, prefill)


@register_kv_method(KIVIConfig, name="kivi")
def setup(model, float_params, config: KIVIConfig, calibration=None, *, progress: bool = False,
          seed: int = 0) -> KVCacheSetup:
  """The registered KV protocol: KIVI needs no calibration (``float_params``, ``calibration``, ``seed``
  unused)."""
  config.check_head_dim(model.config.head_dim)
  return KVCacheSetup(f"kivi-{config.bits}", config, cache_factory(config), past_hook(config),
                      effective_bits(config, model.config.head_dim))
