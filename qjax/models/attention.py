"""Self-attention block shared by the families (projection names and RoPE come from the family)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qjax.models import layers
from qjax.models.config import ModelConfig


class SelfAttention(nn.Module):
  """q/k/v projections, optional RoPE on q and k, grouped-query attention, output projection.

  ``x [b, t, hidden]``, ``positions [b, t]`` int, ``mask [b, t, s]`` bool. Without a cache ``s = t`` and the mask
  is causal (:func:`qjax.models.decoder.masks_and_positions`; attention skips the hidden keys); with a
  layer cache (see :mod:`qjax.models.kv_cache`) the new keys (before RoPE, with the rotation to apply) and
  values are written at ``cache_index`` and attention reads the cache's ``s = max_len`` slots. Without a cache
  and with the ``kv_past`` hook, that hook computes the attention (quantized-cache simulation). Returns
  ``(y [b, t, hidden], new_layer_cache)``.
  """
  config: ModelConfig
  out_name: str
  use_bias: bool
  rope: bool
  hooks: layers.ActivationHooks
  dtype: jnp.dtype = jnp.float32
  layer: int = 0          # decoder layer index (per-layer KV quantizers of the ``kv_past`` hook)
  kernel: str = "auto"    # the kernel implementation of the linears (qmatmul) and of the cache's attention

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None):
    c = self.config
    b, t, _ = x.shape
    h, kvh, d = c.num_heads, c.num_kv_heads, c.head_dim
    lin = lambda n, i, o: layers.Linear(i, o, self.use_bias, self.dtype, self.hooks.linear_input, self.kernel,
                                        name=n)
    q = lin("q_proj", c.hidden_size, h * d)(x).reshape(b, t, h, d)
    k = lin("k_proj", c.hidden_size, kvh * d)(x).reshape(b, t, kvh, d)
    v = lin("v_proj", c.hidden_size, kvh * d)(x).reshape(b, t, kvh, d)
    rope = None
    if self.rope:
      inv = layers.rope_inv_freq(d, c.rope_theta, c.rope_scaling_dict)
      rope = lambda x, pos: layers.apply_rope(x, pos, inv)
      q = rope(q, positions)
    if layer_cache is not None:
      o, layer_cache = layer_cache.attend(q, k, v, index=cache_index, positions=positions, rope=rope, mask=mask,
                                          scale=d**-0.5, hooks=self.hooks,
                                          implementation=self.kernel)
      return lin(self.out_name, h * d, c.hidden_size)(o.reshape(b, t, h * d)), layer_cache
    if self.hooks.kv_past is not None:
      o = self.hooks.kv_past(q, k, v, positions, mask, d**-0.5, rope, self.layer).reshape(b, t, h * d)
      return lin(self.out_name, h * d, c.hidden_size)(o), None
    if rope is not None:
      k = rope(k, positions)
    o = layers.attention(q, k, v, mask, d**-0.5, self.hooks, causal=True).reshape(b, t, h * d)
    return lin(self.out_name, h * d, c.hidden_size)(o), None
