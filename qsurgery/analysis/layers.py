"""Layer-by-layer float vs quantized comparison along the network, with statistics that explain each error
and a diagnosis per weak layer (the bit-exact-simulator workflow: find where the error appears, and why).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from ..errors import QSurgeryError
from ..quant.observers import fake_quant
from ..quant.simulate import SimulatedModel, graph_inputs

__all__ = ["compare_layers", "LayerErrorReport", "LayerError"]

CLIP_RATE_LIMIT = 1e-3  # more than 0.1 % of values outside the calibrated range
SPREAD_LIMIT = 8.0  # per-channel ranges differing by more than 8x under one per-tensor scale
ROUNDING_SQNR_LIMIT = 30.0  # dB: the layer's own int8 rounding costs more than this
AMPLIFY_LIMIT = 6.0  # dB worse than its input error and own noise sources add up to


def _sqnr(ref: torch.Tensor, noisy: torch.Tensor) -> float:
    noise = (ref - noisy).double().pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else 1.0


@dataclass
class LayerError:
    """Float vs simulated at one quantized unit's output (in execution order)."""

    layer: str
    kind: str
    depth: int
    sqnr_db: float
    cosine: float
    rounding_sqnr_db: float | None
    weight_sqnr_db: float | None
    clip_rate: float | None
    channel_spread: float | None
    diagnosis: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerErrorReport:
    rows: list[LayerError]

    def weak(self) -> list[LayerError]:
        """Layers with a diagnosis, in execution order."""
        return [r for r in self.rows if r.diagnosis]

    def __getitem__(self, layer: str) -> LayerError:
        for r in self.rows:
            if r.layer == layer:
                return r
        raise KeyError(layer)

    def to_dict(self) -> dict:
        return {"rows": [r.to_dict() for r in self.rows]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, default=lambda v: None)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self, only_weak: bool = True) -> str:
        rows = self.weak() if only_weak else self.rows
        lines = ["| depth | layer | SQNR dB | own rounding dB | weights dB | clipped | channel spread | diagnosis |",
                 "|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            lines.append(
                f"| {r.depth} | `{r.layer}` | {r.sqnr_db:.1f} | "
                f"{'-' if r.rounding_sqnr_db is None else f'{r.rounding_sqnr_db:.1f}'} | "
                f"{'-' if r.weight_sqnr_db is None else f'{r.weight_sqnr_db:.1f}'} | "
                f"{'-' if r.clip_rate is None else f'{100 * r.clip_rate:.3f} %'} | "
                f"{'-' if r.channel_spread is None else f'{r.channel_spread:.1f}x'} | {'; '.join(r.diagnosis)} |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        depth = [r.depth for r in self.rows]
        fig, ax = plt.subplots(figsize=(10, 3.6))
        ax.plot(depth, [min(r.sqnr_db, 80) for r in self.rows], marker=".", label="SQNR along the network")
        own = [(r.depth, min(r.rounding_sqnr_db, 80)) for r in self.rows if r.rounding_sqnr_db is not None]
        if own:
            ax.plot(*zip(*own), linestyle=":", color="gray", label="layer's own rounding")
        weak = self.weak()
        if weak:
            ax.scatter([r.depth for r in weak], [min(r.sqnr_db, 80) for r in weak], color="#c0504d", zorder=3,
                       label="layers with a diagnosis")
        for k, r in enumerate(weak):  # below the curve, staggered so that neighbours do not overlap
            ax.annotate(r.layer, (r.depth, min(r.sqnr_db, 80)), xytext=(0, -14 - 11 * (k % 3)),
                        textcoords="offset points", ha="center", fontsize=8, color="#c0504d",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
        ax.set_xlabel("quantized op (execution order)")
        ax.set_ylabel("dB")
        lo = min([min(r.sqnr_db, 80) for r in self.rows], default=0.0)
        ax.set_ylim(bottom=lo - 12)  # room for the labels under the lowest point
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)


def _combined(sqnrs: list[float | None]) -> float:
    """SQNR of independent noise sources added together (dB)."""
    noise = sum(10 ** (-s / 10) for s in sqnrs if s is not None and math.isfinite(s))
    return math.inf if noise == 0 else -10 * math.log10(noise)


def _weight_sqnr(module: torch.nn.Module, x: torch.Tensor, w_float: torch.Tensor, w_quant: torch.Tensor
                 ) -> float | None:
    """SQNR of the layer's output from its weight quantization alone, on its float input."""
    bias = getattr(module, "bias", None)
    if isinstance(module, torch.nn.Linear):
        return _sqnr(torch.nn.functional.linear(x, w_float, bias), torch.nn.functional.linear(x, w_quant, bias))
    if hasattr(module, "_conv_forward") and not isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        return _sqnr(module._conv_forward(x, w_float, bias), module._conv_forward(x, w_quant, bias))
    return None


def _channel_spread(x: torch.Tensor) -> float | None:
    if x.dim() < 2 or x.shape[1] < 2:
        return None
    per_channel = x.transpose(0, 1).reshape(x.shape[1], -1)
    ranges = (per_channel.max(1).values - per_channel.min(1).values).double()
    median = ranges.median().item()
    if median <= 0:
        return None
    return float(ranges.max().item() / median)


def compare_layers(graph: fx.GraphModule | None, simulated: SimulatedModel, batch: Any) -> LayerErrorReport:
    """For every quantized unit along the network: SQNR and cosine of its output, float vs simulated (the error
    accumulated up to there), the SQNR of its own rounding alone, its clipping rate on these inputs, and the
    spread of its per-channel ranges; plus a diagnosis for weak layers. The float reference is the simulation
    with quantization switched off; ``graph`` (the captured float graph, or None) tells which convs are heads
    (:func:`qsurgery.passes.find_heads`), the only layers for which ``split_head`` is suggested.
    """
    if not isinstance(simulated, SimulatedModel):
        raise QSurgeryError("compare_layers() needs the SimulatedModel returned by qsurgery.quantize()")
    gm = simulated.graph_module
    inputs = next(iter(graph_inputs(gm, batch, what="comparison")))
    plan = simulated.plan
    captured: dict[str, torch.Tensor] = {}
    hooks = [simulated.quantizer(name).register_forward_hook(
        lambda _m, _i, out, _n=name: captured.__setitem__(_n, out.detach())) for name in plan.names()]
    weight_inputs: dict[str, torch.Tensor] = {}
    weighted = [layer for layer in plan if layer.module and layer.weight is not None and layer.weight.dtype != "float"
                and layer.name in simulated._quant_weights]

    def keep_input(name: str):
        def hook(_module, inp, _out) -> None:  # must return None: a returned value replaces the output
            weight_inputs.setdefault(name, inp[0].detach())
        return hook

    hooks += [gm.get_submodule(layer.module).register_forward_hook(keep_input(layer.name)) for layer in weighted]
    enabled = simulated.quantized_names()
    try:
        with torch.no_grad():
            simulated.set_quantized(None, False)
            simulated(*inputs)
            floats = dict(captured)
            captured.clear()
            weight_sqnr = {layer.name: _weight_sqnr(gm.get_submodule(layer.module), weight_inputs[layer.name],
                                                    simulated._float_weights[layer.name],
                                                    simulated._quant_weights[layer.name])
                           for layer in weighted if layer.name in weight_inputs}
            weight_inputs.clear()
            simulated.set_quantized(enabled, True)
            simulated(*inputs)
            quants = dict(captured)
    finally:
        for h in hooks:
            h.remove()
    rows: list[LayerError] = []
    heads: set[str] = set()
    if graph is not None:
        from ..passes.split_head import find_heads

        heads = {h["conv"] for h in find_heads(graph)}
    previous = math.inf
    for depth, layer in enumerate(plan):
        if layer.name not in floats or layer.name not in quants:
            continue
        f, q = floats[layer.name], quants[layer.name]
        if not torch.isfinite(f).all():
            raise QSurgeryError(f"the float model produces non-finite values at {layer.name!r}")
        fmt = layer.activation
        rounding = clip = None
        if fmt is not None and fmt.is_int and layer.scale is not None and layer.name in enabled:
            quantizer = simulated.quantizer(layer.name)
            rounding = _sqnr(f, fake_quant(f, quantizer.scale, quantizer.zero_point, fmt))
            lo, hi = layer.clip
            clip = float(((f < lo - 1e-6 * abs(lo)) | (f > hi + 1e-6 * abs(hi))).double().mean())
        spread = _channel_spread(f) if fmt is not None and fmt.is_int and not fmt.per_channel else None
        sq = _sqnr(f, q)
        w_sq = weight_sqnr.get(layer.name) if layer.name in enabled else None
        row = LayerError(layer.name, layer.kind, depth, sq, _cosine(f, q), rounding, w_sq, clip, spread)
        if layer.name in enabled and not layer.is_float:
            if clip is not None and clip > CLIP_RATE_LIMIT:
                row.diagnosis.append(f"calibration does not cover these inputs ({100 * clip:.2f} % clipped) -> "
                                     "more or more representative calibration data")
            if spread is not None and spread > SPREAD_LIMIT and (rounding is None or rounding < 40):
                row.diagnosis.append(f"channel ranges differ by {spread:.0f}x under one scale -> "
                                     "cross-layer equalization evens them (remedy equalize)"
                                     + ("; a model output (a head): split_head gives each group of channels "
                                        "its own scale" if layer.module in heads else ""))
            if rounding is not None and rounding < ROUNDING_SQNR_LIMIT:
                row.diagnosis.append(f"rounding noise ({rounding:.1f} dB from its own int8 rounding) -> "
                                     "more bits for this layer (int16)")
            if w_sq is not None and w_sq < ROUNDING_SQNR_LIMIT:
                row.diagnosis.append(f"weight rounding ({w_sq:.1f} dB from its int8 weights alone) -> more weight "
                                     "bits, per-channel weights, learned rounding (remedy learned_rounding)")
            expected = _combined([previous, rounding, w_sq])
            if not row.diagnosis and math.isfinite(expected) and expected - sq > AMPLIFY_LIMIT:
                row.diagnosis.append(f"SQNR {sq:.1f} dB is {expected - sq:.1f} dB below what its input error, "
                                     "own rounding and weights add up to: it amplifies earlier error (large "
                                     "weights or gains) -> fix the layers before it, or widen this one")
        rows.append(row)
        if math.isfinite(sq):
            previous = sq
    return LayerErrorReport(rows)
