"""Model size accounting: bytes actually stored and effective bits per weight."""
from __future__ import annotations

import dataclasses

import numpy as np

from qjax.core import tree
from qjax.core.formats.base import QuantizedTensor


@dataclasses.dataclass(frozen=True)
class SizeReport:
  quantized_bytes: int     # quantized tensors at their stored size + every other tensor at 16 bits
  fp16_bytes: int          # every parameter at 16 bits
  bits_per_weight: float   # over quantized matrices: 8 * (all stored bytes: codes, scales, zeros, ...) / weights
  quantized_weights: int
  total_weights: int

  @property
  def compression(self) -> float:
    return self.fp16_bytes / self.quantized_bytes

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "compression_ratio": self.compression}


def size_report(params) -> SizeReport:
  qbytes = qweights = other = 0
  for leaf in tree.flatten(params).values():
    if isinstance(leaf, QuantizedTensor):
      qbytes += leaf.nbytes
      qweights += leaf.size
    else:
      other += int(np.prod(leaf.shape))
  total = qweights + other
  bpw = 8 * qbytes / qweights if qweights else 16.0
  return SizeReport(qbytes + 2 * other, 2 * total, bpw, qweights, total)
