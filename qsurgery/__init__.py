"""qsurgery: find the layers int8 quantization breaks in a PyTorch vision model, fix them by changing the
graph, and prove the fix on your data.

Typical flow::

    import qsurgery
    result = qsurgery.repair(model, calib_images, (eval_images, eval_labels),
                             budget=qsurgery.Budget(max_drop=1.0, metric="top1"), target="per-tensor-int8")
    print(result.headline())
"""

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

# Public names and the module each lives in: imported on first use, so that ``import qsurgery`` (and the
# CLI's ``--help``) does not pay for torch, onnx and timm before anything needs them.
_WHERE = {
    "capture": "capture", "CocoImages": "detection", "coco_map": "detection",
    "CalibrationError": "errors", "CaptureError": "errors", "ConfigError": "errors", "DataError": "errors",
    "ModelLoadError": "errors", "QSurgeryError": "errors",
    "agreement": "evaluate", "predict": "evaluate", "top1": "evaluate",
    "ExportReport": "export", "export_onnx": "export", "load": "io", "save": "io",
    "IntegerModel": "quant", "LayerQuant": "quant", "QuantConfig": "quant", "QuantPlan": "quant",
    "SimulatedModel": "quant", "TensorFormat": "quant", "integer_model": "quant", "quantize": "quant",
    "REMEDIES": "repair", "Budget": "repair", "RepairError": "repair", "RepairResult": "repair", "repair": "repair",
    "TARGETS": "targets", "Target": "targets", "get_target": "targets",
}

if TYPE_CHECKING:
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


class _Package(types.ModuleType):
    """``qsurgery.repair`` and ``qsurgery.capture`` are functions named like their modules: importing the
    module (``from qsurgery.repair import REMEDIES``) must not replace the function on the package."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("repair", "capture") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qsurgery' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


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
