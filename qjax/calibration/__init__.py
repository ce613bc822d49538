"""The layer-wise calibration pipeline: calibration windows bound to a model (:class:`Calibration`), the walk over
the decoder layers that every calibration-based method drives through that object, its memory budget and its
frozen reports."""
from __future__ import annotations

from qjax.calibration.layerwise import Calibration, quantize_layerwise, walk_layers
from qjax.calibration.reports import CalibrationReport, LayerReport
from qjax.calibration.windows import calibration_windows, sample_windows

__all__ = ["Calibration", "CalibrationReport", "LayerReport", "calibration_windows", "quantize_layerwise",
           "sample_windows", "walk_layers"]
