"""LLaMA-family causal LM (LLaMA 1/2/3, Mistral-style GQA): RMSNorm, RoPE (default, linear, llama3 scaling),
grouped-query attention, SwiGLU MLP, tied or untied embeddings. Matches transformers' ``LlamaForCausalLM``."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.models import layers
from qjax.models.attention import SelfAttention
from qjax.models.config import ModelConfig
from qjax.models.decoder import CausalLMModule, DecoderLayerModule, run_decoder


class LlamaMLP(nn.Module):
  config: ModelConfig
  hooks: layers.ActivationHooks
  dtype: jnp.dtype = jnp.float32
  kernel: str = "auto"

  @nn.compact
  def __call__(self, x):
    c = self.config
    lin = lambda n, i, o: layers.Linear(i, o, c.mlp_bias, self.dtype, self.hooks.linear_input, self.kernel, name=n)
    g = lin("gate_proj", c.hidden_size, c.intermediate_size)(x)
    u = lin("up_proj", c.hidden_size, c.intermediate_size)(x)
    return lin("down_proj", c.intermediate_size, c.hidden_size)(jax.nn.silu(g) * u)


class LlamaDecoderLayer(DecoderLayerModule):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``. Returns ``(x, new_layer_cache)``."""

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None):
    c = self.config
    h = layers.RMSNorm(c.hidden_size, c.norm_eps, self.dtype, name="input_layernorm")(x)
    a, layer_cache = SelfAttention(c, "o_proj", c.attention_bias, True, self.hooks, self.dtype, self.index,
                                   self.kernel, name="self_attn")(h, positions, mask, layer_cache, cache_index)
    x = x + a
    h = layers.RMSNorm(c.hidden_size, c.norm_eps, self.dtype, name="post_attention_layernorm")(x)
    return x + LlamaMLP(c, self.hooks, self.dtype, self.kernel, name="mlp")(h), layer_cache


class LlamaModel(nn.Module):
  config: ModelConfig
  hooks: layers.ActivationHooks
  dtype: jnp.dtype = jnp.float32
  kernel: str = "auto"

  def setup(self):
    c = self.config
    self.embed_tokens = layers.Embed(c.vocab_size, c.hidden_size, self.dtype, self.kernel)
    self.layers = [LlamaDecoderLayer(c, self.hooks, self.dtype, i, self.kernel) for i in range(c.num_layers)]
    self.norm = layers.RMSNorm(c.hidden_size, c.norm_eps, self.dtype)

  def embed(self, input_ids, positions):
    """Input of decoder layer 0: ``[b, t, hidden]``."""
    return self.embed_tokens(input_ids)

  def finalize(self, x):
    return self.norm(x)

  def tied_logits(self, x):
    return self.embed_tokens.attend(x)

  def __call__(self, input_ids, attention_mask, positions, cache):
    return run_decoder(self, input_ids, attention_mask, positions, cache)


class LlamaForCausalLM(CausalLMModule):
  """LLaMA causal LM; see :class:`qjax.models.decoder.CausalLMModule` for the call signature."""
  backbone = LlamaModel
