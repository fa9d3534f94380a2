"""Quantization simulation on a captured FX graph: fold BN, calibrate activation ranges, fake-quantize.

``quantize(graph, calib_data, config)`` returns a :class:`SimulatedModel` (the graph with one activation
quantizer after every unit and fake-quantized weights) and the :class:`QuantPlan` that says what each
unit became. The user's graph is not modified.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from tqdm.auto import tqdm

from ..errors import CalibrationError, ConfigError, QSurgeryError
from ..graph import (
    WEIGHT_SCALES,
    QuantUnit,
    device_of,
    find_units,
    fold_batchnorm,
    input_count,
    is_float_tensor_node,
    is_passthrough,
)
from .config import QuantConfig, TensorFormat
from .observers import RangeStats, choose_range, fake_quant, qparams, weight_qparams
from .plan import LayerQuant, QuantPlan

__all__ = ["quantize", "SimulatedModel", "ActQuantizer", "iter_inputs"]

_FLOAT = TensorFormat("float")


class ActQuantizer(nn.Module):
    """Fake-quantizes one activation tensor per-tensor; in calibration modes it observes instead."""

    def __init__(self, name: str, fmt: TensorFormat):
        super().__init__()
        self.name = name
        self.fmt = fmt
        self.mode = "off"  # off | minmax | hist | quant
        self.stats = RangeStats()
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "quant":
            return fake_quant(x, self.scale, self.zero_point, self.fmt)
        if self.mode == "minmax":
            self.stats.update_minmax(x)
        elif self.mode == "hist":
            self.stats.update_histogram(x)
        return x

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.fmt.describe()}, mode={self.mode}"


class SimulatedModel(nn.Module):
    """A captured graph whose forward runs the fake-quantized computation described by ``plan``.

    ``set_quantized(names, False)`` runs the named units in float again (weights and output), which is what
    layer-wise analysis and mixed-precision search toggle without rebuilding the model.
    """

    def __init__(self, graph_module: fx.GraphModule, plan: QuantPlan, quantizers: dict[str, str],
                 float_weights: dict[str, torch.Tensor], quant_weights: dict[str, torch.Tensor]):
        super().__init__()
        self.graph_module = graph_module
        self.plan = plan
        self._quantizers = quantizers
        self._float_weights = float_weights
        self._quant_weights = quant_weights
        self._enabled = {name: True for name in plan.names()}

    def _apply(self, fn: Any, recurse: bool = True) -> SimulatedModel:
        """``.to(device)``, ``.cpu()``, ``.double()`` move the kept float and quantized weights too (they are
        plain tensors beside the modules, which ``set_quantized`` swaps in)."""
        super()._apply(fn, recurse)
        self._float_weights = {k: fn(v) for k, v in self._float_weights.items()}
        self._quant_weights = {k: fn(v) for k, v in self._quant_weights.items()}
        return self

    def forward(self, *args: Any) -> Any:
        return self.graph_module(*args)

    def quantizer(self, name: str) -> ActQuantizer:
        """The activation quantizer at the output of unit ``name``."""
        self.plan[name]  # raises a helpful error for unknown names
        return self.graph_module.get_submodule(self._quantizers[name])

    def set_quantized(self, names: Iterable[str] | str | None = None, enabled: bool = True, *,
                      weights: bool = True, activations: bool = True) -> None:
        """Switch the simulation of the named units (all when None) on or off; off means float."""
        if isinstance(names, str):
            names = [names]
        for name in (self.plan.names() if names is None else list(names)):
            layer = self.plan[name]
            if activations:
                q = self.quantizer(name)
                q.mode = "quant" if enabled else "off"
            if weights and layer.module is not None and name in self._quant_weights:
                module = self.graph_module.get_submodule(layer.module)
                src = self._quant_weights[name] if enabled else self._float_weights[name]
                with torch.no_grad():
                    module.weight.copy_(src)
            self._enabled[name] = enabled

    def weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(float, fake-quantized) weights of unit ``name`` (BN folded), None for a unit without weights."""
        self.plan[name]
        if name not in self._quant_weights:
            return None
        return self._float_weights[name], self._quant_weights[name]

    def quantized_names(self) -> list[str]:
        return [n for n, on in self._enabled.items() if on]


# ---------------------------------------------------------------------- calibration data
def _batch_inputs(batch: Any, n_inputs: int, index: int) -> tuple[torch.Tensor, ...]:
    if isinstance(batch, torch.Tensor):
        inputs: tuple = (batch,)
    elif isinstance(batch, dict):
        raise CalibrationError(
            f"calibration batch {index} is a dict; pass batches as tensors or (inputs, labels) tuples")
    elif isinstance(batch, (tuple, list)) and batch:
        inputs = tuple(batch[:n_inputs])
    else:
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}; expected a tensor or an (inputs, labels) tuple")
    for t in inputs:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CalibrationError(f"calibration batch {index} holds {type(t).__name__}, not a float tensor")
    return inputs


def iter_inputs(data: Any, n_inputs: int = 1, *, expected_shapes: Sequence[tuple[int, ...]] | None = None,
                device: torch.device | None = None, what: str = "calibration") -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield model-input tuples from ``data`` (a tensor batch, or an iterable of batches/(inputs, labels)).

    Checks that every batch is finite and shaped like the captured example (batch size may differ).
    """
    if isinstance(data, torch.Tensor):
        data = [data]
    if data is None:
        raise CalibrationError(f"no {what} data given")
    count = 0
    for i, batch in enumerate(data):
        inputs = _batch_inputs(batch, n_inputs, i)
        for t, shape in zip(inputs, expected_shapes or ()):
            if t.dim() != len(shape) or tuple(t.shape[1:]) != tuple(shape[1:]):
                raise CalibrationError(
                    f"{what} batch {i} has shape {tuple(t.shape)} but the graph was captured for (N, "
                    f"{', '.join(map(str, shape[1:]))}): resize the data or capture again with an example of this size")
        for t in inputs:
            if t.numel() == 0:
                raise CalibrationError(f"{what} batch {i} is empty")
            if not torch.isfinite(t).all():
                raise CalibrationError(f"{what} batch {i} contains NaN or infinite values")
        count += 1
        yield tuple(t.to(device) if device is not None else t for t in inputs)
    if count == 0:
        raise CalibrationError(f"{what} data is empty: give at least one batch of inputs")


def graph_inputs(graph: fx.GraphModule, data: Any, *, what: str = "calibration"
                 ) -> Iterator[tuple[torch.Tensor, ...]]:
    """:func:`iter_inputs` for ``graph``: its number of inputs, its captured input shapes, its device."""
    return iter_inputs(data, input_count(graph), expected_shapes=graph.meta.get("qsurgery_input_shapes"),
                       device=device_of(graph), what=what)


def run_hooked(graph: fx.GraphModule, data: Any, handles: list) -> None:
    """Run ``graph`` over every batch of ``data`` without gradients, then remove the hook ``handles``
    (the statistics-gathering loop shared by passes that observe activations)."""
    try:
        with torch.no_grad():
            for batch in graph_inputs(graph, data):
                graph(*batch)
    finally:
        for h in handles:
            h.remove()


class _Replayable:
    """Iterate calibration data twice even when it is a one-shot iterator (caches the batches)."""

    def __init__(self, data: Any):
        self.data = data
        self.one_shot = not isinstance(data, torch.Tensor) and iter(data) is data
        self.cache: list | None = [] if self.one_shot else None
        self.consumed = False

    def __iter__(self):
        if not self.one_shot:
            yield from self.data
        elif not self.consumed:
            for b in self.data:
                self.cache.append(b)
                yield b
            self.consumed = True
        else:
            yield from self.cache


# ---------------------------------------------------------------------- building the simulated graph
def _weight_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0


def _consumer_units(gm: fx.GraphModule, node: fx.Node, owner: dict[str, QuantUnit]) -> list[QuantUnit]:
    """Units that read ``node``'s value, looking through value-preserving ops."""
    found: list[QuantUnit] = []
    stack = list(node.users)
    seen: set[str] = set()
    while stack:
        user = stack.pop()
        if user.name in seen:
            continue
        seen.add(user.name)
        if user.name in owner:
            found.append(owner[user.name])
        elif is_passthrough(gm, user) or not is_float_tensor_node(user):
            stack.extend(user.users)
    return found


def _resolve_formats(units: list[QuantUnit], gm: fx.GraphModule, config: QuantConfig, plan: QuantPlan | None
                     ) -> dict[str, tuple[TensorFormat | None, TensorFormat, list[str]]]:
    names = [u.name for u in units]
    unmatched = config.unmatched_patterns(names)
    if unmatched:
        from difflib import get_close_matches

        hints = "; ".join(f"{p!r} (close: {get_close_matches(p, names, n=4) or 'none'})" for p in unmatched)
        raise ConfigError(f"override(s) match no quantized layer: {hints}. Layer names are those of plan.names().")
    if plan is not None:
        unknown = [n for n in plan.names() if n not in set(names)]
        if unknown:
            raise ConfigError(f"the given plan names layers this graph does not have: {unknown[:8]}")
    out: dict[str, tuple[TensorFormat | None, TensorFormat, list[str]]] = {}
    for u in units:
        w, a = config.formats_for(u.name)
        notes: list[str] = []
        if plan is not None and u.name in plan:
            w = plan[u.name].weight or w
            a = plan[u.name].activation or a
        if u.module is None:
            w = None
        else:
            module = gm.get_submodule(u.module)
            if w.is_int and w.per_channel and isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)) \
                    and module.groups != 1:
                w = TensorFormat(**{**w.to_dict(), "per_channel": False})
                notes.append("grouped transposed conv: per-tensor weights")
        out[u.name] = (w, a, notes)
    owner = {u.anchor: u for u in units}
    for u in units:  # a model input read only by float layers stays float (the device takes float input)
        if u.kind != "input":
            continue
        consumers = _consumer_units(gm, next(n for n in gm.graph.nodes if n.name == u.anchor), owner)
        if consumers and all(out[c.name][1].dtype == "float" and (out[c.name][0] is None or
                                                                   out[c.name][0].dtype == "float")
                             for c in consumers) and (plan is None or u.name not in plan) \
                and not config.names_explicitly(u.name):
            w, _a, notes = out[u.name]
            out[u.name] = (w, _FLOAT, notes + ["kept float: every layer reading it is float"])
    return out


def _insert_quantizers(gm: fx.GraphModule, units: list[QuantUnit],
                       formats: dict[str, tuple[TensorFormat | None, TensorFormat, list[str]]]) -> dict[str, str]:
    holder = nn.Module()
    gm.add_module("qsurgery_act", holder)
    nodes = {n.name: n for n in gm.graph.nodes}
    paths: dict[str, str] = {}
    for i, u in enumerate(units):
        key = f"q{i}"
        holder.add_module(key, ActQuantizer(u.name, formats[u.name][1]))
        path = f"qsurgery_act.{key}"
        out = nodes[u.output]
        with gm.graph.inserting_after(out):
            q = gm.graph.call_module(path, (out,))
        q.meta = dict(out.meta)
        out.replace_all_uses_with(q, delete_user_cb=lambda user, _q=q: user is not _q)
        paths[u.name] = path
    gm.graph.lint()
    gm.recompile()
    return paths


def _ensure_shapes(gm: fx.GraphModule, example: tuple[torch.Tensor, ...] | None) -> None:
    if all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op not in ("output", "get_attr")):
        return
    if example is None:
        raise CalibrationError("the graph carries no shape information and no calibration data was given; "
                               "capture it with qsurgery.capture(model, example_inputs)")
    with torch.no_grad():
        ShapeProp(gm).propagate(*example)


def quantize(graph: fx.GraphModule, calib_data: Any, config: QuantConfig | None = None, *,
             plan: QuantPlan | None = None, progress: bool = True) -> tuple[SimulatedModel, QuantPlan]:
    """Simulate quantization of a captured graph, calibrated on ``calib_data``.

    ``calib_data`` is a tensor batch or an iterable of batches (a DataLoader works; ``(inputs, labels)``
    tuples are fine). ``plan`` reuses formats chosen elsewhere; with ``calib_data=None`` it also reuses the
    plan's ranges. Returns ``(simulated_model, plan)``; ``simulated_model.plan`` is the same plan.
    """
    if not isinstance(graph, fx.GraphModule):
        raise QSurgeryError(
            f"quantize() takes a captured graph, got {type(graph).__name__}: "
            "call qsurgery.capture(model, example_inputs) first")
    config = config or QuantConfig.int8()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    if plan is not None and not isinstance(plan, QuantPlan):
        raise ConfigError(f"plan must be a QuantPlan, got {type(plan).__name__}")

    gm = copy.deepcopy(graph)
    gm.eval()

    if isinstance(calib_data, torch.Tensor):
        calib_data = [calib_data]
    source = _Replayable(calib_data) if calib_data is not None else None
    batches = iter(graph_inputs(gm, source)) if source else None
    first = next(batches) if batches is not None else None

    folded = fold_batchnorm(gm) if config.fold_bn else {}
    _ensure_shapes(gm, first)
    units = find_units(gm)
    formats = _resolve_formats(units, gm, config, plan)
    paths = _insert_quantizers(gm, units, formats)
    quantizers = {u.name: gm.get_submodule(paths[u.name]) for u in units}
    needs_range = [q for q in quantizers.values() if q.fmt.is_int]

    if batches is not None:
        with torch.no_grad():
            for q in quantizers.values():
                q.mode = "minmax"
            for inputs in _progress(first, batches, progress, "calibrating (ranges)"):
                gm(*inputs)
            _check_stats(quantizers)
            hist = [q for q in needs_range if q.fmt.observer != "minmax"]
            if hist:
                for q in quantizers.values():
                    q.mode = "off"
                for q in hist:
                    q.stats.start_histogram(config.hist_bins)
                    q.mode = "hist"
                for inputs in _progress(None, graph_inputs(gm, source),
                                        progress, "calibrating (histograms)"):
                    gm(*inputs)
    elif any(q.fmt.is_int for q in quantizers.values()):
        missing = [u.name for u in units if quantizers[u.name].fmt.is_int
                   and (plan is None or u.name not in plan or plan[u.name].clip is None)]
        if missing:
            raise CalibrationError(f"no calibration data and the plan has no ranges for {missing[:6]}: give calib_data")

    layers: list[LayerQuant] = []
    nodes = {n.name: n for n in gm.graph.nodes}
    range_limits = graph.meta.get(RANGE_LIMITS, {})
    pinned = graph.meta.get(WEIGHT_SCALES, {})
    float_w: dict[str, torch.Tensor] = {}
    quant_w: dict[str, torch.Tensor] = {}
    for u in units:
        w_fmt, a_fmt, notes = formats[u.name]
        q = quantizers[u.name]
        layer = LayerQuant(u.name, u.kind, list(u.nodes), u.module, activation=a_fmt, notes=list(notes),
                           folded_bn=folded.get(u.module) if u.module else None)
        if a_fmt.is_int:
            if batches is not None:
                layer.observed = (q.stats.lo, q.stats.hi)
                layer.clip = choose_range(q.stats, a_fmt, config.percentile)
                if u.module in range_limits:
                    layer.clip = _limit_range(layer.clip, range_limits[u.module], layer)
            else:
                layer.observed, layer.clip = plan[u.name].observed, plan[u.name].clip
            scale, zp = qparams(layer.clip[0], layer.clip[1], a_fmt)
            q.scale.copy_(scale)
            q.zero_point.copy_(zp)
            layer.scale, layer.zero_point = float(scale), int(zp)
        q.mode = "quant"
        if u.module is not None and w_fmt is not None:
            layer.weight = w_fmt
            module = gm.get_submodule(u.module)
            w = module.weight.detach()
            if w_fmt.is_int:
                axis = _weight_axis(module)
                pin = pinned.get(u.module)
                if pin is not None and pin[0] == w_fmt.to_dict():
                    scale = pin[1].to(torch.float32).clone()
                    zp = torch.zeros(scale.shape, dtype=torch.int32)
                    layer.notes.append("weights on a grid chosen by learned rounding (scale kept)")
                else:
                    scale, zp = weight_qparams(w, w_fmt, axis)
                    if pin is not None:
                        layer.notes.append(f"learned rounding was done for {pin[0]}, not this format: re-rounded")
                if w_fmt.symmetric:
                    scale = _fit_bias_in_int32(scale, module, _input_quantizer(gm, nodes[u.anchor]), layer)
                layer.weight_scale = scale.detach().cpu()
                wq = fake_quant(w, scale.to(w.device), zp.to(w.device), w_fmt, axis if w_fmt.per_channel else None)
            else:
                wq = fake_quant(w, torch.tensor(1.0), torch.tensor(0), w_fmt)
            float_w[u.name] = w.clone()
            quant_w[u.name] = wq.detach().clone()
            with torch.no_grad():
                module.weight.copy_(wq)
        layers.append(layer)

    result = QuantPlan(layers, config.describe())
    return SimulatedModel(gm, result, paths, float_w, quant_w), result


# graph.meta key a pass sets to bound a module output's quantization range: {module name: (lo | None, hi | None)}.
# split_head uses it for score logits, whose values below a floor do not change any detection.
RANGE_LIMITS = "qsurgery_range_limits"


def _limit_range(clip: tuple[float, float], limit: tuple[float | None, float | None], layer: LayerQuant
                 ) -> tuple[float, float]:
    lo, hi = clip
    if limit[0] is not None and lo < limit[0]:
        lo = float(limit[0])
    if limit[1] is not None and hi > limit[1]:
        hi = float(limit[1])
    if (lo, hi) != tuple(clip):
        layer.notes.append(f"range limited to [{lo:.4g}, {hi:.4g}] by the graph (observed [{clip[0]:.4g}, "
                           f"{clip[1]:.4g}]): values outside saturate")
    return lo, max(hi, lo)


# A device adds the bias as int32 with scale (input scale x weight scale). A channel whose weights are ~0
# (dead after training) but whose bias is not gets a tiny weight scale, and its bias no longer fits: runtimes
# then overflow (onnxruntime wraps it around). Half the int32 range is left for the bias, half for the sum.
_BIAS_LIMIT = 2.0 ** 30


def value_source(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """The node whose values reach ``node`` unchanged, looking back through value-preserving ops."""
    while isinstance(node, fx.Node) and is_passthrough(gm, node) and node.args:
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def _input_quantizer(gm: fx.GraphModule, anchor: fx.Node) -> ActQuantizer | None:
    """The integer quantizer whose values a weighted unit (its anchor node) reads, if any."""
    src = value_source(gm, anchor.args[0] if anchor.args else None)
    q = gm.get_submodule(src.target) if src is not None and src.op == "call_module" else None
    return q if isinstance(q, ActQuantizer) and q.fmt.is_int else None


def _fit_bias_in_int32(scale: torch.Tensor, module: nn.Module, x_quant: ActQuantizer | None,
                       layer: LayerQuant) -> torch.Tensor:
    """Raise per-channel weight scales where the bias would not fit int32 at scale ``sx * sw``."""
    bias = getattr(module, "bias", None)
    if bias is None or x_quant is None:
        return scale
    need = bias.detach().abs().double().cpu() / (float(x_quant.scale) * _BIAS_LIMIT)
    need = need.max().reshape(scale.shape) if scale.numel() == 1 else need.reshape(scale.shape)
    need = need.to(scale.device)
    raised = need > scale.double()
    if not bool(raised.any()):
        return scale
    layer.notes.append(f"weight scale raised on {int(raised.sum())} channel(s) so that the bias fits int32 "
                       "(their weights are ~0)")
    return torch.where(raised, need.to(scale.dtype), scale)


def _progress(first: tuple | None, rest: Iterator, enabled: bool, desc: str) -> Iterator:
    def chain():
        if first is not None:
            yield first
        yield from rest
    return tqdm(chain(), desc=desc, unit="batch", disable=not enabled, leave=False)


def _check_stats(quantizers: dict[str, ActQuantizer]) -> None:
    bad = [name for name, q in quantizers.items() if q.mode == "minmax" and (q.stats.nonfinite or not q.stats.finite)]
    if bad:
        raise CalibrationError(
            f"the float model produces NaN/inf values during calibration (first at {bad[0]!r}); "
            "check the model and the input normalisation")
