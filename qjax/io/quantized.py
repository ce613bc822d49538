"""Loading any model folder into a :class:`Loaded` record, and saving a :class:`~qjax.api.pipeline.Quantized`
model as a qjax checkpoint with its recipe."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from qjax.api.pipeline import Quantized, method_record
from qjax.api.recipe import Recipe
from qjax.io import assets, checkpoint, gguf_load, hf, hf_gptq
from qjax.io import text as data
from qjax.models import CausalLM, ModelConfig


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What :func:`load` returns: the architecture, the parameters (float, or quantized for a checkpoint), the
  tokenizer, and for an already quantized source its metadata (``None`` for a float model)."""
  model: CausalLM
  params: dict
  tokenizer: object
  meta: dict | None = None

  @property
  def recipe(self) -> Recipe | None:
    """The recipe a qjax checkpoint was made with (None when it records none)."""
    d = (self.meta or {}).get("recipe")
    return None if d is None else Recipe.from_dict(d)


def load(path, dtype: str = "float32") -> Loaded:
  """A model: a qjax checkpoint folder (``qjax.json``: quantized tensors rebuilt from qjax's own types only), an
  HF folder (float safetensors, or an HF GPTQ checkpoint as QArrays), a GGUF file (dequantized), or a named model
  (``"smollm2-135m"``, ``"stories260k"``)."""
  path = assets.model_path(path)
  if gguf_load.is_gguf(path):
    model, params = gguf_load.load_model(path, dtype)
    return Loaded(model, params, data.load_tokenizer(gguf_load.hf_view(path)), None)
  if (path / "qjax.json").is_file():
    meta = checkpoint.read_meta(path)
    model = CausalLM(ModelConfig.from_dir(path), meta["dtype"])
    params, meta = checkpoint.load_params(path)
    return Loaded(model, params, data.load_tokenizer(path), meta)
  model, params = hf.load_model(path, dtype)
  qc = hf_gptq.quantization_config_of(path)
  meta = None if qc is None else {"method": {"name": "hf-gptq", "config": qc}}
  return Loaded(model, params, data.load_tokenizer(path), meta)


def layer_paths(model: CausalLM) -> tuple[str, ...]:
  """The decoder layers' subtrees, each its own part of a checkpoint."""
  return tuple(model.family.layer_path(i) for i in range(model.config.num_layers))


def save(q: Quantized, path, *, source_dir, overwrite: bool = False, method: dict | None = None) -> Path:
  """Writes ``q`` as a qjax checkpoint (atomically; the recipe, and a KVQuant calibration, travel with it);
  ``source_dir``: the float model's folder (its config and tokenizer files are copied); ``method``: the record of
  what ran (default :func:`~qjax.api.pipeline.method_record`; a model re-saved after loading keeps its own).
  ``source_dir`` may also be the GGUF file (or named model) the model came from: its cached HF view is used."""
  source = assets.model_path(source_dir)
  source_dir = gguf_load.hf_view(source) if gguf_load.is_gguf(source) else source
  return checkpoint.save(path, q.params, source_dir=source_dir, dtype=q.model.dtype,
                         method=method_record(q) if method is None else method,
                         overwrite=overwrite, recipe=q.recipe.to_dict(), layer_paths=layer_paths(q.model),
                         kv_calibration=q.kv.calibration.to_dict() if q.kv and q.kv.calibration else None)
