"""Flax LLaMA and OPT causal LMs, Hugging Face loading, KV caches.

``load(path)`` returns a :class:`CausalLM` (architecture + family map, no weights) and its parameter pytree.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn

from qjax import hf_gptq
from qjax.models import hf
from qjax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from qjax.models.families import FAMILIES, Family
from qjax.models.layers import ActivationHooks
from qjax.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from qjax.models.opt import OPTDecoderLayer, OPTForCausalLM

_CLASSES = {"llama": (LlamaForCausalLM, LlamaDecoderLayer), "opt": (OPTForCausalLM, OPTDecoderLayer)}

__all__ = ["CausalLM", "ModelConfig", "ActivationHooks", "load", "SUPPORTED_MODEL_TYPES"]


@dataclasses.dataclass(frozen=True)
class CausalLM:
  """A model architecture: config, compute dtype, activation hooks and the family's declarative map."""
  config: ModelConfig
  dtype: str = "float32"
  hooks: ActivationHooks = ActivationHooks()

  @property
  def family(self) -> Family:
    return FAMILIES[self.config.family]

  @property
  def module(self) -> nn.Module:
    return _CLASSES[self.config.family][0](self.config, self.hooks, hf.DTYPES[self.dtype])

  def layer_module(self) -> nn.Module:
    """One decoder layer as a standalone module: ``apply({"params": layer_params}, x, positions, mask)``."""
    return _CLASSES[self.config.family][1](self.config, self.hooks, hf.DTYPES[self.dtype])

  def apply(self, params, input_ids, attention_mask=None, positions=None, cache=None):
    """``(logits float32 [b, t, vocab], cache)``; see :class:`qjax.models.llama.LlamaForCausalLM`."""
    return self.module.apply({"params": params}, input_ids, attention_mask, positions, cache)

  def embed(self, params, input_ids, positions):
    """Input of decoder layer 0 ``[b, t, hidden]`` for ``input_ids, positions [b, t]``."""
    return self.module.apply({"params": params}, input_ids, positions, method="embed")

  def with_hooks(self, hooks: ActivationHooks) -> "CausalLM":
    return dataclasses.replace(self, hooks=hooks)


def load(path, dtype: str = "float32") -> tuple[CausalLM, dict]:
  """Loads a local HF folder (``config.json`` + safetensors) -> ``(model, params)``."""
  config = ModelConfig.from_dir(path)
  model = CausalLM(config, dtype)
  loader = hf_gptq.load_gptq_params if hf_gptq.is_gptq_checkpoint(path) else hf.load_params
  params = loader(path, hf.abstract_shapes(model.module, hf.DTYPES[dtype]), dtype, tied=config.tie_word_embeddings)
  return model, params
