"""Device profiles: what formats a device runs, its scale constraints, and what each format costs there.

A profile is data (a frozen dataclass), not a code path: the simulator, the precision assignment and the
cost model all read the same fields. Users add their own with ``Target(...)`` or ``Target.from_dict``.

Per-layer formats, by name:

- ``int8``: int8 weights (per-channel unless the target says per-tensor) and 8-bit activations;
- ``w4a8``: 4-bit weights, 8-bit activations (the default of 4-bit-weight devices, int8 their fallback);
- ``a16w8``: int8 weights, 16-bit activations (Hailo / R-Car style widening);
- ``int16``: 16-bit weights and activations;
- ``fp16``: half precision;
- ``float``: float32 fallback (the layer leaves the accelerator on most devices).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from .errors import ConfigError
from .quant.config import QuantConfig, TensorFormat

if TYPE_CHECKING:
    from .quant.plan import QuantPlan

__all__ = ["Target", "TARGETS", "get_target", "FORMATS", "layer_format"]

FORMATS = ("int8", "w4a8", "a16w8", "int16", "fp16", "float")
_BITS = {"int8": (8, 8), "w4a8": (4, 8), "a16w8": (8, 16), "int16": (16, 16)}


@dataclass(frozen=True)
class Target:
    """What a device runs and what it costs. ``formats[0]`` is the format every layer gets by default, the
    others are what a layer may be widened to; ``per_channel``/``pow2`` constrain every integer scale.
    ``mac_cost``/``byte_cost`` are relative (int8 MAC = 1); ``conversion_cost`` is the cost, in int8-MAC
    equivalents per output element, of each change of format between a layer and its consumer (a requantize
    or convert node)."""

    name: str
    description: str
    formats: tuple[str, ...] = ("int8",)
    per_channel: bool = True
    pow2: bool = False
    mac_cost: dict[str, float] = field(default_factory=lambda: {"int8": 1.0})
    byte_cost: dict[str, float] = field(default_factory=lambda: {"int8": 1.0})
    conversion_cost: float = 1.0

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or "int8" not in self.formats:
            raise ConfigError(f"target {self.name}: formats must include 'int8' and come from {FORMATS} "
                              f"(unknown: {unknown})")
        missing = [f for f in self.formats if f not in self.mac_cost]
        if missing:
            raise ConfigError(f"target {self.name}: no mac_cost for format(s) {missing}")

    @property
    def mixed(self) -> bool:
        """Whether a layer may run in anything but the default format on this device."""
        return len(self.formats) > 1

    @property
    def default(self) -> str:
        """The per-layer format every layer gets unless widened."""
        return self.formats[0]

    @property
    def float_fallback(self) -> bool:
        """Whether a layer may leave integer arithmetic (fp16 or float) on this device."""
        return any(f in ("fp16", "float") for f in self.formats)

    def config(self, observer: str = "minmax") -> QuantConfig:
        """The QuantConfig this device implies with every layer in its default format (per-channel or
        per-tensor weights, pow2 scales, weight bits). Signed (int8) and unsigned (uint8) asymmetric
        activations are the same grid shifted, so one simulation serves both."""
        if self.pow2:
            cfg = QuantConfig.pow2_int8(observer=observer)
        else:
            cfg = QuantConfig.int8(per_channel=self.per_channel, observer=observer)
        w_bits, a_bits = _BITS[self.default]
        cfg = replace(cfg, weight=replace(cfg.weight, bits=w_bits), activation=replace(cfg.activation, bits=a_bits))
        return replace(cfg, allow_mixed=self.float_fallback, name=self.name)

    def formats_of(self, fmt: str, weight: TensorFormat | None, activation: TensorFormat
                   ) -> tuple[TensorFormat | None, TensorFormat]:
        """A layer's (weight, activation) formats in the named per-layer format, derived from its int8 ones."""
        self.require(fmt)
        if fmt in ("float", "fp16"):
            f = TensorFormat(fmt)
            return (f if weight is not None else None), f
        w_bits, a_bits = _BITS[fmt]
        return (replace(weight, bits=w_bits) if weight is not None else None), replace(activation, bits=a_bits)

    def require(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown per-layer format {fmt!r}; known: {FORMATS}")
        if fmt not in self.formats:
            raise ConfigError(f"target {self.name} does not run {fmt} layers (it runs {list(self.formats)})")

    def check(self, plan: QuantPlan) -> None:
        """Refuse a plan this device cannot run, naming the first offending layer and why."""
        for layer in plan:
            fmt = layer_format(layer)
            if fmt not in self.formats:
                raise ConfigError(f"target {self.name} cannot run layer {layer.name!r} in {fmt}: it runs "
                                  f"{list(self.formats)} ({self.description})")
            w = layer.weight
            if w is not None and w.is_int and w.per_channel and not self.per_channel:
                raise ConfigError(f"target {self.name} needs per-tensor weights; layer {layer.name!r} is per-channel")
            if self.pow2 and any(f is not None and f.is_int and not f.pow2 for f in (w, layer.activation)):
                raise ConfigError(f"target {self.name} needs power-of-two scales; layer {layer.name!r} has free scales")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        d = dict(d)
        d["formats"] = tuple(d.get("formats", ("int8",)))
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"not a target description: {exc}") from None


def layer_format(layer) -> str:
    """The per-layer format name of a ``LayerQuant`` (``int8``, ``a16w8``, ``int16``, ``fp16``, ``float``, or
    ``w<bits>a<bits>`` for other integer widths)."""
    fmts = [f for f in (layer.weight, layer.activation) if f is not None]
    if not fmts or all(f.dtype == "float" for f in fmts):
        return "float"
    if all(f.dtype == "fp16" for f in fmts):
        return "fp16"
    if any(f.dtype != "int" for f in fmts):
        return "float"
    w = layer.weight.bits if layer.weight is not None else 8
    a = layer.activation.bits if layer.activation is not None else 8
    if layer.weight is None:  # an op without weights: its activation width decides
        return {8: "int8", 16: "a16w8"}.get(a, f"w{w}a{a}")
    return {(8, 8): "int8", (8, 16): "a16w8", (16, 16): "int16"}.get((w, a), f"w{w}a{a}")


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("generic", "ONNX Runtime / TensorRT-like: int8, any layer may fall back to float",
           formats=("int8", "float"), mac_cost={"int8": 1.0, "float": 4.0},
           byte_cost={"int8": 1.0, "float": 4.0}),
    Target("full-int8", "TFLite / NNAPI / EdgeTPU-like: every layer int8, no fallback",
           formats=("int8",)),
    Target("int8-int16", "Hailo / R-Car-like: int8, with 16-bit activations or weights per layer, no float",
           formats=("int8", "a16w8", "int16"), mac_cost={"int8": 1.0, "a16w8": 2.0, "int16": 4.0},
           byte_cost={"int8": 1.0, "a16w8": 2.0, "int16": 2.0}),
    Target("pow2-int8", "Xilinx DPU-like: int8, symmetric power-of-two scales, per-tensor, no fallback",
           formats=("int8",), per_channel=False, pow2=True),
    Target("per-tensor-int8", "NPU / DSP-like: int8 with per-tensor weight scales, no fallback",
           formats=("int8",), per_channel=False),
    Target("per-tensor-int16", "NPU / DSP-like: per-tensor int8, with 16-bit activations or weights per layer",
           formats=("int8", "a16w8", "int16"), per_channel=False, mac_cost={"int8": 1.0, "a16w8": 2.0, "int16": 4.0},
           byte_cost={"int8": 1.0, "a16w8": 2.0, "int16": 2.0}),
    Target("pow2-int16", "DPU-like: power-of-two per-tensor int8, with 16-bit layers allowed",
           formats=("int8", "a16w8", "int16"), per_channel=False, pow2=True,
           mac_cost={"int8": 1.0, "a16w8": 2.0, "int16": 4.0}, byte_cost={"int8": 1.0, "a16w8": 2.0, "int16": 2.0}),
    Target("w4a8", "4-bit-weight accelerators: 4-bit per-channel weights, 8-bit activations, int8 layers allowed",
           formats=("w4a8", "int8"), mac_cost={"w4a8": 0.5, "int8": 1.0}, byte_cost={"w4a8": 1.0, "int8": 1.0}),
)}


def get_target(target: str | Target | dict) -> Target:
    """A built-in target by name, a ``Target``, or a dict describing one."""
    if isinstance(target, Target):
        return target
    if isinstance(target, dict):
        return Target.from_dict(target)
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; known: {sorted(TARGETS)} (or pass a Target / dict)")
    return TARGETS[target]
