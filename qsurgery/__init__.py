"""qsurgery: find the layers int8 quantization breaks in a PyTorch vision model, fix them by changing the
graph, and prove the fix on your data.

Typical flow::

    import qsurgery
    graph = qsurgery.capture(model, torch.randn(1, 3, 224, 224))
    sim, plan = qsurgery.quantize(graph, calib_loader, qsurgery.QuantConfig.int8())
"""

from .capture import capture
from .detection import CocoImages, coco_map
from .errors import CalibrationError, CaptureError, ConfigError, DataError, ModelLoadError, QSurgeryError
from .evaluate import agreement, predict, top1
from .export import ExportReport, export_onnx
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

__version__ = "0.1.0"

__all__ = [
    "capture", "quantize", "QuantConfig", "TensorFormat", "QuantPlan", "LayerQuant", "SimulatedModel",
    "integer_model", "IntegerModel",
    "predict", "top1", "agreement", "export_onnx", "ExportReport", "coco_map", "CocoImages",
    "QSurgeryError", "CaptureError", "ConfigError", "CalibrationError", "DataError", "ModelLoadError",
    "__version__",
]
