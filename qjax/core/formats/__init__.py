"""Stored formats: every quantized tensor type qjax writes, reads or computes with, in one place.

``base`` (the :class:`QuantizedTensor` base and its type registry), ``qarray`` (uniform integer codes with group
scales: RTN, GPTQ, AWQ, ZeroQuant), ``int8`` (W8A8 and LLM.int8 weights), ``spqr`` (SpQR), ``bcq`` (binary-coding
quantization, LUT-GEMM), ``kv`` (KIVI and KVQuant cache tensors), ``nf4`` (QLoRA's NormalFloat-4 with
double-quantized scales). Importing this package registers every type; checkpoints resolve stored type names only
against this registry.
"""
from __future__ import annotations

from qjax.core.formats import bcq, int8, kv, nf4, spqr  # noqa: F401  (registers the types)
from qjax.core.formats.base import QUANTIZED_TYPES, QuantizedTensor, is_quantized, register_quantized
from qjax.core.formats.bcq import BCQArray
from qjax.core.formats.nf4 import NF4Array
from qjax.core.formats.qarray import QArray

__all__ = ["BCQArray", "NF4Array", "QArray", "QUANTIZED_TYPES", "QuantizedTensor", "is_quantized", "register_quantized"]
