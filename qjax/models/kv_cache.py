"""KV caches: pytrees passed to the model's forward and returned updated.

A cache holds, for every decoder layer, a *layer cache* (a :class:`LayerCache`) with the cache-attend protocol,
``attend(q, k, v, *, index, positions, rope, mask, scale, hooks, implementation) -> (out, new_layer_cache)``, whose
default is :func:`qjax.kernels.kv_attention.kv_attention` (a cache with a fused kernel overrides it: KIVI's reads
its packed codes through :mod:`qjax.kernels.kivi_attention`), built on
``update(k, v, index, positions, rope) -> (k_all, v_all, new_layer_cache)``: ``k, v [batch, t, kv_heads,
head_dim]`` are the new tokens' keys BEFORE RoPE and values, written at slots ``index .. index + t - 1``;
``positions [batch, t]`` are their positions and ``rope(x, positions)`` the rotation (None for models without
RoPE), so a cache may store keys after RoPE (dense, KIVI) or before (KVQuant quantizes pre-RoPE keys);
``k_all, v_all [batch, max_len, kv_heads, head_dim]`` (keys after RoPE) are what attention reads. Quantized
caches (:mod:`qjax.methods.kv.kivi`, :mod:`qjax.methods.kv.kvquant`) implement the same method. The cache itself
tracks ``length`` (slots filled, shared by the batch) and ``valid [batch, max_len]``
(False for padding slots), from which the model builds the attention mask.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.kernels.kv_attention import kv_attention
from qjax.kernels.kv_attention import path_name as kv_attention_path


class LayerCache:
  """Base of the layer caches: :meth:`attend` through the ``kv_attention`` kernel op; subclasses implement
  ``update``."""

  def attend(self, q, k, v, *, index, positions, rope, mask, scale, hooks=None, implementation: str = "auto"):
    """``(out [b, t, h, d], new layer cache)`` for queries ``q`` (after RoPE) and the new tokens' keys (before
    RoPE) and values written at slot ``index``; ``implementation`` names the kernel (the model's ``kernel``)."""
    return kv_attention(self, q, k, v, index=index, positions=positions, rope=rope, mask=mask, scale=scale,
                        hooks=hooks, implementation=implementation)

  def attention_path(self, implementation: str = "auto") -> str:
    """The path :meth:`attend` takes (CLI summaries)."""
    return kv_attention_path(self, implementation)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseLayerCache(LayerCache):
  """Full-precision keys and values ``[batch, max_len, kv_heads, head_dim]``."""
  k: jax.Array
  v: jax.Array

  def update(self, k, v, index, positions, rope=None):
    if rope is not None:
      k = rope(k, positions)
    z = jnp.zeros((), jnp.int32)
    kk = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), (z, index, z, z))
    vv = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), (z, index, z, z))
    return kk, vv, DenseLayerCache(kk, vv)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  layers: tuple
  valid: jax.Array     # [batch, max_len] bool
  length: jax.Array    # int32 scalar: slots filled

  @classmethod
  def dense(cls, config, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    layers = tuple(DenseLayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                   for _ in range(config.num_layers))
    return cls(layers, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]

  def append_mask(self, attention_mask: jax.Array):
    """Attention mask ``[batch, t, max_len]`` for ``t`` new tokens, and the updated ``valid``."""
    t = attention_mask.shape[1]
    valid = jax.lax.dynamic_update_slice(self.valid, attention_mask.astype(bool), (0, self.length))
    q_slot = self.length + jnp.arange(t)
    causal = jnp.arange(self.max_len)[None, :] <= q_slot[:, None]
    return causal[None] & valid[:, None, :], valid
