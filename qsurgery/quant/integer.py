"""Integer-exact execution of a simulated model: what an integer runtime computes, bit for bit.

The float simulation (fake quantization) adds its products up in float32, in whatever order PyTorch picks.
An integer runtime accumulates ``(x - zx) * w`` exactly in int32, adds an int32 bias and requantizes; a
value that lands near the middle between two quantization steps can round to the other side in one of the
two, and the network amplifies those single steps (up to ~80 steps at the logits of EfficientNet-Lite0).
``integer_model(sim)`` returns a copy of the simulation that computes like onnxruntime's CPU integer kernels
(QLinearConv, QLinearAdd, QLinearGlobalAveragePool): exact int32 sums (held in float64, exact below 2^53),
bias rounded to int32 with scale ``sx * sw``, requantization ``round_half_even(float32(acc) * M)`` with
``M = float32(sx * sw) / sy``. Units onnxruntime runs on dequantized floats (linear layers, activations other
than ReLU/ReLU6 between a conv and its quantizer, int16) keep the float simulation; ``float_units`` says which
and why. Use it to verify an exported file against onnxruntime's integer kernels, or to see what they do.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph import clip_bounds
from .observers import weight_integers
from .simulate import ActQuantizer, SimulatedModel, value_source

__all__ = ["IntegerModel", "integer_model"]

_F32 = torch.float32
_F64 = torch.float64


def _f32(v: Any) -> torch.Tensor:
    return torch.as_tensor(v, dtype=_F32)


class _Grid:
    """Scale, zero point and integer range of one quantized tensor, as the runtime holds them (float32)."""

    def __init__(self, q: ActQuantizer):
        self.scale = _f32(float(q.scale))
        self.zero_point = int(q.zero_point)
        self.qmin, self.qmax = q.fmt.qrange

    def integers(self, x: torch.Tensor) -> torch.Tensor:
        """``q - zero_point`` of values on this grid (float64; exact: they are dequantized integers)."""
        return torch.round(x.to(_F64) / self.scale.double())

    def values(self, q_minus_zp: torch.Tensor) -> torch.Tensor:
        """Dequantized float32 values, as DequantizeLinear computes them."""
        return q_minus_zp.to(_F32) * self.scale


class _Requantize(nn.Module):
    """Shared tail: float32(acc) * multiplier, round half to even, clamp, dequantize."""

    out_grid: _Grid

    def _requantize(self, acc: torch.Tensor, multiplier: torch.Tensor, out: _Grid) -> torch.Tensor:
        y = torch.round(acc.to(_F32) * multiplier)
        y = torch.clamp(y, out.qmin - out.zero_point, out.qmax - out.zero_point)
        return out.values(y)


class _IntegerConv(_Requantize):
    """QLinearConv: exact int32 sum of (x - zx) * w plus the int32 bias, requantized per output channel."""

    def __init__(self, conv: nn.Module, w_int: torch.Tensor, w_scale: torch.Tensor, x_grid: _Grid, y_grid: _Grid):
        super().__init__()
        self.conv = conv
        self.x, self.y = x_grid, y_grid
        self.out_grid = y_grid
        device = w_int.device
        w_scale = w_scale.reshape(-1).to(device=device, dtype=_F32)
        if w_scale.numel() == 1:
            w_scale = w_scale.expand(w_int.shape[0])
        shape = [1, -1] + [1] * (w_int.dim() - 2)
        self.register_buffer("weight", w_int.to(_F64))
        bias_scale = x_grid.scale.to(device) * w_scale  # float32, as onnxruntime quantizes a float bias
        bias = conv.bias.detach().to(_F32) if conv.bias is not None else torch.zeros_like(w_scale)
        self.register_buffer("bias", torch.round(bias / bias_scale).to(_F64).reshape(shape))
        self.register_buffer("multiplier", (bias_scale / y_grid.scale.to(device)).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        fn = F.conv1d if isinstance(c, nn.Conv1d) else F.conv2d
        acc = fn(self.x.integers(x), self.weight, None, c.stride, c.padding, c.dilation, c.groups) + self.bias
        return self._requantize(acc, self.multiplier, self.y)


class _IntegerAdd(_Requantize):
    """QLinearAdd as onnxruntime's x86 kernel computes it: fma(a, sa/sc, fma(b, sb/sc, zc - fma(sa/sc, za, sb/sc*zb)))
    on the stored integers (zero points included), then round half to even."""

    def __init__(self, a: _Grid, b: _Grid, c: _Grid):
        super().__init__()
        self.a, self.b, self.c = a, b, c
        self.out_grid = c
        self.ra = a.scale / c.scale
        self.rb = b.scale / c.scale
        # zc - (ra*za + rb*zb), compiled with the first product fused into the add (one rounding)
        rb_zb = self.rb * b.zero_point
        self.fixed = _f32(c.zero_point) - (self.ra.double() * a.zero_point + rb_zb.double()).to(_F32)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        qa = self.a.integers(xa) + self.a.zero_point
        qb = self.b.integers(xb) + self.b.zero_point
        t = (qb * self.rb.double() + self.fixed.double()).to(_F32)  # one rounding: a fused multiply-add
        t = (qa * self.ra.double() + t.double()).to(_F32)
        q = torch.clamp(torch.round(t), self.c.qmin, self.c.qmax)
        return self.c.values(q - self.c.zero_point)


class _IntegerGlobalAvgPool(_Requantize):
    """QLinearGlobalAveragePool (x86): float32(sum of q - zx) * float32(sx / (sy * N)), round half to even."""

    def __init__(self, x: _Grid, y: _Grid):
        super().__init__()
        self.x, self.y = x, y
        self.out_grid = y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1] * x.shape[-2]
        acc = self.x.integers(x).sum(dim=(-2, -1), keepdim=True)
        multiplier = self.x.scale / (self.y.scale * _f32(n))
        return self._requantize(acc, multiplier, self.y)


class _QuantizeLinear(nn.Module):
    """A float -> integer quantizer as QuantizeLinear computes it: round_half_even(x / scale) + zero point."""

    def __init__(self, grid: _Grid):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.grid
        q = torch.clamp(torch.round(x.to(_F32) / g.scale) + g.zero_point, g.qmin, g.qmax)
        return g.values(q - g.zero_point).to(x.dtype)


class IntegerModel(nn.Module):
    """The integer-exact twin of a :class:`SimulatedModel` (see the module docstring)."""

    def __init__(self, graph_module: fx.GraphModule, integer_units: list[str], float_units: dict[str, str]):
        super().__init__()
        self.graph_module = graph_module
        self.integer_units = integer_units
        self.float_units = float_units

    def forward(self, *args: Any) -> Any:
        with torch.no_grad():
            return self.graph_module(*args)


def _quantizer(gm: fx.GraphModule, node: fx.Node) -> ActQuantizer | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, ActQuantizer):
            return m
    return None


def _grid_of(gm: fx.GraphModule, node: Any) -> _Grid | None:
    """The grid of the integer quantizer whose values reach ``node`` through value-preserving ops, if any."""
    src = value_source(gm, node)
    if src is None or src.op != "call_module":
        return None
    m = gm.get_submodule(src.target)
    if isinstance(m, _Requantize):
        return m.out_grid  # a unit already made integer
    if isinstance(m, ActQuantizer) and m.mode == "quant" and m.fmt.is_int and m.fmt.bits <= 8:
        return _Grid(m)
    return None


def _absorbed_ok(gm: fx.GraphModule, nodes: list[fx.Node], out: _Grid) -> str | None:
    """Why the unit's activations stop onnxruntime from fusing it (None: they are redundant with the
    output quantizer's range, which is when onnxruntime drops them)."""
    lo_q = float((out.qmin - out.zero_point) * out.scale)
    hi_q = float((out.qmax - out.zero_point) * out.scale)
    for node in nodes:
        bounds = clip_bounds(gm, node)
        if bounds is None:
            return f"activation {node.name!r} runs in float between the op and its quantizer"
        if lo_q < bounds[0] or hi_q > bounds[1]:
            return f"activation {node.name!r} clips inside the quantizer's range"
    return None


def integer_model(sim: SimulatedModel) -> IntegerModel:
    """An integer-exact copy of ``sim`` (``sim`` itself is not changed)."""
    import copy

    if not isinstance(sim, SimulatedModel):
        raise TypeError(f"integer_model() takes the SimulatedModel from qsurgery.quantize(), got {type(sim).__name__}")
    gm = copy.deepcopy(sim.graph_module)
    nodes = {n.name: n for n in gm.graph.nodes}
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    integer: list[str] = []
    floating: dict[str, str] = {}
    replaced: set[str] = set()
    for layer in sim.plan:
        qnode = by_target[sim._quantizers[layer.name]]
        q = gm.get_submodule(qnode.target)
        if layer.kind == "input":
            continue
        if q.mode != "quant" or not q.fmt.is_int:
            floating[layer.name] = f"{q.fmt.dtype if q.mode == 'quant' else 'float'} in the plan"
            continue
        if q.fmt.bits > 8:
            floating[layer.name] = f"{q.fmt.bits}-bit output: onnxruntime has no integer kernel for it"
            continue
        anchor = nodes[layer.nodes[0]]
        out = _Grid(q)
        why = _absorbed_ok(gm, [nodes[n] for n in layer.nodes[1:]], out)
        new: nn.Module | None = None
        inputs: tuple = ()
        module = gm.get_submodule(anchor.target) if anchor.op == "call_module" else None
        if why is None and module is not None and type(module) in (nn.Conv1d, nn.Conv2d):
            x = _grid_of(gm, anchor.args[0])
            w_fmt = layer.weight
            if not sim._enabled.get(layer.name, True) or w_fmt is None or not w_fmt.is_int or w_fmt.bits > 8:
                why = "weights are not integer"
            elif not w_fmt.symmetric:
                why = "asymmetric weights"
            elif module.padding_mode != "zeros":
                why = f"padding_mode={module.padding_mode!r}"
            elif x is None:
                why = "its input is not an integer tensor"
            else:
                w_scale = layer.weight_scale.to(_F32)
                w_int = weight_integers(sim._float_weights[layer.name], w_scale, w_fmt)
                new, inputs = _IntegerConv(module, w_int, w_scale, x, out), (anchor.args[0],)
        elif why is None and _is_add(anchor):
            a, b = (_grid_of(gm, arg) for arg in anchor.args[:2])
            if a is None or b is None:
                why = "an input of the add is not an integer tensor"
            else:
                new, inputs = _IntegerAdd(a, b, out), tuple(anchor.args[:2])
        elif why is None and _is_global_avg_pool(gm, anchor):
            x = _grid_of(gm, anchor.args[0])
            if x is None:
                why = "its input is not an integer tensor"
            else:
                new, inputs = _IntegerGlobalAvgPool(x, out), (anchor.args[0],)
        elif why is None:
            why = f"no integer emulation of {layer.kind}: runs as the float simulation"
        if new is None:
            floating[layer.name] = why
            continue
        path = f"qsurgery_int_{len(integer)}"
        gm.add_module(path, new)
        with gm.graph.inserting_after(qnode):
            node = gm.graph.call_module(path, inputs)
        qnode.replace_all_uses_with(node, delete_user_cb=lambda user, _n=node: user is not _n)
        replaced.add(qnode.name)
        integer.append(layer.name)
    # the quantizers left (model inputs, float-path units) quantize as QuantizeLinear does
    for node in list(gm.graph.nodes):
        q = _quantizer(gm, node)
        if q is not None and node.name not in replaced and q.mode == "quant" and q.fmt.is_int and q.fmt.bits <= 8:
            gm.add_module(f"qsurgery_ql_{node.name}", _QuantizeLinear(_Grid(q)))
            node.target = f"qsurgery_ql_{node.name}"
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return IntegerModel(gm, integer, floating)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        return len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs
    return node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs


def _is_global_avg_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    def is_one(size: Any) -> bool:
        return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))

    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.AdaptiveAvgPool2d) and is_one(m.output_size)
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return is_one(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
    return False
