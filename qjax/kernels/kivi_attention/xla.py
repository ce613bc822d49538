"""XLA reference of ``kivi_attention`` (the spec): dequantize the KIVI store whole, append the exact pending tokens
and run grouped-query attention (:func:`qjax.kernels.kv_attention.attention`) over both."""
from __future__ import annotations

import jax.numpy as jnp

from qjax.kernels.kv_attention.xla import attention


def store_mask(mask_store, length):
  """``mask_store [b, t, L]`` with the store tokens at index ``>= length [b]`` hidden."""
  return mask_store & (jnp.arange(mask_store.shape[-1])[None, None, :] < length[:, None, None])


def kivi_attention(q, keys, values, k_pend, v_pend, mask_store, mask_pend, length, scale: float):
  """See :func:`qjax.kernels.kivi_attention.kivi_attention`: the store dequantized to ``k_pend.dtype``, then one
  attention over ``[store | pending]``."""
  k = jnp.swapaxes(keys.dequantize(), 1, 2).astype(k_pend.dtype)      # [b, L, kvh, d]
  v = jnp.swapaxes(values.dequantize(), 1, 2).astype(v_pend.dtype)
  mask = jnp.concatenate([store_mask(mask_store, length), mask_pend], axis=-1)
  return attention(q, jnp.concatenate([k, k_pend], 1), jnp.concatenate([v, v_pend], 1), mask, scale)


kivi_attention.path = lambda: "xla (store dequantized whole)"
