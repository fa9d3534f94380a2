"""Quantization simulation of our own on FX graphs: formats, observers, calibration, the plan."""

from .config import QuantConfig, TensorFormat
from .integer import IntegerModel, integer_model
from .plan import LayerQuant, QuantPlan
from .simulate import ActQuantizer, SimulatedModel, quantize

__all__ = ["QuantConfig", "TensorFormat", "LayerQuant", "QuantPlan", "ActQuantizer", "SimulatedModel", "quantize",
           "IntegerModel", "integer_model"]
