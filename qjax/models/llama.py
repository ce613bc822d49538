"""LLaMA-family causal LM (LLaMA 1/2/3, Mistral-style GQA): RMSNorm, RoPE (default, linear, llama3 scaling),
grouped-query attention, SwiGLU MLP, tied or untied embeddings. Matches transformers' ``LlamaForCausalLM``."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.models import layers
from qjax.models.attention import SelfAttention, finish_cache, jax_ones, masks_and_positions
from qjax.models.config import ModelConfig


class LlamaMLP(nn.Module):
  config: ModelConfig
  hooks: layers.ActivationHooks
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    lin = lambda n, i, o: layers.Linear(i, o, c.mlp_bias, self.dtype, self.hooks.linear_input, name=n)
    g = lin("gate_proj", c.hidden_size, c.intermediate_size)(x)
    u = lin("up_proj", c.hidden_size, c.intermediate_size)(x)
    return lin("down_proj", c.intermediate_size, c.hidden_size)(jax.nn.silu(g) * u)


class LlamaDecoderLayer(nn.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``. Returns ``(x, new_layer_cache)``."""
  config: ModelConfig
  hooks: layers.ActivationHooks = layers.ActivationHooks()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None):
    c = self.config
    h = layers.RMSNorm(c.hidden_size, c.norm_eps, self.dtype, name="input_layernorm")(x)
    a, layer_cache = SelfAttention(c, "o_proj", c.attention_bias, True, self.hooks, self.dtype,
                                   name="self_attn")(h, positions, mask, layer_cache, cache_index)
    x = x + a
    h = layers.RMSNorm(c.hidden_size, c.norm_eps, self.dtype, name="post_attention_layernorm")(x)
    return x + LlamaMLP(c, self.hooks, self.dtype, name="mlp")(h), layer_cache


class LlamaModel(nn.Module):
  config: ModelConfig
  hooks: layers.ActivationHooks
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.embed_tokens = layers.Embed(c.vocab_size, c.hidden_size, self.dtype)
    self.layers = [LlamaDecoderLayer(c, self.hooks, self.dtype) for _ in range(c.num_layers)]
    self.norm = layers.RMSNorm(c.hidden_size, c.norm_eps, self.dtype)

  def embed(self, input_ids, positions):
    """Input of decoder layer 0: ``[b, t, hidden]``."""
    return self.embed_tokens(input_ids)

  def __call__(self, input_ids, attention_mask, positions, cache):
    mask, positions, valid, index = masks_and_positions(attention_mask, positions, cache)
    x = self.embed(input_ids, positions)
    new_layers = []
    for i, layer in enumerate(self.layers):
      x, lc = layer(x, positions, mask, None if cache is None else cache.layers[i], index)
      new_layers.append(lc)
    return self.norm(x), finish_cache(cache, new_layers, valid, input_ids.shape[1])


class LlamaForCausalLM(nn.Module):
  """``(input_ids [b, t], attention_mask [b, t] | None, positions | None, cache | None) -> (logits float32
  [b, t, vocab], cache)``."""
  config: ModelConfig
  hooks: layers.ActivationHooks = layers.ActivationHooks()
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.model = LlamaModel(c, self.hooks, self.dtype)
    if not c.tie_word_embeddings:
      self.lm_head = layers.Linear(c.hidden_size, c.vocab_size, False, self.dtype)

  def embed(self, input_ids, positions):
    return self.model.embed(input_ids, positions)

  def __call__(self, input_ids, attention_mask=None, positions=None, cache=None):
    if attention_mask is None:
      attention_mask = jax_ones(input_ids)
    x, cache = self.model(input_ids, attention_mask, positions, cache)
    if self.config.tie_word_embeddings:
      logits = self.model.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32), cache
