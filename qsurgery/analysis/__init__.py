"""Analysis: which layers int8 breaks (sensitivity), where the error appears and why (layer comparison),
and which predictions it changes (flips)."""

from .flips import FlipReport, prediction_flips
from .layers import LayerError, LayerErrorReport, compare_layers
from .sensitivity import METRICS, SensitivityReport, SensitivityRow, sensitivity

__all__ = ["sensitivity", "SensitivityReport", "SensitivityRow", "METRICS", "compare_layers", "LayerErrorReport",
           "LayerError", "prediction_flips", "FlipReport"]
