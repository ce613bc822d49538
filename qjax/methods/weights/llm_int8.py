"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 weights and activations with a mixed-precision
decomposition for outlier features.

:func:`quantize_weight` stores each output row as ``codes = round(127 w / max|w[o]|)`` (int8) with
``scale = max|w[o]| / 127`` in an :class:`~qjax.core.formats.int8.LLMInt8Array` carrying the outlier ``threshold``; at run
time :func:`qjax.kernels.int8_matmul.llm_int8_matmul` multiplies the input columns holding any ``|x| >=
threshold`` in float (against the int8-dequantized weight, as bitsandbytes does) and the rest in int8 with
per-token absmax scales. Embeddings and ``lm_head`` stay in float, as with transformers' ``load_in_8bit``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qjax.core import uniform
from qjax.core.errors import InputError
from qjax.core.formats.int8 import LLMInt8Array
from qjax.core.options import Flag, option
from qjax.methods.registry import as_assignment, quantize_each, register_method
from qjax.models.families import DECODER_LINEARS


@dataclasses.dataclass(frozen=True)
class LLMInt8Config:
  threshold: float = option(6.0, Flag("--int8-threshold", "outlier feature threshold"))
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    if not self.threshold > 0:
      raise InputError(f"LLM.int8 threshold must be positive, got {self.threshold}")


@functools.partial(jax.jit, static_argnames=("threshold",))
def quantize_weight(w: jax.Array, *, threshold: float = 6.0) -> LLMInt8Array:
  """Vector-wise (per output row) absmax int8 quantization of ``w [out, in]``."""
  codes, scale = uniform.absmax_int8(w)
  return LLMInt8Array(codes, scale, shape=w.shape, threshold=float(threshold), dtype=jnp.dtype(w.dtype).name)


@register_method(LLMInt8Config, name="llm_int8", decoder_only=False)
def quantize(params, rules=LLMInt8Config(), *, model=None, calibration=None, progress: bool = True):
  """``(params, None)``: every weight of ``rules`` replaced by its :class:`~qjax.core.formats.int8.LLMInt8Array`."""
  return quantize_each(params, as_assignment(params, rules), lambda w, c: quantize_weight(w, threshold=c.threshold),
                       desc="LLM.int8", progress=progress), None
