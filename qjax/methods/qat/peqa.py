"""PEQA (Kim et al. 2023, "Memory-Efficient Fine-Tuning of Compressed Large Language Models via sub-4-bit Integer
Quantization"): quantize with RTN, freeze the integer codes (and zero points), and train only the quantization
scales on a task text.

Per matrix ``W ~= s (Q - z)`` with ``Q [out, in]`` and ``z [out, G]`` frozen after RTN and ``s [out, G]``
(per channel or per group, float32 while training) the only trainable parameters: ``G * out`` numbers per linear,
under 1% of the weights. The loss is next-token cross-entropy on the calibration windows (the task text); the
trainer is :meth:`qjax.calibration.Calibration.train`. The result is the RTN :class:`QArray` with the trained
scales stored in ``scale_dtype``, so it runs, saves and exports like any QArray.
"""
from __future__ import annotations

import dataclasses

from qjax.core import tree, uniform
from qjax.core.errors import InputError
from qjax.core.options import option
from qjax.methods.qat import objectives
from qjax.methods.qat.config import TrainConfig
from qjax.methods.registry import register_method
from qjax.methods.weights import flags, rtn
from qjax.models.families import DECODER_LINEARS


@dataclasses.dataclass(frozen=True, kw_only=True)
class PEQAConfig:
  bits: int = option(4, flags.BITS)
  group_size: int = option(-1, flags.GROUP_SIZE)
  sym: bool = option(False, flags.SYM)
  scale_dtype: str = "float16"          # storage type of the trained scales
  train: TrainConfig = TrainConfig(steps=100, lr=1e-4, warmup=10)
  targets: tuple[str, ...] = DECODER_LINEARS

  def __post_init__(self):
    uniform.check_grid(self.bits, self.group_size, "PEQA")
    if not isinstance(self.train, TrainConfig):
      raise InputError(f"PEQA train must be a TrainConfig, got {type(self.train).__name__}")


@register_method(PEQAConfig, name="peqa", needs_calibration=True, mixed=False)
def quantize(params, rules=PEQAConfig(), *, model=None, calibration=None, progress: bool = True):
  """``(params, TrainReport)``: RTN on every weight of ``rules``, then the scales trained on
  ``calibration``'s windows with the codes frozen (the registered handler)."""
  assignment, cfg = objectives.one_config(params, rules, calibration, "PEQA")
  flat = tree.flatten(params)
  start = {p: rtn.quantize_weight(flat[p], bits=c.bits, group_size=c.group_size, sym=c.sym, scale_dtype="float32")
           for p, c in assignment.items()}
  scales, report = objectives.train_weights(
      params, start, {p: q.scale for p, q in start.items()},
      lambda q, scale: dataclasses.replace(q, scale=scale).dequantize(), model=model or calibration.model,
      calibration=calibration, config=cfg.train, desc=f"PEQA W{cfg.bits}", progress=progress)
  out = {p: dataclasses.replace(q, scale=scales[p].astype(assignment[p].scale_dtype)) for p, q in start.items()}
  return tree.replace(params, assignment, lambda p, _: out[p]), report
