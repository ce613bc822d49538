"""XLA reference of ``kv_attention`` (the spec): write the new tokens into the layer cache (its ``update``), read
its keys and values back dense, and run grouped-query attention over them."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _apply(hook, x):
  return x if hook is None else hook(x)


def attention(q, k, v, mask, scale: float, hooks=None):
  """Grouped-query attention. ``q [b, t, h, d]``, ``k, v [b, s, kvh, d]``, ``mask [b, t, s]`` bool; ``hooks``
  (optional, e.g. :class:`qjax.models.layers.ActivationHooks`) may quantize the operands (``attn_q``, ``attn_k``,
  ``attn_probs``, ``attn_v``). Scores and softmax in float32; returns ``[b, t, h, d]`` in ``q.dtype``."""
  b, t, h, d = q.shape
  kvh = k.shape[2]
  get = lambda name: getattr(hooks, name, None)
  q = _apply(get("attn_q"), q).reshape(b, t, kvh, h // kvh, d)
  k, v = _apply(get("attn_k"), k), _apply(get("attn_v"), v)
  s = jnp.einsum("btgrd,bsgd->bgrts", q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = _apply(get("attn_probs"), jax.nn.softmax(s, axis=-1).astype(v.dtype))
  o = jnp.einsum("bgrts,bsgd->btgrd", p, v)
  return o.reshape(b, t, h, d)


def update_then_attend(layer_cache, q, k_new, v_new, *, index, positions, rope, mask, scale, hooks=None):
  """``(out [b, t, h, d], new layer cache)``: ``layer_cache.update`` then :func:`attention` over the whole cache
  (``mask [b, t, max_len]``)."""
  k, v, new = layer_cache.update(k_new, v_new, index, positions, rope)
  return attention(q, k, v, mask, scale, hooks), new
