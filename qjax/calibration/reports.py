"""Frozen reports of the layer-wise calibration pipeline, JSON-able through ``to_dict()``."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LayerReport:
  layer: int
  seconds: float
  output_rel_error: float | None   # ||layer_q(x) - layer_fp(x)||^2 / ||layer_fp(x)||^2 on the calibration inputs
  #                                  (None unless the calibration asked for a layer report)
  linear_losses: dict[str, float]  # method-specific per-linear loss (GPTQ: sum of column losses)

  def to_dict(self) -> dict:
    return {"layer": self.layer, "seconds": self.seconds, "output_rel_error": self.output_rel_error,
            "linear_losses": dict(self.linear_losses)}


@dataclasses.dataclass(frozen=True)
class CalibrationReport:
  layers: tuple[LayerReport, ...]
  seconds: float
  peak_host_bytes: int
  activation_bytes: int            # held activations: inputs + outputs of one layer

  def to_dict(self) -> dict:
    """JSON-able: the totals and one entry per layer."""
    return {"seconds": self.seconds, "peak_host_bytes": self.peak_host_bytes,
            "activation_bytes": self.activation_bytes, "layers": [l.to_dict() for l in self.layers]}
