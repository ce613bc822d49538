"""Quantization-aware training: fake quantizers with straight-through and learned-step-size gradients
(``fake_quant``), the shared training settings (``config``; the trainer itself is
:mod:`qjax.calibration.training`), the objectives (``objectives``) and one module per method, each registering a
weight method: LLM-QAT (``llm_qat``), PEQA (``peqa``), L4Q (``l4q``), QLoRA (``qlora``)."""
from __future__ import annotations

from qjax.methods.qat import l4q, llm_qat, peqa, qlora  # noqa: F401  (registration)
