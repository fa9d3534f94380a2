"""Split a detection head's final conv into one conv per channel group, so each group gets its own int8 scale.

YOLO-style heads put box offsets (about +-10), objectness (down to -100) and class logits in one conv
output; one per-tensor activation scale then leaves the box channels a few int8 steps. The same weights,
split by output channel, give each group its own quantizer. The split is exact in float.

Two ways to put the groups back together:

- ``merge="outputs"``: the groups become separate model outputs (what a full-int8 device compiles), and
  ``PassResult.merge_outputs`` rebuilds the original outputs on the host for the existing post-processing;
- ``merge="float_concat"``: a :class:`ChannelMerge` (concat + channel reorder) kept in float. It is not
  requantized, which would undo the split; the QDQ export keeps it as a float Concat/Gather.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import CalibrationError, ConfigError
from ..graph import device_of, is_activation, is_passthrough, set_module
from ..quant.simulate import RANGE_LIMITS, graph_inputs, run_hooked
from .common import PassResult, graph_cost, refresh_shapes

__all__ = ["split_head", "find_heads", "channel_ranges", "ChannelMerge", "HeadGroups", "output_concats",
           "split_output_concats", "OutputMerge"]

GroupSpec = Literal["auto", "yolo", "yolo-xywh"] | Sequence[Sequence[int]]


class ChannelMerge(nn.Module):
    """Concatenate channel groups and put the channels back in their original order (float, value-preserving)."""

    qsurgery_passthrough = True  # graph.py: no quantizer of its own (a requantized concat would undo the split)

    def __init__(self, groups: Sequence[Sequence[int]]):
        super().__init__()
        order = [c for g in groups for c in g]
        self.register_buffer("index", torch.argsort(torch.tensor(order)), persistent=False)
        self.identity = order == sorted(order)

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        x = torch.cat(parts, 1)
        return x if self.identity else x.index_select(1, self.index.to(x.device))


class HeadGroups(nn.Module):
    """Holds the group convs that replace one head conv (``<conv>.box``, ``<conv>.obj``, ...) and the merge."""

    def __init__(self, convs: dict[str, nn.Conv2d], groups: Sequence[Sequence[int]]):
        super().__init__()
        for name, conv in convs.items():
            self.add_module(name, conv)
        self.groups = [list(g) for g in groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # eager equivalent of the split conv
        return ChannelMerge(self.groups)(*[m(x) for m in self.children() if isinstance(m, nn.Conv2d)])


def _layout_blocker(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The first op on a path from ``node`` to the graph output that is not a layout op (reshape/permute/
    sigmoid/cat/...), or None when every path reaches the output through layout ops only."""
    stack, seen = list(node.users), set()
    if not stack:
        return node
    while stack:
        user = stack.pop()
        if user.name in seen:
            continue
        seen.add(user.name)
        if user.op == "output":
            continue
        cat = user.op == "call_function" and user.target in (torch.cat, torch.concat, torch.stack)
        if not (cat or is_passthrough(gm, user) or is_activation(gm, user)):
            return user
        stack.extend(user.users)
    return None


def channel_ranges(graph: fx.GraphModule, convs: Sequence[str], calib_data: Any, *, progress: bool = False
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per output channel min and max of each named conv over the calibration data (float model)."""
    ranges: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name in convs:
        def hook(_m, _i, out, name=name):
            t = out.detach().float().transpose(0, 1).reshape(out.shape[1], -1)
            lo, hi = t.min(1).values, t.max(1).values
            if name in ranges:
                ranges[name] = [torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)]
            else:
                ranges[name] = [lo, hi]
        hooks.append(graph.get_submodule(name).register_forward_hook(hook))
    run_hooked(graph, calib_data, hooks)
    missing = [n for n in convs if n not in ranges]
    if missing:
        raise CalibrationError(f"no calibration batch reached {missing}")
    return {k: (v[0].cpu(), v[1].cpu()) for k, v in ranges.items()}


def _spans(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The range an asymmetric quantizer must cover for each channel (zero included)."""
    return (hi.clamp(min=0) - lo.clamp(max=0)).clamp(min=1e-8)


def bits_lost(lo: torch.Tensor, hi: torch.Tensor) -> float:
    """Mean over channels of log2(tensor range / channel range): the int8 bits a channel loses, on average,
    to sharing one per-tensor scale with the others (0 = uniform channels)."""
    span = _spans(lo, hi)
    whole = float(hi.max().clamp(min=0) - lo.min().clamp(max=0))
    return float(torch.log2(whole / span).clamp(min=0).mean())


def auto_groups(lo: torch.Tensor, hi: torch.Tensor, *, max_groups: int = 4, tolerance_bits: float = 0.25
                ) -> tuple[list[list[int]], list[float]]:
    """Cluster channels into at most ``max_groups`` groups with tight ranges.

    Cost of a grouping: the mean over channels of log2(group range / channel range), i.e. the int8 bits a
    channel loses to sharing its scale. Channels are ordered by range and cut into contiguous segments by
    dynamic programming; the fewest groups within ``tolerance_bits`` of the best are chosen. Returns the
    groups and the cost for 1..max_groups groups.
    """
    span = _spans(lo, hi)
    order = torch.argsort(span).tolist()
    n = len(order)
    lo_s, hi_s = lo.clamp(max=0)[order].tolist(), hi.clamp(min=0)[order].tolist()
    logs = [math.log2(float(span[c])) for c in order]
    prefix = [0.0]
    for v in logs:
        prefix.append(prefix[-1] + v)
    seg = [[0.0] * n for _ in range(n)]  # seg[i][j]: cost of channels i..j (sorted) in one group
    for i in range(n):
        a, b = lo_s[i], hi_s[i]
        for j in range(i, n):
            a, b = min(a, lo_s[j]), max(b, hi_s[j])
            seg[i][j] = (j - i + 1) * math.log2(max(b - a, 1e-8)) - (prefix[j + 1] - prefix[i])
    k_max = max(1, min(max_groups, n))
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    best[0][0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + seg[i][j - 1]
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    costs = [best[k][n] / n for k in range(1, k_max + 1)]
    k = next(k for k in range(1, k_max + 1) if costs[k - 1] <= min(costs) + tolerance_bits)
    bounds, j = [], n
    for kk in range(k, 0, -1):
        i = cut[kk][j]
        bounds.append((i, j))
        j = i
    groups = [sorted(order[i:j]) for i, j in reversed(bounds)]
    return groups, costs


def yolo_groups(channels: int, anchors: int = 3, *, split_box: bool = False) -> dict[str, list[int]]:
    """YOLO head layout: ``anchors`` x (box 4 | objectness 1 | classes) channels, channel = anchor * F + field."""
    if channels % anchors or channels // anchors < 6:
        raise ConfigError(f"a conv with {channels} output channels is not a YOLO head with {anchors} anchors "
                          f"(needs anchors x (5 + classes) channels); pass anchors=... or explicit groups")
    f = channels // anchors
    fields = {"xy": [0, 1], "wh": [2, 3]} if split_box else {"box": [0, 1, 2, 3]}
    fields.update({"obj": [4], "cls": list(range(5, f))})
    return {name: [a * f + i for a in range(anchors) for i in idx] for name, idx in fields.items()}


def find_heads(graph: fx.GraphModule, calib_data: Any = None, *, min_bits_lost: float = 0.75
               ) -> list[dict[str, Any]]:
    """Candidate head convs: Conv2d whose output reaches the model output through layout ops only
    (reshape/permute/sigmoid/cat); with calibration data, each with the bits its channels lose to one shared
    scale (:func:`bits_lost`), and those losing at least ``min_bits_lost`` are marked ``split_worthy``."""
    found = []
    for node in graph.graph.nodes:
        if node.op == "call_module" and isinstance(graph.get_submodule(node.target), nn.Conv2d) \
                and _layout_blocker(node, graph) is None:
            found.append({"conv": node.target, "channels": graph.get_submodule(node.target).out_channels})
    if calib_data is not None and found:
        ranges = channel_ranges(graph, [f["conv"] for f in found], calib_data)
        for f in found:
            f["bits_lost"] = bits_lost(*ranges[f["conv"]])
            f["split_worthy"] = f["bits_lost"] >= min_bits_lost
    return found


def _check_partition(groups: Sequence[Sequence[int]], channels: int, conv: str) -> list[list[int]]:
    groups = [[int(c) for c in g] for g in groups]
    if any(not g for g in groups):
        raise ConfigError(f"{conv}: a channel group is empty")
    flat = [c for g in groups for c in g]
    bad = [c for c in flat if not 0 <= c < channels]
    if bad:
        raise ConfigError(f"{conv}: channel ids {bad[:5]} are outside 0..{channels - 1}")
    if len(flat) != len(set(flat)) or len(flat) != channels:
        missing = sorted(set(range(channels)) - set(flat))
        dup = sorted({c for c in flat if flat.count(c) > 1})
        raise ConfigError(f"{conv}: groups must cover each of its {channels} output channels exactly once "
                          f"(missing {missing[:8]}, repeated {dup[:8]})")
    if len(groups) < 2:
        raise ConfigError(f"{conv}: one group is no split")
    return groups


def _group_conv(conv: nn.Conv2d, channels: list[int]) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, len(channels), conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups if conv.groups == 1 else _raise_grouped(conv), conv.bias is not None,
                    conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    idx = torch.tensor(channels, device=conv.weight.device)
    with torch.no_grad():
        new.weight.copy_(conv.weight.index_select(0, idx))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.index_select(0, idx))
    return new


def _raise_grouped(conv: nn.Conv2d) -> int:
    raise ConfigError(f"a grouped conv (groups={conv.groups}) cannot be split by output channel group; "
                      f"head convs are dense")


def split_head(graph: fx.GraphModule, convs: Sequence[str] | None = None, *, groups: GroupSpec = "auto",
               merge: Literal["outputs", "float_concat"] = "outputs", calib_data: Any = None, anchors: int = 3,
               max_groups: int = 4, min_bits_lost: float = 0.75, score_floor: float | None = None) -> PassResult:
    """Split each head conv into one conv per channel group (same weights: exact in float).

    ``convs=None`` finds the heads (:func:`find_heads`; with ``calib_data``, only wide-spread ones).
    ``groups``: ``"yolo"`` (box | obj | cls), ``"yolo-xywh"`` (xy | wh | obj | cls), ``"auto"`` (clustered
    from calibrated per-channel ranges) or explicit lists of channel ids. ``merge``: see the module doc.
    ``score_floor`` (YOLO layouts): the objectness and class groups' int8 ranges start at this logit instead
    of at their most negative value (down to -100 in darknet heads), which only sets how far below
    ``sigmoid(floor)`` a rejected score lies; the float graph is unchanged. The input graph is not modified.
    """
    if score_floor is not None:
        if not (isinstance(groups, str) and groups.startswith("yolo")):
            raise ConfigError("score_floor needs a YOLO layout (groups='yolo' or 'yolo-xywh'), which says which "
                              "channels are score logits")
        if not -50 <= float(score_floor) < 0:
            raise ConfigError(f"score_floor is a logit below 0 (e.g. -8: sigmoid 3.4e-4), got {score_floor!r}")
    if merge not in ("outputs", "float_concat"):
        raise ConfigError(f"merge must be 'outputs' or 'float_concat', not {merge!r}")
    if isinstance(groups, str) and groups not in ("auto", "yolo", "yolo-xywh"):
        raise ConfigError(f"groups must be 'auto', 'yolo', 'yolo-xywh' or lists of channel ids, not {groups!r}")
    if groups == "auto" and calib_data is None:
        raise CalibrationError("groups='auto' clusters channels by their calibrated ranges: pass calib_data "
                               "(a few batches of images), or use groups='yolo' / explicit channel lists")
    notes: list[str] = []
    candidates = find_heads(graph, calib_data if convs is None else None, min_bits_lost=min_bits_lost)
    if convs is None:
        if not candidates:
            raise ConfigError("no head conv found: no Conv2d reaches the model output through reshape/permute/"
                              "sigmoid/cat only; name the convs to split with convs=[...]")
        chosen = [c["conv"] for c in candidates if c.get("split_worthy", True)]
        skipped = [f"{c['conv']} ({c['bits_lost']:.2f} bits lost)" for c in candidates
                   if not c.get("split_worthy", True)]
        if skipped:
            notes.append(f"head convs with tight ranges left as they are: {', '.join(skipped)}")
        if not chosen:
            raise ConfigError(f"the head convs' channel ranges are already tight (< {min_bits_lost} bits lost "
                              f"to a shared scale): "
                              f"{', '.join(skipped)}; nothing worth splitting")
    else:
        chosen = list(convs)
        modules = dict(graph.named_modules())
        for name in chosen:
            if name not in modules:
                from difflib import get_close_matches

                heads = [c["conv"] for c in candidates]
                raise ConfigError(f"{name!r} is not a module of this graph (close: "
                                  f"{get_close_matches(name, list(modules), n=3)}; head candidates: {heads})")
            if not isinstance(modules[name], nn.Conv2d):
                raise ConfigError(f"{name!r} is a {type(modules[name]).__name__}, not a Conv2d")
            node = next((n for n in graph.graph.nodes if n.op == "call_module" and n.target == name), None)
            blocker = _layout_blocker(node, graph) if node is not None else None
            if blocker is not None:
                raise ConfigError(
                    f"{name!r} is not a head conv: its output feeds {blocker.name} ({blocker.op} "
                    f"{getattr(blocker.target, '__name__', blocker.target)}) before reaching a model output. "
                    f"That op would requantize (or mix) the groups with one scale again, undoing the split; "
                    f"only convs whose outputs reach the model outputs through reshape/permute/sigmoid/cat "
                    f"are split (head candidates: {[c['conv'] for c in candidates]})")
    nodes = {n.target: n for n in graph.graph.nodes if n.op == "call_module" and n.target in chosen}
    missing = [c for c in chosen if c not in nodes]
    if missing:
        raise ConfigError(f"{missing} are modules that the graph never calls")
    ranges = channel_ranges(graph, chosen, calib_data) if calib_data is not None else {}

    before = graph_cost(graph)
    new = copy.deepcopy(graph)
    new.meta.update(copy.deepcopy(dict(graph.meta)))
    out_node = next(n for n in new.graph.nodes if n.op == "output")
    flat_out, out_spec = tree_flatten(out_node.args[0])
    flat_names = [n.name if isinstance(n, fx.Node) else None for n in flat_out]
    new_flat: list[Any] = list(flat_out)
    replaced: dict[int, tuple[list[list[int]], int]] = {}
    changes: list[dict] = []
    group_keys: dict[str, list[str]] = {}
    node_map = {n.target: n for n in new.graph.nodes if n.op == "call_module" and n.target in chosen}
    for name in chosen:
        conv = new.get_submodule(name)
        node = node_map[name]
        spec = groups
        costs = None
        if isinstance(spec, str) and spec.startswith("yolo"):
            named = yolo_groups(conv.out_channels, anchors, split_box=spec == "yolo-xywh")
        elif spec == "auto":
            parts, costs = auto_groups(*ranges[name], max_groups=max_groups)
            if len(parts) < 2:
                notes.append(f"{name}: one group already fits its channels (costs {costs}); left unsplit")
                continue
            named = {f"g{i}": g for i, g in enumerate(parts)}
        else:
            named = {f"g{i}": list(g) for i, g in enumerate(spec)}
        parts = _check_partition(list(named.values()), conv.out_channels, name)
        holder = HeadGroups({k: _group_conv(conv, g) for k, g in zip(named, parts)}, parts)
        set_module(new, name, holder)
        group_nodes = []
        with new.graph.inserting_after(node):
            last = node
            for key in named:
                with new.graph.inserting_after(last):
                    g = new.graph.call_module(f"{name}.{key}", node.args, node.kwargs)
                group_nodes.append(g)
                last = g
        change = {"conv": name, "groups": {k: len(g) for k, g in named.items()}, "merge": merge}
        if ranges:
            lo, hi = ranges[name]
            change["bits_lost"] = round(bits_lost(lo, hi), 2)
            change["group_ranges"] = {k: (round(float(lo[g].min()), 3), round(float(hi[g].max()), 3))
                                      for k, g in zip(named, parts)}
        if costs is not None:
            change["auto_bits_lost"] = [round(c, 3) for c in costs]
        if score_floor is not None:
            limits = dict(new.meta.get(RANGE_LIMITS, {}))
            limits.update({f"{name}.{k}": (float(score_floor), None) for k in ("obj", "cls")})
            new.meta[RANGE_LIMITS] = limits
            change["score_floor"] = float(score_floor)
        if merge == "float_concat":
            holder.add_module("merge", ChannelMerge(parts))
            with new.graph.inserting_after(group_nodes[-1]):
                m = new.graph.call_module(f"{name}.merge", tuple(group_nodes))
            node.replace_all_uses_with(m)
        else:
            others = [u for u in node.users if u is not out_node]
            positions = [i for i, n in enumerate(flat_out) if n is node]
            if others or not positions:
                raise ConfigError(f"merge='outputs' needs {name}'s output to be a model output as it is (it "
                                  f"feeds {[u.name for u in others]}); use merge='float_concat'")
            for pos in positions:
                new_flat[pos] = tuple(group_nodes)
                replaced[pos] = (parts, len(group_nodes))
            node.replace_all_uses_with(group_nodes[0])  # placeholder; the output is rewritten below
        new.graph.erase_node(node)
        changes.append(change)
        group_keys[name] = list(named)

    output_names: list[str] | None = None
    if merge == "outputs" and replaced:
        leaves: list[Any] = []
        output_names = []
        for i, item in enumerate(new_flat):
            if i in replaced:
                leaves.extend(item)
                output_names.extend(f"{flat_out[i].target}.{k}" for k in group_keys[flat_out[i].target])
            else:
                leaves.append(item)
                output_names.append(flat_names[i] or f"output{i}")
        out_node.args = (tuple(leaves),)
    new.graph.lint()
    new.recompile()
    refresh_shapes(new)

    if score_floor is not None and changes:
        notes.append(f"objectness and class logits below {score_floor:g} saturate in int8: a score changes by at "
                     f"most sigmoid({score_floor:g}) = {1 / (1 + math.exp(-score_floor)):.1e}, so detections "
                     "above that confidence are unaffected; the float graph is unchanged")
    result = PassResult(new, changes, True, before, graph_cost(new), notes=notes)
    result.output_names = output_names
    if merge == "outputs" and replaced:
        result.merge_outputs = _make_merger(flat_out, replaced, out_spec)
    result.float_error = _float_error(graph, new, result.merge_outputs, calib_data)
    return result


def output_concats(graph: fx.GraphModule) -> list[dict[str, Any]]:
    """Model outputs that are a channel concat (dim 1) of several tensors: a decoupled head (YOLOX, YOLOv8:
    separate box and class branches) joined inside the graph, where int8 requantizes all of them with one
    scale. Each entry: the concat node's name, its output position and the channels of its inputs."""
    out_node = next(n for n in graph.graph.nodes if n.op == "output")
    flat, _spec = tree_flatten(out_node.args[0])
    found = []
    for i, leaf in enumerate(flat):
        if not (isinstance(leaf, fx.Node) and leaf.op == "call_function" and leaf.target is torch.cat):
            continue
        parts = leaf.args[0] if leaf.args else leaf.kwargs.get("tensors")
        dim = leaf.args[1] if len(leaf.args) > 1 else leaf.kwargs.get("dim", 0)
        if not isinstance(parts, (list, tuple)) or len(parts) < 2 or dim not in (1, -3) \
                or not all(isinstance(p, fx.Node) and "tensor_meta" in p.meta for p in parts) \
                or any(len(p.meta["tensor_meta"].shape) != 4 for p in parts):
            continue
        found.append({"concat": leaf.name, "output": i, "channels": [int(p.meta["tensor_meta"].shape[1])
                                                                      for p in parts]})
    return found


def split_output_concats(graph: fx.GraphModule) -> PassResult:
    """A copy of ``graph`` whose output channel concats (:func:`output_concats`) are moved to the host: each
    joined tensor becomes a model output of its own, with its own int8 scale, and ``merge_outputs`` concatenates
    them back. Exact in float. For decoupled heads, what ``split_head`` is for fused ones."""
    found = output_concats(graph)
    if not found:
        raise ConfigError("no model output is a channel concat (torch.cat on dim 1) of several tensors: nothing to "
                          "move out of the graph (fused heads are split with split_head)")
    before = graph_cost(graph)
    new = copy.deepcopy(graph)
    new.meta.update(copy.deepcopy(dict(graph.meta)))
    out_node = next(n for n in new.graph.nodes if n.op == "output")
    flat_out, out_spec = tree_flatten(out_node.args[0])
    nodes = {n.name: n for n in new.graph.nodes}
    replaced: dict[int, tuple[list[list[int]], int]] = {}
    leaves: list[Any] = []
    names: list[str] = []
    by_output = {f["output"]: f for f in found}
    for i, leaf in enumerate(flat_out):
        if i not in by_output:
            leaves.append(leaf)
            names.append(leaf.name if isinstance(leaf, fx.Node) else f"output{i}")
            continue
        cat = nodes[by_output[i]["concat"]]
        parts = list(cat.args[0] if cat.args else cat.kwargs["tensors"])
        sizes = by_output[i]["channels"]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        replaced[i] = ([list(range(a, a + n)) for a, n in zip(starts, sizes)], len(parts))
        leaves.extend(parts)
        names.extend(f"{cat.name}.{k}" for k in range(len(parts)))
    out_node.args = (tuple(leaves),)
    for f in found:
        cat = nodes[f["concat"]]
        if not cat.users:
            new.graph.erase_node(cat)
    new.graph.lint()
    new.recompile()
    refresh_shapes(new)
    changes = [{"concat": f["concat"], "parts": f["channels"]} for f in found]
    result = PassResult(new, changes, True, before, graph_cost(new),
                        notes=[f"{len(found)} output concat(s) moved to the host: each part keeps its own scale"])
    result.output_names = names
    result.merge_outputs = OutputMerge(len(flat_out), replaced, out_spec)
    result.float_error = _float_error(graph, new, result.merge_outputs, None)
    return result


class OutputMerge:
    """The host-side function that turns the split model's flat outputs back into the original outputs
    (a class, not a closure, so a repaired model saves and reloads with it)."""

    def __init__(self, flat_count: int, replaced: dict[int, tuple[list[list[int]], int]], spec: Any):
        self.mergers = {i: ChannelMerge(parts) for i, (parts, _n) in replaced.items()}
        self.counts = [replaced[i][1] if i in replaced else 1 for i in range(flat_count)]
        self.spec = spec

    def __call__(self, outputs: Sequence[torch.Tensor]) -> Any:
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if len(outputs) != sum(self.counts):
            raise ConfigError(f"expected {sum(self.counts)} split outputs, got {len(outputs)}")
        leaves, k = [], 0
        for i, n in enumerate(self.counts):
            part = outputs[k:k + n]
            leaves.append(self.mergers[i](*part) if i in self.mergers else part[0])
            k += n
        return tree_unflatten(leaves, self.spec)


def _make_merger(flat_out: list, replaced: dict[int, tuple[list[list[int]], int]], spec) -> Callable:
    return OutputMerge(len(flat_out), replaced, spec)


def _float_error(old: fx.GraphModule, new: fx.GraphModule, merger: Callable | None, calib_data: Any) -> float:
    """Max |split - original| relative to max |original| over the outputs, on one calibration batch (or a
    random batch of the example shape)."""
    if calib_data is not None:
        batch = next(iter(graph_inputs(old, calib_data)))
    else:
        gen = torch.Generator().manual_seed(0)
        batch = tuple(torch.randn(s, generator=gen).to(device_of(old))
                      for s in old.meta.get("qsurgery_input_shapes", []))
        if not batch:
            return float("nan")
    with torch.no_grad():
        a = old(*batch)
        b = new(*batch)
        if merger is not None:
            b = merger(b)
    fa, _ = tree_flatten(a)
    fb, _ = tree_flatten(b)
    if len(fa) != len(fb):
        raise AssertionError("split graph changed the output structure")
    scale = max(float(x.abs().max()) for x in fa)
    return max(float((x - y).abs().max()) for x, y in zip(fa, fb)) / max(scale, 1e-12)
