"""Exceptions raised by qsurgery. Every user-facing failure is one of these, with the way out."""

from __future__ import annotations


class QSurgeryError(Exception):
    """Base class of every error qsurgery raises on bad input or an unsupported model."""


class CaptureError(QSurgeryError):
    """The model could not be turned into an FX graph (names the module, the construct, the way out)."""


class ConfigError(QSurgeryError, ValueError):
    """A quantization config or override is invalid (bad bits, unknown layer name, unknown observer)."""


class CalibrationError(QSurgeryError, ValueError):
    """Calibration data is empty, non-finite or does not fit the captured graph."""


class DataError(QSurgeryError, ValueError):
    """An image folder or label file cannot be read as described."""


class ModelLoadError(QSurgeryError):
    """A model name or factory could not be resolved to a model."""
