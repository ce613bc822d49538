"""Weight quantization methods, one module each (RTN, GPTQ, SpQR, AWQ, ZeroQuant, LLM.int8): the per-matrix core
``quantize_weight(w [out, in], ...)`` and the registered model-level handler
``quantize(params, rules, *, model, calibration, progress) -> (params, report)``."""
from __future__ import annotations

from qjax.methods.weights import awq, bcq, gptq, llm_int8, rtn, spqr, zeroquant  # noqa: F401  (registration)
