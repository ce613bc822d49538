"""qjax: quantization of LLaMA- and OPT-family language models in JAX.

The public API (imported lazily, so ``import qjax`` is cheap)::

    loaded = qjax.load("path/to/model")                  # HF folder, HF GPTQ folder or qjax checkpoint
    recipe = qjax.Recipe(weights=(qjax.Rule(r".*/mlp/.*", GPTQConfig(bits=3, group_size=32)),))
    q = qjax.quantize_model(loaded.model, loaded.params, recipe,
                            calibration=qjax.calibration_windows(loaded.model, tokens, 128, 2048))
    qjax.save(q, "out/ckpt", source_dir="path/to/model")
    qjax.quantize_streaming("path/to/model", recipe, windows, "out/ckpt")   # layer by layer, bounded memory

Every method config (weights, activations, KV caches) is importable from :mod:`qjax.methods`. The package
layout, imports flowing one way: ``core`` (errors, trees, packing, quantizer math, stored formats) -> ``kernels``
-> ``models`` -> ``methods`` -> ``calibration`` -> ``api`` -> ``io`` and ``evaluation`` -> ``cli``.
``python -m qjax.quantize`` and ``python -m qjax.generate`` are the command-line entry points (thin modules that
run :mod:`qjax.cli.quantize` / :mod:`qjax.cli.generate`).
"""
from __future__ import annotations

import importlib

_EXPORTS = {"Recipe": "qjax.api", "Rule": "qjax.api", "Quantized": "qjax.api", "quantize_model": "qjax.api",
            "load_recipe": "qjax.api", "dump_recipe": "qjax.api",
            "Calibration": "qjax.calibration", "calibration_windows": "qjax.calibration",
            "Loaded": "qjax.io.quantized", "load": "qjax.io.quantized", "save": "qjax.io.quantized",
            "quantize_streaming": "qjax.io.streaming",
            "perplexity": "qjax.evaluation.perplexity", "InputError": "qjax.core.errors"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'qjax' has no attribute {name!r}")
