"""XLA reference of ``kv_attention`` (the spec): write the new tokens into the layer cache (its ``update``), read
its keys and values back dense, and run grouped-query attention over them."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _apply(hook, x):
  return x if hook is None else hook(x)


CAUSAL_BLOCK = 128   # query rows per block of :func:`causal_blocks`


def attention(q, k, v, mask, scale: float, hooks=None, *, causal: bool = False):
  """Grouped-query attention. ``q [b, t, h, d]``, ``k, v [b, s, kvh, d]``, ``mask [b, t, s]`` bool; ``hooks``
  (optional, e.g. :class:`qjax.models.layers.ActivationHooks`) may quantize the operands (``attn_q``, ``attn_k``,
  ``attn_probs``, ``attn_v``). Scores and softmax in float32; returns ``[b, t, h, d]`` in ``q.dtype``.

  ``causal=True`` promises a self-attention mask (``s = t``, key ``s`` hidden from query ``t < s``) and computes
  the same result in query blocks that skip the hidden keys (:func:`causal_blocks`)."""
  get = lambda name: getattr(hooks, name, None)
  q, k, v = _apply(get("attn_q"), q), _apply(get("attn_k"), k), _apply(get("attn_v"), v)
  attend = lambda q, mask, k, v: heads_output(_apply(get("attn_probs"), masked_softmax(heads_scores(q, k, scale),
                                                                                       mask, v.dtype)), v)
  if causal:
    return causal_blocks(attend, q, (mask,), (k, v))
  return merge_heads(attend(split_heads(q, k.shape[2]), mask, kv_heads(k), kv_heads(v)))


def split_heads(q, kvh: int):
  """Query-head-major ``q [b, t, h, d] -> [b, kvh, h / kvh, t, d]`` (query head ``g * h / kvh + r`` at
  ``[:, g, r]``: it reads KV head ``g``)."""
  b, t, h, d = q.shape
  return q.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)


def kv_heads(k):
  """Head-major keys or values ``[b, s, kvh, d] -> [b, kvh, s, d]``."""
  return k.transpose(0, 2, 1, 3)


def merge_heads(o):
  """``[b, kvh, r, t, d] -> [b, t, kvh * r, d]`` (the inverse of :func:`split_heads`)."""
  b, g, r, t, d = o.shape
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, g * r, d)


def heads_scores(q, k, scale: float):
  """float32 scores ``[b, kvh, r, t, s]`` of head-major ``q [b, kvh, r, t, d]`` against ``k [b, kvh, s, d]``,
  times ``scale``."""
  return jnp.einsum("bgrtd,bgsd->bgrts", q, k, preferred_element_type=jnp.float32) * scale


def heads_output(p, v):
  """Head-major ``p [b, kvh, r, t, s] @ v [b, kvh, s, d] -> [b, kvh, r, t, d]``."""
  return jnp.einsum("bgrts,bgsd->bgrtd", p, v)


def masked_softmax(s, mask, dtype):
  """Softmax over keys of scores ``s [b, kvh, r, t, s]`` where ``mask [b, t, s]`` is True, in ``dtype``."""
  s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(s, axis=-1).astype(dtype)


def causal_blocks(attend, q, masks: tuple, keys: tuple, block: int | None = None):
  """Causal self-attention in blocks of ``block`` query rows (default :data:`CAUSAL_BLOCK`), each block reading
  only the keys up to its last row: ``q [b, t, h, d]``, ``masks`` arrays ``[b | 1, t, s]`` and ``keys`` arrays
  ``[b, s, kvh, d]`` with ``s = t``; returns ``[b, t, h, d]``. ``attend(q, *masks, *keys)`` works head-major on one
  block: ``q [b, kvh, r, t_block, d]`` (:func:`split_heads`), the masks' rows of the block, ``keys [b, kvh,
  s_block, d]`` (:func:`kv_heads`) -> ``[b, kvh, r, t_block, d]``.

  Equal to one call on everything (up to float summation order; for every query that sees at least one key: a
  left-padding query, whose output nothing reads, averages a different number of hidden keys) when every mask
  hides key ``s > t`` from query ``t`` and ``attend`` treats each query row on its own: the keys skipped are
  masked, so their probabilities are exactly 0. A per-row quantizer of the probabilities (``attn_probs``) sees
  the same row minus trailing zeros, which leaves a range that contains 0 (all of qjax's) unchanged.

  Halves the score work at long ``t`` and keeps each block's ``[block, s]`` scores in cache
  (``eval/bench_kernels.py``: 3.8x at ``t = 2048`` for SmolLM2's heads), at the price of one traced block per
  ``block`` rows (longer compilation). The operands are made head-major once, before the blocks: transposing
  each block's key prefix inside its einsum cost as much as the attention itself (SmolLM2, ``t = 2048``: 1.42 s
  -> 0.73 s for 16 windows, the same bits). The blocks are a Python loop, not a scan, because each reads a key
  prefix of a different static length (a scan over fixed-length blocks would read and score every key)."""
  block = block or CAUSAL_BLOCK
  t, kvh = q.shape[1], keys[0].shape[2]
  q, keys = split_heads(q, kvh), tuple(kv_heads(x) for x in keys)
  outs = []
  for i0 in range(0, t, block):
    i1 = min(i0 + block, t)
    outs.append(attend(q[:, :, :, i0:i1], *(m[:, i0:i1, :i1] for m in masks), *(x[:, :, :i1] for x in keys)))
  return merge_heads(jnp.concatenate(outs, axis=3))


def update_then_attend(layer_cache, q, k_new, v_new, *, index, positions, rope, mask, scale, hooks=None):
  """``(out [b, t, h, d], new layer cache)``: ``layer_cache.update`` then :func:`attention` over the whole cache
  (``mask [b, t, max_len]``)."""
  k, v, new = layer_cache.update(k_new, v_new, index, positions, rope)
  return attention(q, k, v, mask, scale, hooks), new
