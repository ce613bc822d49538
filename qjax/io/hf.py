"""Hugging Face model folders -> ``(CausalLM, params)``: plain safetensors (:mod:`qjax.io.safetensors`) or HF GPTQ
checkpoints (:mod:`qjax.io.hf_gptq`, loaded as :class:`~qjax.core.formats.qarray.QArray` weights)."""
from __future__ import annotations

from qjax.io import hf_gptq, safetensors
from qjax.models import CausalLM, ModelConfig


def load_model(path, dtype: str = "float32") -> tuple[CausalLM, dict]:
  """Loads a local HF folder (``config.json`` + safetensors, plain or GPTQ) -> ``(model, params)``."""
  config = ModelConfig.from_dir(path)
  model = CausalLM(config, dtype)
  loader = hf_gptq.load_gptq_params if hf_gptq.is_gptq_checkpoint(path) else safetensors.load_params
  return model, loader(path, model.param_shapes(), dtype, tied=config.tie_word_embeddings)
