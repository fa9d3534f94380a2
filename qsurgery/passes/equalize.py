"""Cross-layer equalization: rescale the channels between two consecutive weighted layers so that each
channel's weight range is the same in both, which is what per-tensor (and power-of-two) weight grids need.

For ``conv1 -> act -> conv2``, output channel ``c`` of ``conv1`` is divided by ``s_c`` and the weights reading
channel ``c`` in ``conv2`` are multiplied by ``s_c``, with ``s_c = sqrt(r1_c / r2_c)`` (``r``: the channel's
largest absolute weight), after Nagel et al. 2019 ("Data-Free Quantization"). It is exact in float when the
activation is positively homogeneous (identity, ReLU, LeakyReLU). ReLU6 / hardtanh are not: their clip point
moves with the scale. qsurgery keeps the model exact by carrying the moved clip points in the graph: the
activation becomes a :class:`~qsurgery.graph.ChannelClip` (one bound per channel), which the simulation
absorbs into the layer like any activation and the export writes as Max/Min with per-channel constants
(``relu6="clip"``, the default). ``relu6="skip"`` leaves such pairs alone (AIMET's choice).

Between the two layers, ops that commute with a per-channel scale are looked through: dropout, identity,
zero padding, average pooling (including the global pooling in front of a classifier) and flatten.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..graph import BATCHNORM_MODULES, ChannelClip, clip_bounds, is_activation
from .common import PassResult, folded_copy, graph_cost

__all__ = ["equalize", "absorb_high_bias", "find_pairs", "LayerPair"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, "relu", "relu_"}
_SCALE_FREE_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Flatten, nn.AdaptiveAvgPool1d,
                       nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.ZeroPad2d)
_SCALE_FREE_FUNCTIONS = {F.dropout, torch.flatten, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.avg_pool1d,
                         F.avg_pool2d, operator.getitem}
_SCALE_FREE_METHODS = {"flatten", "contiguous", "clone"}


@dataclass
class LayerPair:
    """Two weighted layers whose shared channels can be rescaled: ``first``'s outputs feed ``second``.

    ``activation``: ``'none'``, ``'homogeneous'`` (ReLU-like, exact) or ``'clip'`` (ReLU6 / hardtanh:
    exact only with per-channel clip points); ``act_node``: the activation's node name."""

    first: str
    second: str
    activation: str
    act_node: str | None
    channels: int
    between: tuple[str, ...] = ()  # the scale-free ops between the activation (or ``first``) and ``second``


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_equalizable(m: nn.Module | None) -> bool:
    return isinstance(m, _CONVS) and not isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d))


def _activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    m = _module(gm, node)
    if isinstance(m, _HOMOGENEOUS_MODULES) or (node.op != "call_module" and node.target in _HOMOGENEOUS_FUNCTIONS):
        return "homogeneous"
    if isinstance(m, ChannelClip) or clip_bounds(gm, node) is not None:
        return "clip"
    return None


def _scale_free(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _SCALE_FREE_MODULES)
    if node.op == "call_function":
        if node.target is F.pad:  # constant padding with zeros commutes with scaling
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            return mode == "constant" and not value
        if node.target is torch.mean:
            return True
        return node.target in _SCALE_FREE_FUNCTIONS and node.target is not operator.getitem
    if node.op == "call_method":
        return node.target in _SCALE_FREE_METHODS or node.target == "mean"
    return False


def _channels_at(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return int(meta.shape[1]) if meta is not None and hasattr(meta, "shape") and len(meta.shape) > 1 else None


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _pair_from(gm: fx.GraphModule, node: fx.Node, relu6: str) -> tuple[LayerPair | None, str]:
    first = _module(gm, node)
    channels = first.weight.shape[0]
    cur, act_kind, act_node = node, "none", None
    nxt = _single_user(cur)
    if nxt is not None and is_activation(gm, nxt):
        act_kind = _activation_kind(gm, nxt)
        if act_kind is None:
            return None, f"the activation {nxt.name!r} is not positively homogeneous or a clip (scaling would " \
                         "change the function)"
        if act_kind == "clip" and relu6 == "skip":
            return None, f"the activation {nxt.name!r} clips (relu6='skip')"
        act_node, cur = nxt.name, nxt
        nxt = _single_user(cur)
    between = []
    while nxt is not None and _scale_free(gm, nxt) and nxt.args and nxt.args[0] is cur:
        between.append(nxt.name)
        cur, nxt = nxt, _single_user(nxt)
    if nxt is None:
        return None, f"its output reaches {len(cur.users)} ops (a branch or residual): no single next layer"
    second = _module(gm, nxt)
    if not _is_equalizable(second) or nxt.args[0] is not cur:
        return None, f"it is followed by {nxt.name!r}, not by a conv/linear reading its channels"
    n_in = second.in_features if isinstance(second, nn.Linear) else second.in_channels
    if n_in != channels or _channels_at(cur) not in (None, channels):
        return None, f"{nxt.target!r} does not read the {channels} channels one to one"
    return LayerPair(node.target, nxt.target, act_kind, act_node, channels, tuple(between)), ""


def find_pairs(graph: fx.GraphModule, *, relu6: Literal["clip", "skip"] = "clip"
               ) -> tuple[list[LayerPair], dict[str, str]]:
    """The pairs that can be equalized in ``graph`` once its BatchNorms are folded (as the device sees it), and
    for every other weighted layer why it cannot be the first of a pair."""
    if relu6 not in ("clip", "skip"):
        raise ConfigError(f"relu6 must be 'clip' or 'skip', got {relu6!r}")
    if any(isinstance(m, BATCHNORM_MODULES) for m in graph.modules()):
        graph = folded_copy(graph)
    pairs: list[LayerPair] = []
    skipped: dict[str, str] = {}
    for node in graph.graph.nodes:
        if node.op != "call_module" or not _is_equalizable(_module(graph, node)):
            continue
        pair, why = _pair_from(graph, node, relu6)
        if pair is not None:
            pairs.append(pair)
        else:
            skipped[node.target] = why
    return pairs, skipped


def _out_range(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).amax(1)


def _in_index(m: nn.Module) -> tuple[int, int, int]:
    """(groups, in channels per group, out channels per group) of a conv, (1, in, out) for linear."""
    if isinstance(m, nn.Linear):
        return 1, m.in_features, m.out_features
    return m.groups, m.in_channels // m.groups, m.out_channels // m.groups


def _in_range(m: nn.Module) -> torch.Tensor:
    """Largest absolute weight reading each input channel."""
    groups, per_in, per_out = _in_index(m)
    w = m.weight.detach().abs()
    w = w.reshape(groups, per_out, per_in, -1).amax(dim=(1, 3))  # (groups, per_in)
    return w.reshape(-1)


def _scale_inputs(m: nn.Module, s: torch.Tensor) -> None:
    groups, per_in, per_out = _in_index(m)
    shape = m.weight.shape
    w = m.weight.detach().reshape(groups, per_out, per_in, -1) * s.reshape(groups, 1, per_in, 1)
    m.weight = nn.Parameter(w.reshape(shape).clone())


def _scale_outputs(m: nn.Module, s: torch.Tensor) -> None:
    shape = [-1] + [1] * (m.weight.dim() - 1)
    m.weight = nn.Parameter((m.weight.detach() / s.reshape(shape)).clone())
    if m.bias is not None:
        m.bias = nn.Parameter((m.bias.detach() / s).clone())


def _channel_clip(gm: fx.GraphModule, node: fx.Node, channels: int, index: int) -> ChannelClip:
    """The ChannelClip at ``node``, replacing a scalar clip there first."""
    m = _module(gm, node)
    if isinstance(m, ChannelClip):
        return m
    lo, hi = clip_bounds(gm, node)
    device = next(gm.parameters()).device
    clip = ChannelClip(torch.full((channels,), lo, device=device), torch.full((channels,), hi, device=device))
    name = next(f"qsurgery_clip{k}" for k in range(index, index + len(gm.graph.nodes) + 1)
                if not hasattr(gm, f"qsurgery_clip{k}"))  # never over a module already there
    gm.add_module(name, clip)
    node.op, node.target, node.args, node.kwargs = "call_module", name, (node.args[0],), {}
    return clip


def equalize(graph: fx.GraphModule, *, relu6: Literal["clip", "skip"] = "clip", iterations: int = 20,
             tol: float = 1e-3, max_scale: float = 1e4, keep_clip_range: bool = True,
             check_data: Any = None) -> PassResult:
    """A BN-folded copy of ``graph`` with the channels of every equalizable layer pair rescaled.

    Chains (``a -> b -> c``) are equalized by sweeping the pairs until no scale moves by more than ``tol``
    (relative) or ``iterations`` sweeps. ``max_scale`` bounds one channel's scale (dead channels stay put).
    ``keep_clip_range`` (default): no channel's clip point may rise above the largest one, so the activation
    range a per-tensor quantizer must cover does not grow (on EfficientNet-Lite0 this halves the KL left
    under per-tensor weights and is what makes power-of-two scales work). With ``check_data`` (input batches)
    the float outputs before and after are compared (``float_error``: the largest relative difference, ~1e-6
    when exact)."""
    if iterations < 1:
        raise ConfigError(f"iterations must be >= 1, got {iterations}")
    gm = folded_copy(graph)
    pairs, skipped = find_pairs(gm, relu6=relu6)
    nodes = {n.name: n for n in gm.graph.nodes}
    clips: dict[str, ChannelClip] = {}
    for i, p in enumerate(pairs):
        if p.activation == "clip":
            clips[p.act_node] = _channel_clip(gm, nodes[p.act_node], p.channels, i)
    gm.graph.lint()
    gm.recompile()

    total = {p.first + ">" + p.second: torch.ones(p.channels, dtype=torch.float64) for p in pairs}
    sweeps = 0
    for sweeps in range(1, iterations + 1):  # noqa: B007 - the count is reported
        moved = 0.0
        for p in pairs:
            a, b = gm.get_submodule(p.first), gm.get_submodule(p.second)
            r1, r2 = _out_range(a.weight).double().cpu(), _in_range(b).double().cpu()
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / r2.clamp(min=1e-300)), torch.ones_like(r1))
            s = s.clamp(1 / max_scale, max_scale)
            if keep_clip_range and p.activation == "clip":
                hi = clips[p.act_node].hi.double().cpu()
                s = torch.maximum(s, hi / hi.max())
            moved = max(moved, float((s - 1).abs().max()))
            total[p.first + ">" + p.second] *= s
            s32 = s.to(a.weight.dtype).to(a.weight.device)
            _scale_outputs(a, s32)
            _scale_inputs(b, s32)
            if p.activation == "clip":
                clip = clips[p.act_node]
                clip.lo.div_(s32)
                clip.hi.div_(s32)
        if moved < tol:
            break

    result = PassResult(gm, exact=True, cost_before=graph_cost(graph), cost_after=graph_cost(gm))
    for p in pairs:
        s = total[p.first + ">" + p.second]
        result.changes.append({"first": p.first, "second": p.second, "activation": p.activation,
                               "channels": p.channels, "scale_min": float(s.min()), "scale_max": float(s.max())})
    n_clip = sum(p.activation == "clip" for p in pairs)
    result.notes.append(f"{len(pairs)} pair(s) equalized in {sweeps} sweep(s); {len(skipped)} layer(s) start no "
                        "pair")
    if n_clip:
        result.notes.append(f"{n_clip} ReLU6/hardtanh activation(s) now clip per channel (ChannelClip): exact in "
                            "float; on a device the clip is a per-channel Min/Max")
    gm.meta["qsurgery_equalize_skipped"] = skipped
    if check_data is not None:
        result.float_error = _relative_change(graph, gm, check_data)
    return result


def _shift_free(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a scale-free op also commutes with adding a constant per channel (zero padding does not: the
    padded border would hold 0 where the shifted model needs the shift)."""
    if node.op == "call_module":
        m = _module(gm, node)
        if isinstance(m, nn.ZeroPad2d):
            return False
        pad = getattr(m, "padding", 0)
        return not (isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)) and any(
            p != 0 for p in (pad if isinstance(pad, tuple) else (pad,))) and m.count_include_pad)
    if node.op == "call_function" and node.target in (F.pad, F.avg_pool1d, F.avg_pool2d):
        return False
    return True


def _reads_without_padding(m: nn.Module) -> bool:
    """A layer whose every output sees only real inputs (a linear layer, or a 1x1 conv without padding): adding
    a constant to its input then moves its output by that constant times its weights, border included."""
    if isinstance(m, nn.Linear):
        return True
    pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
    return (type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and all(k == 1 for k in m.kernel_size)
            and pad != ("same",) and all(p == 0 for p in pad if isinstance(p, int)))


def absorb_high_bias(graph: fx.GraphModule, calib_data: Any, *, check_data: Any = None) -> PassResult:
    """A BN-folded copy of ``graph`` where each ``conv1 -> ReLU/ReLU6/clip -> conv2`` pair moves the part of
    ``conv1``'s output that never falls below a floor into ``conv2``'s bias (high-bias absorption, Nagel et al.
    2019): an activation channel whose values stay in ``[c, hi]`` becomes ``[0, hi - c]`` and ``conv2``'s bias
    gains ``W2 @ c``, so the activation range a per-tensor quantizer must cover shrinks.

    The floor ``c`` of each channel is the smallest value its activation took on ``calib_data`` (input batches,
    no labels), where that is above zero. Exact in float for every input, not only the calibration ones: the
    activation becomes a per-channel clip with both bounds moved by ``c`` (a ReLU's lower bound becomes
    ``-c``). Pairs where ``conv2`` pads its input (a 3x3 depthwise conv) or zero padding sits between the two
    are left alone: the padded border would break the equality."""
    from ..quant.simulate import graph_inputs

    gm = folded_copy(graph)
    pairs, _ = find_pairs(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    chosen: list[LayerPair] = []
    skipped: dict[str, str] = {}
    for p in pairs:
        if p.act_node is None:
            skipped[p.first] = "no activation between the layers: there is no floor to move"
            continue
        if not _reads_without_padding(gm.get_submodule(p.second)):
            skipped[p.first] = f"{p.second} pads its input (the border would see 0, not the moved floor)"
        elif not all(_shift_free(gm, nodes[n]) for n in p.between):
            skipped[p.first] = f"zero padding between {p.first} and {p.second}"
        else:
            chosen.append(p)
    floors: dict[str, torch.Tensor] = {}

    def keep_min(name: str):
        def hook(_m, _i, out: torch.Tensor) -> None:
            low = out.detach().transpose(0, 1).reshape(out.shape[1], -1).amin(1)
            floors[name] = low if name not in floors else torch.minimum(floors[name], low)
        return hook

    hooks = [gm.get_submodule(p.first).register_forward_hook(keep_min(p.first)) for p in chosen]
    try:
        with torch.no_grad():
            for batch in graph_inputs(gm, calib_data, what="calibration"):
                gm(*batch)
    finally:
        for h in hooks:
            h.remove()
    result = PassResult(gm, exact=True, cost_before=graph_cost(graph), cost_after=graph_cost(gm))
    for i, p in enumerate(chosen):
        node = nodes[p.act_node]
        a, b = gm.get_submodule(p.first), gm.get_submodule(p.second)
        act = _module(gm, node)
        bounds = (act.lo, act.hi) if isinstance(act, ChannelClip) else clip_bounds(gm, node)
        if bounds is None:
            skipped[p.first] = f"{p.act_node} lets negative values through (leaky): no floor"
            continue
        lo, hi = (torch.as_tensor(b).to(floors[p.first]) for b in bounds)
        c = torch.minimum(torch.maximum(floors[p.first], lo), hi)
        c = torch.where(c > 0, c, torch.zeros_like(c))
        if not bool((c > 0).any()):
            continue  # the activation is left as it is (a ReLU stays one)
        clip = _channel_clip(gm, node, p.channels, i)  # this copy's own module; a ReLU or ReLU6 becomes one
        clip.lo.sub_(c.to(clip.lo))
        clip.hi.sub_(c.to(clip.hi))
        c_w = c.to(a.weight.dtype)
        a.bias = nn.Parameter(((a.bias.detach() if a.bias is not None else torch.zeros_like(c_w)) - c_w).clone())
        groups, per_in, per_out = _in_index(b)
        w = b.weight.detach().reshape(groups, per_out, per_in, -1).sum(-1)
        gain = torch.einsum("gop,gp->go", w, c_w.reshape(groups, per_in)).reshape(-1)
        b.bias = nn.Parameter(((b.bias.detach() if b.bias is not None else torch.zeros_like(gain)) + gain).clone())
        result.changes.append({"first": p.first, "second": p.second, "channels": int((c > 0).sum()),
                               "largest_floor": float(c.max())})
    gm.graph.lint()
    gm.recompile()
    result.notes.append(f"{len(result.changes)} pair(s) absorbed a floor; {len(skipped)} left alone")
    gm.meta["qsurgery_absorb_skipped"] = skipped
    if check_data is not None:
        result.float_error = _relative_change(graph, gm, check_data)
    return result


def _relative_change(before: fx.GraphModule, after: fx.GraphModule, data: Any) -> float:
    from ..quant.simulate import graph_inputs

    worst = 0.0
    with torch.no_grad():
        for batch in graph_inputs(before, data, what="check"):
            ref, out = before(*batch), after(*batch)
            refs = ref if isinstance(ref, (list, tuple)) else [ref]
            outs = out if isinstance(out, (list, tuple)) else [out]
            for r, o in zip(refs, outs):
                worst = max(worst, float((r - o).norm() / r.norm().clamp(min=1e-12)))
    return worst if math.isfinite(worst) else float("inf")
