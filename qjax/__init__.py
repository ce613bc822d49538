"""qjax: quantization of LLaMA- and OPT-family language models in JAX.

The public API (imported lazily, so ``import qjax`` is cheap)::

    loaded = qjax.load("path/to/model")                  # HF folder, HF GPTQ folder or qjax checkpoint
    recipe = qjax.Recipe(weights=(qjax.Rule(r".*/mlp/.*", GPTQConfig(bits=3, group_size=32)),))
    q = qjax.quantize_model(loaded.model, loaded.params, recipe,
                            calibration=qjax.calibration_windows(loaded.model, tokens, 128, 2048))
    qjax.save(q, "out/ckpt", source_dir="path/to/model")

Method configs live in :mod:`qjax.methods` (weights), :mod:`qjax.act_quant` (activations) and
:mod:`qjax.methods.kivi` / :mod:`qjax.methods.kvquant` (KV caches). ``python -m qjax.quantize`` and
``python -m qjax.generate`` are the command-line entry points (the modules ``qjax.quantize`` / ``qjax.generate``).
"""
from __future__ import annotations

import importlib

_EXPORTS = {"Recipe": "qjax.api", "Rule": "qjax.api", "Quantized": "qjax.api", "Loaded": "qjax.api",
            "quantize_model": "qjax.api", "calibration_windows": "qjax.api", "load": "qjax.api", "save": "qjax.api",
            "load_recipe": "qjax.api", "dump_recipe": "qjax.api", "InputError": "qjax.errors"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'qjax' has no attribute {name!r}")
