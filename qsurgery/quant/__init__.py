"""Quantization simulation of our own on FX graphs: formats, observers, calibration, the plan."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

_WHERE = {"QuantConfig": "config", "TensorFormat": "config", "IntegerModel": "integer", "integer_model": "integer",
          "LayerQuant": "plan", "QuantPlan": "plan", "ActQuantizer": "simulate", "SimulatedModel": "simulate",
          "quantize": "simulate"}

if TYPE_CHECKING:
    from .config import QuantConfig, TensorFormat
    from .integer import IntegerModel, integer_model
    from .plan import LayerQuant, QuantPlan
    from .simulate import ActQuantizer, SimulatedModel, quantize

__all__ = ["QuantConfig", "TensorFormat", "LayerQuant", "QuantPlan", "ActQuantizer", "SimulatedModel", "quantize",
           "IntegerModel", "integer_model"]


def __getattr__(name: str) -> Any:  # imported on first use (the config needs no torch)
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qsurgery.quant' has no attribute {name!r}")
