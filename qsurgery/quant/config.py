"""Quantization formats and the config that assigns them to layers (defaults, presets, per-layer overrides)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Literal

from ..errors import ConfigError

__all__ = ["TensorFormat", "QuantConfig", "OBSERVERS", "WEIGHT_OBSERVERS"]

Dtype = Literal["int", "fp16", "float"]
OBSERVERS = ("minmax", "percentile", "mse", "entropy")
WEIGHT_OBSERVERS = ("minmax", "mse")
MIN_BITS, MAX_BITS = 2, 16


@dataclass(frozen=True)
class TensorFormat:
    """How one tensor is represented on the device.

    ``dtype='int'``: ``bits``-bit integers with a scale (and zero point unless ``symmetric``), one scale per
    output channel when ``per_channel``; ``pow2`` restricts scales to powers of two (DPU-style).
    ``'fp16'`` rounds to half precision; ``'float'`` leaves the tensor as it is.
    """

    dtype: Dtype = "int"
    bits: int = 8
    symmetric: bool = False
    per_channel: bool = False
    pow2: bool = False
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.dtype not in ("int", "fp16", "float"):
            raise ConfigError(f"dtype must be 'int', 'fp16' or 'float', got {self.dtype!r}")
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer {self.observer!r}; known: {', '.join(OBSERVERS)}")

    @property
    def is_int(self) -> bool:
        return self.dtype == "int"

    @property
    def qrange(self) -> tuple[int, int]:
        """Integer range: [0, 2^b-1] asymmetric; [-(2^(b-1)-1), 2^(b-1)-1] symmetric (narrow, zero exact)."""
        if self.symmetric:
            return -(2 ** (self.bits - 1) - 1), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def describe(self) -> str:
        if self.dtype != "int":
            return self.dtype
        parts = [f"{'int' if self.symmetric else 'uint'}{self.bits}"]
        parts.append("per-channel" if self.per_channel else "per-tensor")
        if self.pow2:
            parts.append("pow2")
        parts.append(self.observer)
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "bits": self.bits, "symmetric": self.symmetric,
                "per_channel": self.per_channel, "pow2": self.pow2, "observer": self.observer}


_INT8_WEIGHT = TensorFormat("int", 8, symmetric=True, per_channel=True)
_UINT8_ACT = TensorFormat("int", 8, symmetric=False, per_channel=False)


@dataclass(frozen=True)
class _Override:
    pattern: str
    weight: dict
    activation: dict


@dataclass(frozen=True)
class QuantConfig:
    """Default weight/activation formats plus ordered per-layer overrides (later ones win).

    Build one with a preset (:meth:`int8`, :meth:`full_int8`, :meth:`pow2_int8`) and refine it with
    :meth:`override`, which takes a layer name or glob (``"blocks.0.*"``) as it appears in the ``QuantPlan``.
    """

    weight: TensorFormat = _INT8_WEIGHT
    activation: TensorFormat = _UINT8_ACT
    overrides: tuple[_Override, ...] = ()
    percentile: float = 99.99
    fold_bn: bool = True
    allow_mixed: bool = True
    name: str = "int8"
    hist_bins: int = 2048
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.weight.observer not in WEIGHT_OBSERVERS:
            raise ConfigError(f"weight observer must be one of {WEIGHT_OBSERVERS}, got {self.weight.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def int8(cls, *, per_channel: bool = True, observer: str = "minmax", weight_observer: str = "minmax",
             percentile: float = 99.99) -> QuantConfig:
        """Generic int8 (ONNX Runtime / TensorRT-like): int8 symmetric weights, uint8 asymmetric activations."""
        return cls(weight=replace(_INT8_WEIGHT, per_channel=per_channel, observer=weight_observer),
                   activation=replace(_UINT8_ACT, observer=observer), percentile=percentile,
                   name="int8" if per_channel else "int8-per-tensor")

    @classmethod
    def full_int8(cls, *, observer: str = "minmax") -> QuantConfig:
        """TFLite/NNAPI-like: every layer int8, no float or fp16 fallback (overrides to them are refused)."""
        return replace(cls.int8(observer=observer), allow_mixed=False, name="full-int8")

    @classmethod
    def pow2_int8(cls, *, observer: str = "minmax") -> QuantConfig:
        """DPU-like: int8 symmetric per-tensor weights and activations, power-of-two scales."""
        return cls(weight=TensorFormat("int", 8, symmetric=True, per_channel=False, pow2=True),
                   activation=TensorFormat("int", 8, symmetric=True, pow2=True, observer=observer),
                   name="pow2-int8")

    # ------------------------------------------------------------------ overrides
    def override(self, pattern: str, *, bits: int | None = None, weight_bits: int | None = None,
                 act_bits: int | None = None, dtype: Dtype | None = None, observer: str | None = None,
                 weight_observer: str | None = None, per_channel: bool | None = None,
                 pow2: bool | None = None) -> QuantConfig:
        """A new config where layers matching ``pattern`` (name or glob) get these changes.

        ``dtype='float'`` keeps the layer float (skip), ``'fp16'`` runs it in half precision; ``bits``
        sets both weight and activation bits (4..16 typical, 2..16 accepted).
        """
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"override pattern must be a non-empty layer name or glob, got {pattern!r}")
        w: dict = {}
        a: dict = {}
        for target, key, value in ((w, "bits", weight_bits if weight_bits is not None else bits),
                                   (a, "bits", act_bits if act_bits is not None else bits),
                                   (w, "dtype", dtype), (a, "dtype", dtype), (a, "observer", observer),
                                   (w, "observer", weight_observer), (w, "per_channel", per_channel),
                                   (w, "pow2", pow2), (a, "pow2", pow2)):
            if value is not None:
                target[key] = value
        if not w and not a:
            raise ConfigError("override() needs at least one change (bits, dtype, observer, per_channel, pow2)")
        if dtype in ("float", "fp16") and not self.allow_mixed:
            raise ConfigError(
                f"the {self.name} target runs every layer in int8: {dtype} for {pattern!r} is not allowed")
        # validate eagerly so the error points at the call that made it
        self._apply(self.weight, w, pattern)
        self._apply(self.activation, a, pattern)
        return replace(self, overrides=self.overrides + (_Override(pattern, w, a),))

    @staticmethod
    def _apply(fmt: TensorFormat, changes: dict, pattern: str) -> TensorFormat:
        try:
            return replace(fmt, **changes)
        except ConfigError as exc:
            raise ConfigError(f"override {pattern!r}: {exc}") from None

    def formats_for(self, name: str) -> tuple[TensorFormat, TensorFormat]:
        """The (weight, activation) formats this config gives the layer ``name``."""
        w, a = self.weight, self.activation
        for ov in self.overrides:
            if fnmatch.fnmatchcase(name, ov.pattern):
                w = self._apply(w, ov.weight, ov.pattern)
                a = self._apply(a, ov.activation, ov.pattern)
        return w, a

    def names_explicitly(self, name: str) -> bool:
        """Whether an override names this layer exactly (not through a glob)."""
        return any(ov.pattern == name for ov in self.overrides)

    def unmatched_patterns(self, names: list[str]) -> list[str]:
        """Override patterns that match none of ``names``."""
        return [ov.pattern for ov in self.overrides if not any(fnmatch.fnmatchcase(n, ov.pattern) for n in names)]

    def describe(self) -> str:
        text = f"{self.name}: weights {self.weight.describe()}, activations {self.activation.describe()}"
        if self.overrides:
            text += f", {len(self.overrides)} override(s)"
        return text
