"""LoRA adapters on their own, in the PEFT layout (what ``peft.PeftModel.from_pretrained`` reads):

    adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight [r, in], .lora_B.weight [out, r]

:func:`save_adapters` writes the adapters of every :class:`~qjax.core.formats.nf4.NF4LoRAArray` (QLoRA's result)
atomically; :func:`load_adapters` attaches saved adapters to a model's weights again (NF4 bases become
NF4LoRAArrays, float weights the merged dense matrix), checking names and shapes first.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from qjax.core import tree
from qjax.core.errors import InputError
from qjax.core.formats.base import is_quantized
from qjax.core.formats.nf4 import NF4Array, NF4LoRAArray
from qjax.io.checkpoint import atomic_dir, check_destination
from qjax.models.families import hf_to_path, path_to_hf

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def _key(path: str, which: str) -> str:
  return f"base_model.model.{path_to_hf(path).removesuffix('.weight')}.lora_{which}.weight"


def save_adapters(dest, params, *, dropout: float = 0.0, base_model: str | None = None,
                  overwrite: bool = False) -> dict:
  """Writes the adapters of ``params``' NF4LoRAArray leaves to the folder ``dest``; returns a summary (path,
  adapter count, parameters, bytes)."""
  dest = check_destination(dest, overwrite, "adapter folder")
  tensors, rank, scale, modules = {}, set(), set(), set()
  for p, v in tree.flatten(params).items():
    if isinstance(v, NF4LoRAArray):
      tensors[_key(p, "A")] = np.asarray(v.lora_a, np.float32)
      tensors[_key(p, "B")] = np.asarray(v.lora_b, np.float32)
      rank.add(int(v.lora_a.shape[0]))
      scale.add(v.lora_scale)
      modules.add(p.split("/")[-2])
  if not tensors:
    raise InputError("no LoRA adapters in this model (QLoRA's result holds them)")
  if len(rank) > 1 or len(scale) > 1:
    raise InputError("the adapters differ in rank or scale: one adapter_config.json cannot describe them")
  r = rank.pop()
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": scale.pop() * r,
            "lora_dropout": dropout, "target_modules": sorted(modules), "bias": "none", "inference_mode": True,
            "base_model_name_or_path": base_model, "fan_in_fan_out": False}
  with atomic_dir(dest) as tmp:
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(config, indent=1))
  return {"path": str(dest), "adapters": len(tensors) // 2, "parameters": int(sum(t.size for t in tensors.values())),
          "bytes": int(sum(t.nbytes for t in tensors.values()))}


def load_adapters(src, params):
  """``params`` with the adapters of the folder ``src`` attached: an NF4 weight becomes an NF4LoRAArray, a float
  weight ``W + (alpha / r) B A`` (merged). Fails (InputError) for a missing file, an adapter without a matching
  weight, or mismatched shapes."""
  src = Path(src)
  if not (src / CONFIG).is_file() or not (src / WEIGHTS).is_file():
    raise InputError(f"{src} is not a LoRA adapter folder (needs {CONFIG} and {WEIGHTS})")
  try:
    config = json.loads((src / CONFIG).read_text())
    tensors = load_file(str(src / WEIGHTS))
    scale = float(config["lora_alpha"]) / int(config["r"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"adapter folder {src} cannot be read ({e})") from None
  flat = tree.flatten(params)
  pairs = {}
  for key, t in tensors.items():
    m = _KEY.fullmatch(key)
    if m is None:
      raise InputError(f"adapter folder {src}: unexpected tensor {key}")
    pairs.setdefault(hf_to_path(m.group(1)) + "/weight", {})[m.group(2)] = t
  for p, ab in pairs.items():
    w = flat.get(p)
    if w is None or set(ab) != {"A", "B"}:
      raise InputError(f"adapter folder {src}: no weight {p} in the model, or its lora_A / lora_B is missing")
    a, b = ab["A"], ab["B"]
    if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
      raise InputError(f"adapter folder {src}: {p} adapter shapes {a.shape}, {b.shape} do not fit {w.shape}")
    if isinstance(w, NF4Array):
      fields = {f.name: getattr(w, f.name) for f in dataclasses.fields(NF4Array)}
      flat[p] = NF4LoRAArray(**fields, lora_a=jnp.asarray(a), lora_b=jnp.asarray(b), lora_scale=scale)
    elif is_quantized(w):
      raise InputError(f"adapter folder {src}: {p} is a {type(w).__name__}; adapters attach to NF4 or float weights")
    else:
      flat[p] = (jnp.asarray(w, jnp.float32) + scale * (jnp.asarray(b) @ jnp.asarray(a))).astype(w.dtype)
  return tree.unflatten(flat)
