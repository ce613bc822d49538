"""Round-to-nearest (RTN) weight quantization.

Per matrix: :func:`quantize_weight` fits one affine range per output row (``group_size=-1``) or per group of
``group_size`` consecutive input columns (the last group may be partial), with the conventions of
:mod:`qjax.core.uniform`, and returns a :class:`~qjax.core.formats.qarray.QArray`. Per model: :func:`quantize` (the registered handler) replaces every
weight whose path matches the config's regex rules (default: every decoder linear of every supported family;
embeddings and ``lm_head`` are untouched unless a rule names them).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qjax.core import uniform
from qjax.core.formats.qarray import QArray
from qjax.core.options import option
from qjax.methods.registry import as_assignment, quantize_each, register_method
from qjax.methods.weights import flags
from qjax.models.families import DECODER_LINEARS


@dataclasses.dataclass(frozen=True)
class RTNConfig:
  bits: int = option(4, flags.BITS)
  group_size: int = option(-1, flags.GROUP_SIZE)
  sym: bool = option(False, flags.SYM)
  scale_dtype: str = "float16"        # storage type of the per-group scales
  targets: tuple[str, ...] = DECODER_LINEARS  # regexes (full match) over parameter paths

  def __post_init__(self):
    uniform.check_grid(self.bits, self.group_size, "RTN")


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "sym", "scale_dtype"))
def quantize_weight(w: jax.Array, *, bits: int, group_size: int = -1, sym: bool = False,
                    scale_dtype: str | None = None) -> QArray:
  """RTN-quantizes ``w [out_features, in_features]``.

  Returns a QArray whose ``dequantize()`` is ``[out, in]`` in ``w.dtype``; scales are stored in ``scale_dtype``
  (default ``w.dtype``; with float32 the dequantized matrix equals the reference fake quantizer bit for bit).
  """
  wg = uniform.to_groups(w.astype(jnp.float32), group_size)        # [out, G, g]
  scale, zero = uniform.fit(wg, bits, sym)                          # [out, G, 1]
  q = uniform.from_groups(uniform.quantize(wg, scale, zero, bits), w.shape[1])
  return QArray.from_codes(q.astype(jnp.uint8), scale[..., 0], zero[..., 0], bits=bits, group_size=group_size,
                           sym=sym, dtype=w.dtype, scale_dtype=scale_dtype or w.dtype)


@register_method(RTNConfig, name="rtn", decoder_only=False)
def quantize(params, rules=RTNConfig(), *, model=None, calibration=None, progress: bool = True):
  """``(params, None)``: every weight of ``rules`` (a config on its targets, or ``{path: config}``) replaced by
  its RTN QArray (the registered handler, :mod:`qjax.methods.registry`)."""
  assignment = as_assignment(params, rules)
  return quantize_each(params, assignment, lambda w, c: quantize_weight(
      w, bits=c.bits, group_size=c.group_size, sym=c.sym, scale_dtype=c.scale_dtype),
      desc=_desc("RTN", assignment), progress=progress), None


def _desc(name, assignment) -> str:
  return f"{name} " + "/".join(sorted({f"W{c.bits}" for c in assignment.values()}))
