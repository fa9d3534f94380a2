"""What the ops of a captured graph are, to a quantizer: weighted, activation, value-preserving, or compute.

One place decides this for every part of qsurgery (simulation, analysis, passes, export), so that they
all agree on which "units" a device quantizes: a weighted op (conv/linear, BN folded in) or a compute op
(add, cat, pooling, ...) together with the elementwise activation that follows it; the unit's output is
where one activation quantizer sits. Value-preserving ops (reshape, max-pool, zero-pad, nearest
upsampling, ...) pass quantized values through unchanged and get no quantizer of their own.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantUnit", "find_units", "fold_batchnorm", "is_float_tensor_node", "module_macs", "device_of",
           "set_module", "ChannelClip", "WEIGHT_SCALES"]

# graph.meta key of weights a pass has put on a quantization grid (learned rounding): {module name:
# (weight format as a dict, scale tensor)}. ``quantize`` uses the scale when the layer gets that format, so the
# integers the pass chose are the ones the simulation, the integer twin and the export hold.
WEIGHT_SCALES = "qsurgery_weight_scales"


class ChannelClip(nn.Module):
    """``clamp(x, lo[c], hi[c])`` with one bound per channel (dim 1): a ReLU6 / hardtanh after cross-layer
    equalization, whose clip points move with each channel's scale (that keeps the float model exact)."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor):
        super().__init__()
        self.register_buffer("lo", lo.detach().clone().float())
        self.register_buffer("hi", hi.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.maximum(torch.minimum(x, self.hi.view(shape)), self.lo.view(shape))

    def extra_repr(self) -> str:
        return f"channels={self.lo.numel()}, hi in [{float(self.hi.min()):.4g}, {float(self.hi.max()):.4g}]"


WEIGHTED_MODULES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                      nn.ConvTranspose1d, nn.ConvTranspose2d)
BATCHNORM_MODULES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.GELU,
    nn.Mish, nn.ELU, nn.Hardtanh, nn.PReLU, nn.CELU, nn.SELU, nn.Softplus, ChannelClip,
)
ACTIVATION_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.gelu, F.mish,
    F.elu, F.hardtanh, F.celu, F.selu, F.softplus, torch.relu, torch.sigmoid, torch.tanh,
}
ACTIVATION_METHODS = {"relu", "sigmoid", "tanh", "relu_", "sigmoid_", "tanh_"}
PASSTHROUGH_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Unflatten, nn.ZeroPad2d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle,
)
PASSTHROUGH_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute, torch.chunk,
    torch.split, torch.narrow, torch.channel_shuffle, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.pad, F.dropout, F.pixel_shuffle, F.pixel_unshuffle,
    operator.getitem,
}
PASSTHROUGH_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk", "split",
    "expand", "expand_as", "narrow", "repeat", "__getitem__", "clone", "detach", "view_as", "reshape_as",
    "unflatten",
}


def input_count(gm: fx.GraphModule) -> int:
    """How many inputs (placeholders) the graph takes."""
    return sum(1 for n in gm.graph.nodes if n.op == "placeholder")


def device_of(module: nn.Module) -> torch.device:
    """Where a module's parameters (else buffers) live; the CPU for a module without tensors."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def pair(v) -> tuple:
    """A conv/pool size argument as a 2-tuple."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``path`` under ``root`` (replacing what is there)."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def is_float_tensor_node(node: fx.Node) -> bool:
    """Whether ShapeProp recorded a single floating-point tensor as this node's output."""
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def is_weighted(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(_module(gm, node), WEIGHTED_MODULES)


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in ACTIVATION_METHODS


def clip_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """(lo, hi) of a clipping activation (ReLU, ReLU6, Hardtanh and their functional forms), which is the
    identity inside and constant outside; None for any other op."""
    if node.op == "call_module":
        m = _module(gm, node)
        if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh
            return float(m.min_val), float(m.max_val)
        return (0.0, float("inf")) if isinstance(m, nn.ReLU) else None
    if node.target in (F.relu, torch.relu, "relu", "relu_"):
        return 0.0, float("inf")
    if node.target is F.relu6:
        return 0.0, 6.0
    if node.target is F.hardtanh:
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return float(lo), float(hi)
    return None


def is_passthrough(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = _module(gm, node)
        if isinstance(m, nn.Upsample):
            return m.mode == "nearest"
        return isinstance(m, PASSTHROUGH_MODULES) or getattr(m, "qsurgery_passthrough", False)
    if node.op == "call_function":
        if node.target is F.interpolate:
            return node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") == "nearest"
        return node.target in PASSTHROUGH_FUNCTIONS
    return node.op == "call_method" and node.target in PASSTHROUGH_METHODS


def scope_of(node: fx.Node) -> str:
    """The qualified name of the module whose forward created this node ('' for the top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else list(stack)[-1]


def op_name(node: fx.Node) -> str:
    """A short name of what a node computes: 'add', 'cat', 'conv2d', 'adaptive_avg_pool2d', ..."""
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)).strip("_")
    if node.op == "call_method":
        return str(node.target).strip("_")
    return node.op


@dataclass
class QuantUnit:
    """One quantized op as a device sees it: an anchor op (+ absorbed activations), one output quantizer.

    ``name`` is the weighted module's path (``blocks.0.0.conv_dw``), ``input``/``input.<arg>`` for model
    inputs, or ``<scope>.<op>`` for function ops (``layer1.0.add``, ``cat_1``).
    """

    name: str
    kind: str
    anchor: str
    output: str
    nodes: list[str] = field(default_factory=list)
    module: str | None = None

    @property
    def weighted(self) -> bool:
        return self.module is not None


def find_units(gm: fx.GraphModule) -> list[QuantUnit]:
    """The quantized units of a captured graph (BN already folded), in execution order."""
    units: list[QuantUnit] = []
    absorbed: set[str] = set()
    used_names: Counter[str] = Counter()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def unique(name: str) -> str:
        used_names[name] += 1
        return name if used_names[name] == 1 else f"{name}_{used_names[name] - 1}"

    for node in gm.graph.nodes:
        if node.name in absorbed or node.op in ("output", "get_attr"):
            continue
        if node.op == "placeholder":
            if is_float_tensor_node(node):
                name = "input" if len(placeholders) == 1 else f"input.{node.name}"
                units.append(QuantUnit(unique(name), "input", node.name, node.name, [node.name]))
            continue
        if not is_float_tensor_node(node) or is_passthrough(gm, node):
            continue
        module = None
        if is_weighted(gm, node):
            module = node.target
            kind = type(gm.get_submodule(node.target)).__name__.lower()
            name = node.target
        elif node.op == "call_module":
            kind = type(gm.get_submodule(node.target)).__name__.lower()
            name = node.target
        else:
            kind = op_name(node)
            scope = scope_of(node)
            name = f"{scope}.{kind}" if scope else kind
        members = [node.name]
        out = node
        while len(out.users) == 1:
            nxt = next(iter(out.users))
            if not is_activation(gm, nxt) or not is_float_tensor_node(nxt) or nxt.args[0] is not out:
                break
            members.append(nxt.name)
            absorbed.add(nxt.name)
            out = nxt
        units.append(QuantUnit(unique(name), kind, node.name, out.name, members, module))
    return units


def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    """Fold eval-mode BN statistics into ``conv``'s weight and bias, in place."""
    w = conv.weight
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    transposed = isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d))
    shape = [1] * w.dim()
    if transposed:
        shape[1] = -1
        if conv.groups != 1:
            raise ValueError("cannot fold BN into a grouped transposed conv")
    else:
        shape[0] = -1
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        new_w = w * factor.reshape(shape)
        new_b = (bias - bn.running_mean) * factor + beta
    conv.weight = nn.Parameter(new_w.detach().clone())
    conv.bias = nn.Parameter(new_b.detach().clone())


def fold_batchnorm(gm: fx.GraphModule) -> dict[str, str]:
    """Fold every BatchNorm that directly follows a conv/linear into it, in place. Returns {conv: bn}."""
    folded: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), BATCHNORM_MODULES):
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or len(src.users) != 1 or not is_weighted(gm, src):
            continue
        conv = gm.get_submodule(src.target)
        bn = gm.get_submodule(node.target)
        out_features = conv.weight.shape[1] * conv.groups if isinstance(
            conv, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else conv.weight.shape[0]
        if bn.running_mean is None or bn.num_features != out_features:
            continue
        if isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and conv.groups != 1:
            continue
        _fold_into(conv, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded[src.target] = node.target
    gm.graph.lint()
    gm.recompile()
    return folded


def module_macs(gm: fx.GraphModule) -> dict[str, int]:
    """Multiply-accumulates per sample of every conv/linear call, from the shapes recorded at capture."""
    out: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_weighted(gm, node):
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            continue
        m = gm.get_submodule(node.target)
        shape = tuple(meta.shape)
        per_sample = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        if isinstance(m, nn.Linear):
            macs = per_sample * m.in_features
        elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
            in_shape = node.args[0].meta.get("tensor_meta").shape
            macs = int(torch.tensor(in_shape[1:]).prod()) * m.weight[0].numel()
        else:
            macs = per_sample * (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
        out[node.target] = out.get(node.target, 0) + macs
    return out
