"""OPT causal LM: learned positions with OPT's offset of 2, pre-LN (most sizes) or post-LN (OPT-350m) blocks,
ReLU FFN, biases, ``project_in``/``project_out`` when ``word_embed_proj_dim != hidden_size``, tied lm_head.
Matches transformers' ``OPTForCausalLM``."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.models import layers
from qjax.models.attention import SelfAttention
from qjax.models.config import ModelConfig
from qjax.models.decoder import CausalLMModule, DecoderLayerModule, run_decoder

POSITION_OFFSET = 2

_ACTS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "gelu_new": lambda x: jax.nn.gelu(x, approximate=True)}


class OPTDecoderLayer(DecoderLayerModule):
  """``x + attn(ln(x))`` and ``x + fc2(act(fc1(ln(x))))`` (pre-LN), or LN after each residual sum (post-LN)."""

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None):
    c = self.config
    pre = c.do_layer_norm_before
    ln = lambda n: layers.LayerNorm(c.hidden_size, c.norm_eps, c.layer_norm_affine, self.dtype, name=n)
    attn_ln, ffn_ln = ln("self_attn_layer_norm"), ln("final_layer_norm")
    a, layer_cache = SelfAttention(c, "out_proj", c.enable_bias, False, self.hooks, self.dtype, self.index,
                                   self.kernel, name="self_attn")(attn_ln(x) if pre else x, positions, mask, layer_cache,
                                                     cache_index)
    x = x + a
    if not pre:
      x = attn_ln(x)
    h = ffn_ln(x) if pre else x
    lin = lambda n, i, o: layers.Linear(i, o, c.enable_bias, self.dtype, self.hooks.linear_input, self.kernel, name=n)
    h = lin("fc2", c.intermediate_size, c.hidden_size)(_ACTS[c.hidden_act](lin("fc1", c.hidden_size,
                                                                             c.intermediate_size)(h)))
    x = x + h
    return (x if pre else ffn_ln(x)), layer_cache


class OPTDecoder(nn.Module):
  config: ModelConfig
  hooks: layers.ActivationHooks
  dtype: jnp.dtype = jnp.float32
  kernel: str = "auto"

  def setup(self):
    c = self.config
    self.embed_tokens = layers.Embed(c.vocab_size, c.word_embed_proj_dim, self.dtype, self.kernel)
    self.embed_positions = layers.Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, self.dtype)
    self.projected = c.word_embed_proj_dim != c.hidden_size
    if self.projected:
      self.project_in = layers.Linear(c.word_embed_proj_dim, c.hidden_size, False, self.dtype,
                                      implementation=self.kernel)
      self.project_out = layers.Linear(c.hidden_size, c.word_embed_proj_dim, False, self.dtype,
                                       implementation=self.kernel)
    self.layers = [OPTDecoderLayer(c, self.hooks, self.dtype, i, self.kernel) for i in range(c.num_layers)]
    if c.final_layer_norm:
      self.final_layer_norm = layers.LayerNorm(c.hidden_size, c.norm_eps, c.layer_norm_affine, self.dtype)

  def embed(self, input_ids, positions):
    """Input of decoder layer 0: token embedding (projected in) + learned position embedding."""
    x = self.embed_tokens(input_ids)
    if self.projected:
      x = self.project_in(x)
    return x + self.embed_positions(positions + POSITION_OFFSET)

  def finalize(self, x):
    if self.config.final_layer_norm:
      x = self.final_layer_norm(x)
    return self.project_out(x) if self.projected else x

  def tied_logits(self, x):
    return self.embed_tokens.attend(x)

  def __call__(self, input_ids, attention_mask, positions, cache):
    return run_decoder(self, input_ids, attention_mask, positions, cache)


class OPTModel(nn.Module):
  config: ModelConfig
  hooks: layers.ActivationHooks
  dtype: jnp.dtype = jnp.float32
  kernel: str = "auto"

  def setup(self):
    self.decoder = OPTDecoder(self.config, self.hooks, self.dtype, self.kernel)

  def embed(self, input_ids, positions):
    return self.decoder.embed(input_ids, positions)

  def tied_logits(self, x):
    return self.decoder.tied_logits(x)

  def __call__(self, *args):
    return self.decoder(*args)


class OPTForCausalLM(CausalLMModule):
  """OPT causal LM; see :class:`qjax.models.decoder.CausalLMModule` for the call signature."""
  backbone = OPTModel

  def head_features(self) -> int:
    return self.config.word_embed_proj_dim
