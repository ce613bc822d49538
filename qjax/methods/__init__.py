"""Quantization methods: ``weights/`` (one module per weight method: a per-matrix core ``quantize_weight`` and one
registered model-level handler ``quantize``, see :mod:`qjax.methods.registry`), ``activations/`` (per-token
activation quantizers, SmoothQuant, planted outliers), ``kv/`` (KIVI, KVQuant: each registers one KV-cache setup),
``qat/`` (quantization-aware training: PEQA). Importing this package registers every method; the configs below are what a :class:`qjax.Recipe` holds."""
from __future__ import annotations

from qjax.methods import activations, kv, qat, weights  # noqa: F401  (registration)
from qjax.methods.activations.outliers import OutlierConfig
from qjax.methods.activations.quantizers import ActQuantConfig
from qjax.methods.activations.smoothquant import SmoothQuantConfig
from qjax.methods.kv.kivi import KIVIConfig
from qjax.methods.kv.kvquant import KVQuantConfig
from qjax.methods.qat.config import TrainConfig
from qjax.methods.qat.peqa import PEQAConfig
from qjax.methods.registry import kv_method_for, kv_methods, method_for, methods, register_kv_method, register_method
from qjax.methods.weights.awq import AWQConfig
from qjax.methods.weights.bcq import BCQConfig
from qjax.methods.weights.gptq import GPTQConfig
from qjax.methods.weights.llm_int8 import LLMInt8Config
from qjax.methods.weights.rtn import RTNConfig
from qjax.methods.weights.spqr import SpQRConfig
from qjax.methods.weights.zeroquant import ZeroQuantConfig

__all__ = ["AWQConfig", "ActQuantConfig", "BCQConfig", "GPTQConfig", "KIVIConfig", "KVQuantConfig", "LLMInt8Config",
           "OutlierConfig", "PEQAConfig", "RTNConfig", "SmoothQuantConfig", "SpQRConfig", "TrainConfig", "ZeroQuantConfig", "kv_method_for",
           "kv_methods", "method_for", "methods", "register_kv_method", "register_method"]
