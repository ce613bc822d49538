"""Model sources -> ``(CausalLM, params)``: Hugging Face folders with plain safetensors (:mod:`qjax.io.safetensors`)
or HF GPTQ checkpoints (:mod:`qjax.io.hf_gptq`, loaded as :class:`~qjax.core.formats.qarray.QArray` weights), and
GGUF files (:mod:`qjax.io.gguf_load`, dequantized)."""
from __future__ import annotations

from pathlib import Path

from qjax.core.errors import InputError
from qjax.io import gguf_load, hf_gptq, safetensors
from qjax.models import CausalLM, ModelConfig


def load_model(path, dtype: str = "float32", *, stream: bool = False) -> tuple[CausalLM, dict]:
  """Loads a local HF folder (``config.json`` + safetensors, plain or GPTQ) or a GGUF file -> ``(model, params)``.
  ``stream``: the decoder layers' tensors of a plain safetensors folder or a GGUF file stay on disk as deferred
  leaves (:class:`qjax.io.safetensors.SafetensorsTensor`, :class:`qjax.io.gguf_load.GGUFTensor`), read one
  layer at a time by the layer-wise calibration."""
  if gguf_load.is_gguf(path):
    return gguf_load.load_model(path, dtype, stream=stream)
  if Path(path).is_file():
    raise InputError(f"model path {path} is a file but not a GGUF file (give an HF folder or a .gguf file)")
  config = ModelConfig.from_dir(path)
  model = CausalLM(config, dtype)
  if stream:
    if hf_gptq.is_gptq_checkpoint(path):
      raise InputError(f"{path} is an HF GPTQ checkpoint (already quantized): stream its float source model")
    return model, safetensors.load_params(path, model.param_shapes(), dtype, tied=config.tie_word_embeddings,
                                          defer=model.family.in_layer)
  loader = hf_gptq.load_gptq_params if hf_gptq.is_gptq_checkpoint(path) else safetensors.load_params
  return model, loader(path, model.param_shapes(), dtype, tied=config.tie_word_embeddings)
