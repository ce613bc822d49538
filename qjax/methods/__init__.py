"""Quantization methods, one module per method: a per-matrix core (``quantize_weight``) and, for weight methods,
one registered model-level handler (``quantize``, see :mod:`qjax.methods.registry`). Importing this package
registers every weight method."""
from __future__ import annotations

from qjax.methods import awq, gptq, kivi, kvquant, llm_int8, rtn, spqr, zeroquant  # noqa: F401  (registration)
from qjax.methods.awq import AWQConfig
from qjax.methods.gptq import GPTQConfig
from qjax.methods.llm_int8 import LLMInt8Config
from qjax.methods.registry import kv_method_for, kv_methods, method_for, methods, register_kv_method, register_method
from qjax.methods.rtn import RTNConfig
from qjax.methods.spqr import SpQRConfig
from qjax.methods.zeroquant import ZeroQuantConfig

__all__ = ["AWQConfig", "GPTQConfig", "LLMInt8Config", "RTNConfig", "SpQRConfig", "ZeroQuantConfig", "kv_method_for",
           "kv_methods", "method_for", "methods", "register_kv_method", "register_method"]
