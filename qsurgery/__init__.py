"""qsurgery: find the layers int8 quantization breaks in a PyTorch vision model, fix them by changing the
graph, and prove the fix on your data.

Typical flow::

    import qsurgery
    result = qsurgery.repair(model, calib_images, (eval_images, eval_labels),
                             budget=qsurgery.Budget(max_drop=1.0, metric="top1"), target="per-tensor-int8")
    print(result.headline())
"""

from .capture import capture
from .detection import CocoImages, coco_map
from .errors import CalibrationError, CaptureError, ConfigError, DataError, ModelLoadError, QSurgeryError
from .evaluate import agreement, predict, top1
from .export import ExportReport, export_onnx
from .io import load, save
from .quant import (
    IntegerModel,
    LayerQuant,
    QuantConfig,
    QuantPlan,
    SimulatedModel,
    TensorFormat,
    integer_model,
    quantize,
)
from .repair import REMEDIES, Budget, RepairError, RepairResult, repair
from .targets import TARGETS, Target, get_target

__version__ = "0.1.0"

__all__ = [
    "capture", "quantize", "QuantConfig", "TensorFormat", "QuantPlan", "LayerQuant", "SimulatedModel",
    "integer_model", "IntegerModel",
    "predict", "top1", "agreement", "export_onnx", "ExportReport", "coco_map", "CocoImages",
    "repair", "Budget", "RepairResult", "REMEDIES", "RepairError", "Target", "TARGETS", "get_target",
    "save", "load",
    "QSurgeryError", "CaptureError", "ConfigError", "CalibrationError", "DataError", "ModelLoadError",
    "__version__",
]
