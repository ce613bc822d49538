"""What the families share: the decoder-stack loop (masks, positions, per-layer KV caches) and the causal-LM head
(tied or untied output projection). A family supplies a backbone with ``embed``, ``layers``, ``finalize`` and
``tied_logits``."""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from qjax.models import layers
from qjax.models.config import ModelConfig


def window_inputs(seqlen: int):
  """``(positions [1, T], causal mask [1, T, T])`` of one unpadded window of ``T = seqlen`` tokens (what the
  layer-wise calibration feeds each decoder layer)."""
  mask, positions, _, _ = masks_and_positions(jnp.ones((1, seqlen), jnp.int32), None, None)
  return positions, mask


def masks_and_positions(attention_mask, positions, cache):
  """Attention mask, positions and cache bookkeeping for a forward call.

  ``attention_mask [b, t]`` (1 = token, 0 = padding), or without a cache an explicit boolean ``[b, t, t]`` mask
  (query, key; a subset of the causal mask, e.g. several continuations packed after one shared context), which
  needs ``positions``. Default positions count real tokens (left padding gets position 0 repeatedly), offset by the
  tokens already in the cache. Returns ``(mask [b, t, s], positions [b, t]
  int32, new cache validity or None, cache write index or None)``.
  """
  explicit = attention_mask.ndim == 3               # a [b, t, t] mask (packed sequences), with positions
  if explicit and (cache is not None or positions is None):
    raise ValueError("an explicit [b, t, t] attention mask needs positions and no cache")
  if cache is None:
    mask = attention_mask.astype(bool) if explicit else layers.causal_mask(attention_mask)
    valid, index, past = None, None, 0
  else:
    mask, valid = cache.append_mask(attention_mask)
    index = cache.length
    past = jnp.sum(cache.valid, axis=1, keepdims=True)
  if positions is None:
    positions = past + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
  return mask, positions.astype(jnp.int32), valid, index


def run_decoder(backbone, input_ids, attention_mask, positions, cache):
  """``embed -> layers -> finalize`` with per-layer caches. Returns ``(hidden [b, t, d], new cache or None)``."""
  mask, positions, valid, index = masks_and_positions(attention_mask, positions, cache)
  x = backbone.embed(input_ids, positions)
  new_layers = []
  for i, layer in enumerate(backbone.layers):
    x, lc = layer(x, positions, mask, None if cache is None else cache.layers[i], index)
    new_layers.append(lc)
  x = backbone.finalize(x)
  if cache is None:
    return x, None
  return x, type(cache)(tuple(new_layers), valid, cache.length + input_ids.shape[1])


class DecoderLayerModule(nn.Module):
  """Fields every family's decoder layer has: ``__call__(x, positions, mask, layer_cache=None,
  cache_index=None) -> (x, new_layer_cache)``."""
  config: ModelConfig
  hooks: layers.ActivationHooks = layers.ActivationHooks()
  dtype: jnp.dtype = jnp.float32
  index: int = 0          # position in the stack (passed to the ``kv_past`` hook)
  kernel: str = "auto"    # the linears' qmatmul implementation


class CausalLMModule(nn.Module):
  """Backbone (at param path ``model``) + output projection (``lm_head`` or tied to the token embedding).

  ``(input_ids [b, t], attention_mask [b, t] | None, positions [b, t] | None, cache | None) -> (logits float32
  [b, t, vocab], cache)``; ``embed(input_ids, positions)`` gives the input of decoder layer 0.
  """
  config: ModelConfig
  hooks: layers.ActivationHooks = layers.ActivationHooks()
  dtype: jnp.dtype = jnp.float32
  kernel: str = "auto"    # the qmatmul implementation of every linear and of the output projection
  backbone: ClassVar[type]

  def head_features(self) -> int:
    return self.config.hidden_size

  def setup(self):
    c = self.config
    self.model = self.backbone(c, self.hooks, self.dtype, self.kernel)
    if not c.tie_word_embeddings:
      self.lm_head = layers.Linear(self.head_features(), c.vocab_size, False, self.dtype,
                                   implementation=self.kernel)

  def embed(self, input_ids, positions):
    return self.model.embed(input_ids, positions)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x, cache = self.model(input_ids, attention_mask, positions, cache)
    return self.head(x), cache

  def hidden(self, input_ids, mask=None, positions=None):
    """The output projection's input ``[b, t, head_features]`` for unpadded, cache-free ``input_ids [b, t]``
    (or, with ``mask [b, t, t]`` bool and ``positions [b, t]``, packed sequences: see ``masks_and_positions``)."""
    if mask is None:
      mask = jnp.ones(input_ids.shape, jnp.int32)
    return self.model(input_ids, mask, positions, None)[0]

  def head(self, x):
    """float32 logits ``[..., vocab]`` of hidden states ``x [..., head_features]``."""
    logits = self.model.tied_logits(x) if self.config.tie_word_embeddings else self.lm_head(x)
    return logits.astype(jnp.float32)
