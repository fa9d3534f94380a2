"""Structured channel pruning with coupled-channel groups, from one dependency analysis of the FX graph.

Every conv/linear output channel is an element; ops that tie channels together join them: a residual add or
an elementwise product (SE gates) joins channel i of both operands, a depthwise conv ties its output channel
to its input channel, a concat lays its inputs' channels side by side (offset bookkeeping), chunk/split slice
them, flatten into a linear expands each channel into its spatial block. The connected components are the
channel groups that must be removed together; a group reaching the model output, an excluded layer, or an op
whose channel coupling is unknown is not prunable (the op is named in the result). Every criterion (L1 of the
filters with a following BN folded in, BN gamma, first-order Taylor) scores the same groups, and channels are
removed physically, so MACs and parameters really drop.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, ConfigError
from ..evaluate import kl_divergence
from ..graph import BATCHNORM_MODULES, device_of, module_macs, set_module
from ..quant.simulate import graph_inputs, run_hooked
from .common import PassResult, _distill_, graph_cost, refresh_shapes

__all__ = ["prune_channels", "channel_groups", "ChannelGroups"]

Element = tuple[str, int]  # (source conv/linear module, output channel)

_SAME_CHANNELS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                          nn.Tanh, nn.GELU, nn.Mish, nn.ELU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
                          nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
                          nn.Hardtanh, nn.PReLU, nn.Softplus) + BATCHNORM_MODULES
_SAME_CHANNELS_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
                            F.gelu, F.mish, F.elu, F.hardtanh, torch.relu, torch.sigmoid, torch.tanh, F.dropout,
                            F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.pad,
                            F.interpolate, torch.clamp, operator.neg}
_SAME_CHANNELS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "clamp", "relu_",
                          "sigmoid_", "float", "mean", "sum", "amax"}
_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub}
_ELEMENTWISE_METHODS = {"add", "mul", "sub", "div", "add_", "mul_", "expand_as"}


class _UnionFind:
    def __init__(self):
        self.parent: dict[Element, Element] = {}

    def add(self, e: Element) -> None:
        self.parent.setdefault(e, e)

    def find(self, e: Element) -> Element:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def union(self, a: Element, b: Element) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclass
class ChannelGroups:
    """The dependency analysis: channel groups (lists of coupled elements), which are prunable, why not,
    and for every weighted module/BN the channel map of its input and output (one element per channel;
    ``None`` where a channel comes from the model input)."""

    groups: dict[Element, list[Element]]
    blocked: dict[Element, str]
    in_maps: dict[str, list]
    out_maps: dict[str, list]
    expand: dict[str, int] = field(default_factory=dict)  # linear after flatten: features per channel
    unknown_ops: list[str] = field(default_factory=list)
    split_maps: dict[str, list[list]] = field(default_factory=dict)  # split/chunk node -> each piece's channels

    @property
    def prunable(self) -> list[Element]:
        return [g for g in self.groups if g not in self.blocked]

    def clusters(self) -> list[list[Element]]:
        """Prunable groups gathered by the set of modules they touch (one 'layer' of the pruning decision)."""
        by_key: dict[tuple[str, ...], list[Element]] = defaultdict(list)
        for g in self.prunable:
            by_key[tuple(sorted({m for m, _ in self.groups[g]}))].append(g)
        return list(by_key.values())


def _map_of(node: Any, maps: dict[str, list]) -> list | None:
    return maps.get(node.name) if isinstance(node, fx.Node) else None


def channel_groups(graph: fx.GraphModule, *, exclude: Sequence[str] = ()) -> ChannelGroups:
    """Analyse which output channels of which convs/linears must be pruned together."""
    uf = _UnionFind()
    maps: dict[str, list] = {}  # node -> channel map (list of Element|None), for tensors with a channel dim
    in_maps: dict[str, list] = {}
    out_maps: dict[str, list] = {}
    expand: dict[str, int] = {}
    blocked_elems: dict[Element, str] = {}
    unknown: list[str] = []
    modules = dict(graph.named_modules())
    split_maps: dict[str, list[list]] = {}
    flattened: dict[str, int] = {}  # flatten node -> spatial positions per channel

    def block(m: list | None, why: str) -> None:
        for e in m or []:
            if e is not None:
                blocked_elems.setdefault(e, why)

    def shape(node: fx.Node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    for node in graph.graph.nodes:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        first = _map_of(node.args[0], maps) if node.args else None
        if node.op == "placeholder":
            s = shape(node)
            if s and len(s) >= 2:
                maps[node.name] = [None] * s[1]
            continue
        if node.op == "output":
            for a in node.all_input_nodes:
                block(maps.get(a.name), "reaches a model output")
            continue
        if node.op == "get_attr":
            continue
        m = modules.get(node.target) if node.op == "call_module" else None
        out_shape = shape(node)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            in_map = first
            if isinstance(m, nn.Linear) and in_map is not None and len(in_map) != m.in_features:
                if isinstance(node.args[0], fx.Node) and flattened.get(node.args[0].name, 0) * len(in_map) \
                        == m.in_features:
                    expand[node.target] = m.in_features // len(in_map)
                else:
                    block(in_map, f"feeds {node.target} through a reshape qsurgery cannot follow")
                    unknown.append(f"{node.target} (input features {m.in_features} vs {len(in_map)} channels)")
                    in_map = None
            in_maps[node.target] = in_map
            groups = getattr(m, "groups", 1)
            channels = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            if groups > 1 and groups == m.in_channels == m.out_channels and in_map is not None:
                out = list(in_map)  # depthwise: output channel c is input channel c
            else:
                if groups > 1:
                    block(in_map, f"grouped conv {node.target} (groups={groups})")
                    unknown.append(f"{node.target} (grouped conv, groups={groups})")
                out = [(node.target, c) for c in range(channels)]
                for e in out:
                    uf.add(e)
                if groups > 1:
                    block(out, f"grouped conv {node.target} (groups={groups})")
                if any(node.target == x or node.target.startswith(x + ".") for x in exclude):
                    block(out, f"excluded ({node.target})")
            maps[node.name] = out
            out_maps[node.target] = out
            continue
        if isinstance(m, BATCHNORM_MODULES):
            in_maps[node.target] = first
            out_maps[node.target] = first
            maps[node.name] = first
            continue
        same = (isinstance(m, _SAME_CHANNELS_MODULES) or (node.op == "call_function" and node.target in
                _SAME_CHANNELS_FUNCTIONS) or (node.op == "call_method" and node.target in _SAME_CHANNELS_METHODS))
        if same and first is not None:
            keeps_channels = out_shape is not None and len(out_shape) >= 2 and out_shape[1] == len(first)
            if keeps_channels or (node.op == "call_method" and node.target in ("mean", "sum", "amax")
                                  and out_shape is not None and len(out_shape) >= 2 and out_shape[1] == len(first)):
                maps[node.name] = first
                continue
        if (node.op == "call_function" and node.target in _ELEMENTWISE) or \
                (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS):
            operand_maps = [maps.get(a.name) for a in args]
            sized = [mp for mp in operand_maps if mp is not None and len(mp) > 1]
            if out_shape is not None and len(out_shape) >= 2 and sized:
                n = out_shape[1]
                full = [mp for mp in sized if len(mp) == n]
                if full and all(len(mp) == n for mp in sized):
                    for mp in full[1:]:
                        for a, b in zip(full[0], mp):
                            if a is not None and b is not None:
                                uf.union(a, b)
                            elif a is not None or b is not None:
                                block([a or b], f"added to the model input at {node.name}")
                    maps[node.name] = full[0]
                    continue
            elif not sized:
                maps[node.name] = operand_maps[0] if operand_maps and operand_maps[0] is not None else None
                if maps[node.name] is None:
                    maps.pop(node.name)
                continue
        if node.op == "call_function" and node.target in (torch.cat, torch.concat):
            parts = node.args[0]
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            part_maps = [maps.get(p.name) if isinstance(p, fx.Node) else None for p in parts]
            channel_dim = dim == 1 or (out_shape is not None and dim == 1 - len(out_shape))
            if channel_dim and all(pm is not None for pm in part_maps):
                maps[node.name] = [e for pm in part_maps for e in pm]
                continue
        if node.op in ("call_function", "call_method") and node.target in (torch.chunk, torch.split, "chunk",
                                                                         "split"):
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
            metas = node.meta.get("tensor_meta")
            rank = len(shape(node.args[0]) or ())
            if (dim == 1 or (rank and dim == 1 - rank)) and first is not None and isinstance(metas, (list, tuple)):
                maps[node.name] = first  # the tuple; getitem takes its piece below
                sizes = [tuple(t.shape)[1] for t in metas]
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                split_maps[node.name] = [first[a:a + n] for a, n in zip(starts, sizes)]
                continue
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0].name in split_maps and out_shape is not None:
            maps[node.name] = split_maps[node.args[0].name][node.args[1]]
            continue
        if node.op == "call_function" and node.target is operator.getitem and first is not None \
                and isinstance(node.args[1], tuple) and len(node.args[1]) >= 2 \
                and all(isinstance(a, slice) and a == slice(None) for a in node.args[1][:1]) \
                and isinstance(node.args[1][1], slice) and node.args[1][1].step in (None, 1) \
                and all(isinstance(a, slice) and a == slice(None) for a in node.args[1][2:]):
            maps[node.name] = first[node.args[1][1]]  # x[:, a:b] (ghost modules)
            for e in first[:node.args[1][1].start or 0] + first[node.args[1][1].stop or len(first):]:
                if e is not None:
                    block([e], f"sliced away at {node.name}")
            continue
        flatten_module = isinstance(m, nn.Flatten)
        if flatten_module or (node.op == "call_function" and node.target in (torch.flatten,)) or \
                (node.op == "call_method" and node.target in ("flatten", "view", "reshape")):
            if first is not None and out_shape is not None and len(out_shape) == 2:
                s_in = shape(node.args[0])
                spatial = math.prod(s_in[2:]) if s_in and len(s_in) > 2 else 1
                if spatial == 1 and out_shape[1] == len(first):
                    maps[node.name] = first
                    continue
                if out_shape[1] == len(first) * spatial:
                    maps[node.name] = first  # expanded per channel by the linear that reads it
                    flattened[node.name] = spatial
                    continue
        # anything else that carries channels: unknown coupling -> refuse to prune through it
        for a in args:
            if maps.get(a.name) is not None and any(e is not None for e in maps[a.name]):
                block(maps[a.name], f"passes through {node.name} ({_describe(node)}), whose channel coupling "
                                    "qsurgery does not know")
                unknown.append(f"{node.name} ({_describe(node)})")
        if out_shape is not None and len(out_shape) >= 2:
            maps[node.name] = [None] * out_shape[1]

    groups: dict[Element, list[Element]] = defaultdict(list)
    for e in uf.parent:
        groups[uf.find(e)].append(e)
    blocked = {}
    for e, why in blocked_elems.items():
        blocked.setdefault(uf.find(e), why)
    return ChannelGroups(dict(groups), blocked, in_maps, out_maps, expand, sorted(set(unknown)), split_maps)


def _describe(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _scores(graph: fx.GraphModule, cg: ChannelGroups, criterion: str, calib_data: Any) -> dict[Element, float]:
    """Importance of each output channel of each source module, normalised per module (mean 1)."""
    modules = dict(graph.named_modules())
    raw: dict[str, torch.Tensor] = {}
    if criterion == "taylor":
        if calib_data is None:
            raise CalibrationError("criterion='taylor' needs calib_data (gradients on a few batches)")
        gm = copy.deepcopy(graph)
        gm.train(False)
        grads: dict[str, torch.Tensor] = {}
        for batch in graph_inputs(gm, calib_data):
            gm.zero_grad()
            out = gm(*batch)
            out = out[0] if isinstance(out, (tuple, list)) else out
            target = out.detach().argmax(1) if out.dim() == 2 else out.detach()
            loss = F.cross_entropy(out, target) if out.dim() == 2 else F.mse_loss(out, target + 0.1)
            loss.backward()
            for name in cg.out_maps:
                mod = gm.get_submodule(name)
                if isinstance(mod, BATCHNORM_MODULES) or mod.weight.grad is None:
                    continue
                w = mod.weight
                g = (w * w.grad).flatten(1).sum(1).abs() if w.dim() > 1 else (w * w.grad).abs()
                grads[name] = grads.get(name, 0) + g.detach()
        raw = grads
    for name in cg.out_maps:
        m = modules[name]
        if isinstance(m, BATCHNORM_MODULES) or name in raw:
            continue
        w = m.weight.detach()
        bn = _following_bn(graph, name)
        if criterion == "bn_gamma" and bn is not None:
            raw[name] = modules[bn].weight.detach().abs()
            continue
        score = w.flatten(1).abs().sum(1)
        if bn is not None and w.shape[0] == modules[bn].num_features:  # the filter as it acts: BN folded in
            b = modules[bn]
            gamma = b.weight.detach().abs() if b.weight is not None else 1.0
            score = score * gamma / (b.running_var.detach() + b.eps).sqrt()
        raw[name] = score
    scores: dict[Element, float] = {}
    for name, s in raw.items():
        s = s.float().cpu()
        s = s / s.mean().clamp(min=1e-12)
        for c, v in enumerate(s.tolist()):
            scores[(name, c)] = v
    return scores


def _following_bn(graph: fx.GraphModule, name: str) -> str | None:
    for node in graph.graph.nodes:
        if node.op == "call_module" and node.target == name and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and isinstance(graph.get_submodule(user.target), BATCHNORM_MODULES):
                return user.target
    return None


def _select(cg: ChannelGroups, scores: dict[Element, float], amount: float | dict[str, float]) -> set[Element]:
    """Per cluster of coupled modules, the ``amount`` share of channel groups with the lowest importance
    (per-layer amounts: the largest share named for any module of the cluster, 0 if none is named)."""
    removed: set[Element] = set()
    for cluster in cg.clusters():
        n = len(cluster)
        mods = sorted({m for g in cluster for m, _ in cg.groups[g]})
        share = _share(amount, mods)
        k = int(math.floor(share * n + 1e-9))
        if k >= n:
            raise ConfigError(f"pruning {share:.0%} would leave {mods[:3]} with zero channels")
        if k == 0:
            continue
        removed.update(_ranked(cg, cluster, scores)[:k])
    return removed


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern + ".")


def _share(amount: float | dict[str, float], modules: Sequence[str]) -> float:
    if not isinstance(amount, dict):
        return amount
    return max((v for k, v in amount.items() if any(_matches(k, m) for m in modules)), default=0.0)


def _ranked(cg: ChannelGroups, cluster: list[Element], scores: dict[Element, float]) -> list[Element]:
    return sorted(cluster, key=lambda g: sum(scores.get(e, 0.0) for e in cg.groups[g]) / len(cg.groups[g]))


def _divergence(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """KL(float || pruned) for logits, relative squared error for other outputs."""
    total = 0.0
    for r, o in zip(ref, out):
        if r.dim() == 2:
            total += kl_divergence(r, o)
        else:
            total += float((o - r).pow(2).mean() / r.pow(2).mean().clamp(min=1e-12))
    return total


def _outputs(graph: fx.GraphModule, batches: list) -> list[torch.Tensor]:
    outs: list[list[torch.Tensor]] = []
    device = device_of(graph)
    with torch.no_grad():
        for batch in batches:
            o = graph(*[t.to(device) for t in batch])
            outs.append([t.detach().cpu() for t in (o if isinstance(o, (list, tuple)) else [o])])
    return [torch.cat(parts) for parts in zip(*outs)]


@dataclass
class PruningSensitivity:
    """How far the outputs move (KL for logits) when each cluster of coupled channels alone is pruned at
    12.5 ... 75 %, with the MACs each level saves. Measured once by ``pruning_sensitivity``, it can price
    several budgets: pass it to ``prune_channels(sensitivity=...)``."""

    clusters: list[list[Element]]
    modules: list[list[str]]  # per cluster: the modules whose channels it couples
    curves: list[list[tuple[float, int, list[Element]]]]  # per cluster: (divergence, MACs saved, groups)
    base_macs: int
    criterion: str
    fingerprint: tuple

    def to_markdown(self) -> str:
        lines = ["| cluster (first modules) | channel groups | divergence at 12.5 / 25 / ... % |", "|---|---:|---|"]
        for cluster, names, curve in zip(self.clusters, self.modules, self.curves):
            lines.append(f"| {', '.join(names[:3])} | {len(cluster)} | "
                         + " / ".join(f"{d:.3g}" for d, _s, _g in curve[1:]) + " |")
        return "\n".join(lines)


def _fingerprint(graph: fx.GraphModule, cg: ChannelGroups) -> tuple:
    return (tuple(n.name for n in graph.graph.nodes), tuple(sorted(len(c) for c in cg.clusters())))


def pruning_sensitivity(graph: fx.GraphModule, calib_data: Any, *, criterion: Literal["l1", "bn_gamma", "taylor"]
                        = "l1", exclude: Sequence[str] = (), compensate: bool = True, images: int = 64,
                        executor: Any = None, checkpoint: str | Path | None = None,
                        progress: bool = True) -> PruningSensitivity:
    """Prune each cluster of coupled channels alone (its least important groups by ``criterion``, at
    12.5 ... 75 %) and measure the output divergence on ``images`` calibration images. ``executor``: where the
    clusters are measured (None: this process; ``"ray"``, an address or a :mod:`qsurgery.executor` executor:
    Ray workers, the same result). ``checkpoint``: a file keeping finished clusters, so that an interrupted run
    resumes."""
    if calib_data is None:
        raise CalibrationError("pruning sensitivity is measured on calibration data: pass calib_data")
    cg = channel_groups(graph, exclude=exclude)
    scores = _scores(graph, cg, criterion, calib_data)
    means = _means_for(graph, cg, calib_data) if compensate else None
    return _measure(graph, cg, scores, calib_data, means, _RATIOS, images, progress, criterion, executor,
                    checkpoint)


def _means_for(graph: fx.GraphModule, cg: ChannelGroups, calib_data: Any) -> dict[str, torch.Tensor]:
    return _input_means(graph, [n for n, mp in cg.in_maps.items() if mp is not None
                                and not isinstance(graph.get_submodule(n), BATCHNORM_MODULES)], calib_data)


def _cluster_setup(graph: fx.GraphModule, cg: ChannelGroups, means: dict[str, torch.Tensor] | None,
                   batches: list, ref: list[torch.Tensor]) -> dict:
    return {"graph": graph, "cg": cg, "means": means, "batches": batches, "ref": ref,
            "base": _predict_macs(graph, cg, set())}


def _cluster_curve(state: dict, payload: tuple[list[Element], Sequence[float]]) -> list:
    """One cluster pruned alone at each ratio (its least important groups first): divergence, MACs saved."""
    ranked, ratios = payload
    graph, cg, base = state["graph"], state["cg"], state["base"]
    curve: list[tuple[float, int, list[Element]]] = [(0.0, 0, [])]
    last_k = 0
    for r in ratios:
        k = int(math.floor(r * len(ranked) + 1e-9))
        if k == last_k or k >= len(ranked):
            continue
        last_k = k
        removed = _elements(cg, set(ranked[:k]))
        div = _divergence(state["ref"], _outputs(_apply(graph, cg, removed, state["means"], shapes=False),
                                                 state["batches"]))
        saved = base - _predict_macs(graph, cg, removed)
        curve.append((max(div, curve[-1][0]), saved, ranked[:k]))
        if div > 1.0:  # this cluster breaks the model: higher ratios only break it more
            break
    return curve


def _measure(graph: fx.GraphModule, cg: ChannelGroups, scores: dict[Element, float], calib_data: Any,
             means: dict[str, torch.Tensor] | None, ratios: Sequence[float], images: int, progress: bool,
             criterion: str, executor: Any = None, checkpoint: str | Path | None = None) -> PruningSensitivity:
    from ..executor import Task, fingerprint, get_executor

    ex = get_executor(executor)
    batches, seen = [], 0
    for batch in graph_inputs(graph, calib_data):
        batches.append(batch)
        seen += batch[0].shape[0]
        if seen >= images:
            break
    ref = _outputs(graph, batches)
    clusters = cg.clusters()
    tasks = [Task(f"cluster{i}", (_ranked(cg, cluster, scores), tuple(ratios)), len(ratios))
             for i, cluster in enumerate(clusters)]
    key = fingerprint(graph, _fingerprint(graph, cg), means, batches) if checkpoint else ""  # map adds the tasks
    curves = ex.map(_cluster_setup, {"graph": graph, "cg": cg, "means": means, "batches": batches, "ref": ref},
                    _cluster_curve, tasks, desc="pruning sensitivity", unit="eval", progress=progress,
                    checkpoint=checkpoint, depends_on=key)
    names = [sorted({m for g in cl for m, _ in cg.groups[g]}) for cl in clusters]
    return PruningSensitivity(clusters, names, curves, _predict_macs(graph, cg, set()), criterion,
                              _fingerprint(graph, cg))


def _allocate(graph: fx.GraphModule, cg: ChannelGroups, sens: PruningSensitivity, goal_macs: float,
              notes: list[str]) -> tuple[set[Element], list[dict]]:
    """Spend the MACs budget greedily where divergence per saved MAC is lowest (clusters assumed to add up)."""
    curves, clusters, base = sens.curves, sens.clusters, sens.base_macs
    level = [0] * len(curves)

    def chosen() -> set[Element]:
        return {g for c, curve in enumerate(curves) for g in curve[level[c]][2]}

    saved = 0
    goal_saved = base - goal_macs
    while saved < goal_saved:
        best, best_eff = None, math.inf
        for c, curve in enumerate(curves):  # one level at a time, so the budget is not overshot by much
            j = level[c] + 1
            if j < len(curve) and curve[j][1] > curve[level[c]][1]:
                eff = (curve[j][0] - curve[level[c]][0]) / (curve[j][1] - curve[level[c]][1])
                if eff < best_eff:
                    best, best_eff = (c, j), eff
        if best is None:
            notes.append(f"MACs goal {goal_macs / 1e6:.1f} M not reachable with at most {max(_RATIOS):.0%} of each "
                         "cluster (or clusters that break the model): pruned what was measured")
            break
        c, j = best
        level[c] = j
        saved = base - _predict_macs(graph, cg, _elements(cg, chosen()))  # savings overlap: count them together
    table = [{"modules": sens.modules[c][:3], "groups": len(clusters[c]),
              "removed": len(curves[c][level[c]][2]), "divergence": curves[c][level[c]][0],
              "macs_saved": curves[c][level[c]][1]} for c in range(len(curves)) if level[c]]
    return chosen(), table


_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


def _kept(mp: list | None, removed_elems: set[Element]) -> list[int] | None:
    if mp is None:
        return None
    return [i for i, e in enumerate(mp) if e is None or e not in removed_elems]


def _predict_macs(graph: fx.GraphModule, cg: ChannelGroups, removed_elems: set[Element]) -> int:
    macs = module_macs(graph)
    total = 0
    for name, m in macs.items():
        mod = graph.get_submodule(name)
        out_map = cg.out_maps.get(name)
        in_map = cg.in_maps.get(name)
        out_frac = len(_kept(out_map, removed_elems)) / len(out_map) if out_map else 1.0
        if getattr(mod, "groups", 1) > 1:
            total += int(round(m * out_frac))  # depthwise: in == out
            continue
        in_frac = len(_kept(in_map, removed_elems)) / len(in_map) if in_map else 1.0
        total += int(round(m * out_frac * in_frac))
    return total


def _input_means(graph: fx.GraphModule, names: Sequence[str], calib_data: Any) -> dict[str, torch.Tensor]:
    """Mean of every input channel (input feature, for linears) of the named modules over calibration data."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    hooks = []
    for name in names:
        def hook(_m, inputs, name=name):
            x = inputs[0].detach().float()
            dims = [d for d in range(x.dim()) if d != 1] if x.dim() > 2 else [0]
            n = x.numel() // x.shape[1]
            sums[name] = sums.get(name, 0) + x.sum(dims)
            counts[name] += n
        hooks.append(graph.get_submodule(name).register_forward_pre_hook(hook))
    run_hooked(graph, calib_data, hooks)
    return {k: v / max(counts[k], 1) for k, v in sums.items()}


def _apply(graph: fx.GraphModule, cg: ChannelGroups, removed_elems: set[Element],
           means: dict[str, torch.Tensor] | None = None, shapes: bool = True) -> fx.GraphModule:
    new = copy.deepcopy(graph)
    new.meta.update(copy.deepcopy(dict(graph.meta)))
    for name in set(cg.out_maps) | set(cg.in_maps):
        m = new.get_submodule(name)
        out_keep = _kept(cg.out_maps.get(name), removed_elems)
        in_keep = _kept(cg.in_maps.get(name), removed_elems)
        set_module(new, name, _shrink(m, in_keep, out_keep, cg.expand.get(name, 1), (means or {}).get(name)))
    for node in new.graph.nodes:  # a channel split keeps its pieces: each piece's kept channels, as sizes
        pieces = cg.split_maps.get(node.name)
        if pieces is not None and node.op in ("call_function", "call_method"):
            sizes = [len(_kept(piece, removed_elems)) for piece in pieces]
            node.op, node.target = "call_method", "split"
            node.args, node.kwargs = (node.args[0], sizes), {"dim": 1}
    new.recompile()
    if shapes:  # MACs need them; a throw-away trial does not
        refresh_shapes(new)
    return new


def _compensation(w: torch.Tensor, in_keep: list[int] | None, mean: torch.Tensor | None, expand: int
                  ) -> torch.Tensor | None:
    """What the removed input channels contributed on average, per output: sum_c W[:, c] * mean_c (the
    constant part of a removed channel, which the next layer's bias can carry instead)."""
    if mean is None or in_keep is None:
        return None
    n_in = w.shape[1] // expand if w.dim() == 2 else w.shape[1]
    drop = sorted(set(range(n_in)) - set(in_keep))
    if not drop:
        return None
    if w.dim() == 2:
        idx = torch.tensor([c * expand + j for c in drop for j in range(expand)], device=w.device)
        return w[:, idx] @ mean.to(w.device)[idx]
    idx = torch.tensor(drop, device=w.device)
    return w[:, idx].flatten(2).sum(2) @ mean.to(w.device)[idx]


def _shrink(m: nn.Module, in_keep: list[int] | None, out_keep: list[int] | None, expand: int,
            mean: torch.Tensor | None = None) -> nn.Module:
    n_out = m.num_features if isinstance(m, BATCHNORM_MODULES) else m.weight.shape[0]
    n_in = None if isinstance(m, BATCHNORM_MODULES) else (
        m.in_features // expand if isinstance(m, nn.Linear) else m.in_channels)
    if (out_keep is None or len(out_keep) == n_out) and (in_keep is None or n_in is None or len(in_keep) == n_in):
        return m  # untouched (also grouped convs, which are never pruned)
    dev = next(iter(m.parameters())).device if list(m.parameters()) else None
    if isinstance(m, BATCHNORM_MODULES):
        keep = torch.tensor(out_keep if out_keep is not None else range(m.num_features), device=dev)
        new = type(m)(len(keep), eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats).to(dev)
        with torch.no_grad():
            if m.affine:
                new.weight.copy_(m.weight[keep])
                new.bias.copy_(m.bias[keep])
            if m.track_running_stats:
                new.running_mean.copy_(m.running_mean[keep])
                new.running_var.copy_(m.running_var[keep])
                new.num_batches_tracked.copy_(m.num_batches_tracked)
        for child_name, child in m.named_children():  # capture hangs a BN's activation under it (bn1.act)
            new.add_module(child_name, child)
        return new.train(m.training)
    w = m.weight.detach()
    o = torch.tensor(out_keep if out_keep is not None else range(w.shape[0]), device=w.device)
    comp = None if (getattr(m, "groups", 1) > 1) else _compensation(w, in_keep, mean, expand)
    if isinstance(m, nn.Linear):
        i_ch = in_keep if in_keep is not None else range(w.shape[1] // expand)
        i = torch.tensor([c * expand + j for c in i_ch for j in range(expand)], device=w.device)
        new = nn.Linear(len(i), len(o), bias=m.bias is not None or comp is not None).to(w.device)
        with torch.no_grad():
            new.weight.copy_(w[o][:, i])
            if new.bias is not None:
                new.bias.copy_((m.bias[o] if m.bias is not None else 0) + (comp[o] if comp is not None else 0))
        return new
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if depthwise:
        cin = len(o)
        groups = len(o)
        weight = w[o]
    else:
        i = torch.tensor(in_keep if in_keep is not None else range(w.shape[1]), device=w.device)
        cin, groups = len(i), 1
        weight = w[o][:, i]
    new = type(m)(cin, len(o), m.kernel_size, m.stride, m.padding, m.dilation, groups,
                  m.bias is not None or comp is not None, m.padding_mode).to(w.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if new.bias is not None:
            new.bias.copy_((m.bias[o] if m.bias is not None else 0) + (comp[o] if comp is not None else 0))
    return new


def prune_channels(graph: fx.GraphModule, *, amount: float | dict[str, float] | None = 0.3,
                   target_macs: float | None = None,
                   criterion: Literal["l1", "bn_gamma", "taylor"] = "l1", exclude: Sequence[str] = (),
                   calib_data: Any = None, steps: int = 1,
                   recover: Callable[[fx.GraphModule], fx.GraphModule] | Literal["kd"] | None = None,
                   recover_steps: int = 50, lr: float = 1e-4, compensate: bool = True,
                   allocation: Literal["auto", "uniform", "sensitivity"] = "auto", sensitivity_images: int = 64,
                   sensitivity: PruningSensitivity | None = None, executor: Any = None,
                   progress: bool = True) -> PassResult:
    """Remove the least important channel groups.

    ``amount``: share of each coupled cluster's channel groups to remove (in ``steps`` equal steps); or per
    layer, ``{"blocks.5.*": 0.5, "conv_head": 0.25}`` (names, prefixes or globs; a cluster takes the largest
    share named for any of its modules, unnamed clusters are kept; allocation is then yours); or
    ``target_macs``: a MACs target (absolute, or a fraction of the current MACs when <= 1).
    ``allocation``: ``"uniform"`` takes the same share from every cluster of coupled channels;
    ``"sensitivity"`` measures, on ``sensitivity_images`` calibration images, how far the output moves when
    each cluster alone is pruned at 12.5 ... 75 %, and spends the same MACs budget (the uniform one's for
    ``amount``) where it moves the output least; ``"auto"``: sensitivity when ``calib_data`` is given.
    ``sensitivity``: a ``pruning_sensitivity`` result of this graph, so several budgets share one measurement.
    ``exclude``: module names (or prefixes) whose output channels are kept, e.g. the head.
    ``recover``: after each step, ``"kd"`` (``recover_steps`` steps of distillation against the unpruned
    graph on ``calib_data``) or a callable graph -> graph. With ``calib_data`` and ``compensate``, the mean
    contribution of every removed channel is folded into the bias of the layers that read it (a removed channel
    is rarely zero on average: BN shifts and saturated activations make it a constant the next layer relied
    on). Approximate: the result says so. ``executor``: where the pruning sensitivity runs (see
    :func:`pruning_sensitivity`).
    """
    modules = dict(graph.named_modules())
    missing = [x for x in exclude if x not in modules]
    if missing:
        raise ConfigError(f"excluded layer(s) {missing} are not modules of this graph")
    per_layer = isinstance(amount, dict) and target_macs is None
    if per_layer:
        bad = {k: v for k, v in amount.items() if not isinstance(v, (int, float)) or not 0 <= v < 1}
        if bad or not amount:
            raise ConfigError(f"per-layer amounts must map layer names to shares in [0, 1), got {bad or amount}")
        unknown = [k for k in amount if not any(_matches(k, m) for m in modules)]
        if unknown:
            raise ConfigError(f"per-layer amount(s) for {unknown}: no module of this graph matches")
        if allocation == "sensitivity" or sensitivity is not None:
            raise ConfigError("per-layer amounts already say where channels go: drop allocation='sensitivity'")
        allocation = "uniform"
    elif target_macs is None and (amount is None or isinstance(amount, dict) or not 0 < amount < 1):
        raise ConfigError(f"amount must be in (0, 1), got {amount}")
    if criterion not in ("l1", "bn_gamma", "taylor"):
        raise ConfigError(f"criterion must be 'l1', 'bn_gamma' or 'taylor', not {criterion!r}")
    if recover == "kd" and calib_data is None:
        raise CalibrationError("recover='kd' distils on calibration data: pass calib_data")
    if steps < 1:
        raise ConfigError("steps must be >= 1")
    if allocation not in ("auto", "uniform", "sensitivity"):
        raise ConfigError(f"allocation must be 'auto', 'uniform' or 'sensitivity', not {allocation!r}")
    if allocation == "sensitivity" and calib_data is None:
        raise CalibrationError("allocation='sensitivity' measures each cluster on calibration data: pass "
                               "calib_data (or use allocation='uniform')")
    by_sensitivity = allocation == "sensitivity" or (allocation == "auto" and calib_data is not None)
    if sensitivity is not None:
        if allocation == "uniform":
            raise ConfigError("a sensitivity was given with allocation='uniform': drop one of them")
        if steps != 1:
            raise ConfigError("a precomputed sensitivity prices one step; with steps > 1 each step measures its own")
        if sensitivity.criterion != criterion:
            raise ConfigError(f"the sensitivity ranked channels by {sensitivity.criterion!r}, not {criterion!r}")
        by_sensitivity = True
    before = graph_cost(graph)
    current = graph
    changes: list[dict] = []
    notes: list[str] = []
    cg0 = channel_groups(graph, exclude=exclude)
    if cg0.unknown_ops:
        notes.append("not pruned through (channel coupling unknown): " + ", ".join(cg0.unknown_ops))
    if not cg0.prunable:
        raise ConfigError("no prunable channel group: every channel reaches an output, an excluded layer or an "
                          f"op with unknown coupling ({', '.join(cg0.unknown_ops) or 'none'})")
    goal = None
    if target_macs is not None:
        goal = target_macs * before["macs"] if target_macs <= 1 else target_macs
    if goal is not None and by_sensitivity:
        amount = 0.0
    elif goal is not None:
        scores = _scores(graph, cg0, criterion, calib_data)
        lo, hi = 0.0, 0.95
        for _ in range(30):
            mid = (lo + hi) / 2
            predicted = _predict_macs(graph, cg0, _elements(cg0, _select(cg0, scores, mid)))
            lo, hi = (mid, hi) if predicted > goal else (lo, mid)
        amount = hi
        notes.append(f"target {goal / 1e6:.1f} M MACs -> amount {amount:.3f}")
    if per_layer:
        per_step = {k: 1 - (1 - v) ** (1 / steps) for k, v in amount.items()}
    else:
        per_step = 1 - (1 - amount) ** (1 / steps)
    for step in range(steps):
        cg = channel_groups(current, exclude=exclude)
        scores = _scores(current, cg, criterion, calib_data)
        means = _means_for(current, cg, calib_data) if calib_data is not None and compensate else None
        clusters_table = None
        if by_sensitivity:
            if goal is not None:
                step_goal = before["macs"] * (goal / before["macs"]) ** ((step + 1) / steps)
            else:
                step_goal = _predict_macs(current, cg, _elements(cg, _select(cg, scores, per_step)))
            sens = sensitivity
            if sens is None:
                sens = _measure(current, cg, scores, calib_data, means, _RATIOS, sensitivity_images, progress,
                                criterion, executor)
            elif sens.fingerprint != _fingerprint(current, cg):
                raise ConfigError("the sensitivity was measured on another graph (or with other exclusions)")
            groups, clusters_table = _allocate(current, cg, sens, step_goal, notes)
            removed = _elements(cg, groups)
        else:
            removed = _elements(cg, _select(cg, scores, per_step))
        predicted = _predict_macs(current, cg, removed)
        pruned = _apply(current, cg, removed, means)
        if recover == "kd":
            _distill_(pruned, graph, calib_data, recover_steps, lr)
        elif callable(recover):
            pruned = recover(pruned)
        cost = graph_cost(pruned)
        changes.append({"step": step + 1, "channels_removed": len(removed), "groups_removed":
                        len({g for g in cg.groups if cg.groups[g][0] in removed}), "macs": cost["macs"],
                        "predicted_macs": predicted, "params": cost["params"],
                        "allocation": "sensitivity" if by_sensitivity else "uniform",
                        **({"clusters": clusters_table} if clusters_table is not None else {})})
        current = pruned
    _check_shapes(graph, current)
    result = PassResult(current, changes, False, before, graph_cost(current), notes=notes)
    result.notes.append("approximate: channels were removed; recover with recover='kd' or your own fine-tuning")
    return result


def _elements(cg: ChannelGroups, groups: set[Element]) -> set[Element]:
    return {e for g in groups for e in cg.groups[g]}


def _check_shapes(old: fx.GraphModule, new: fx.GraphModule) -> None:
    shapes = old.meta.get("qsurgery_input_shapes")
    if not shapes:
        return
    device = device_of(old)
    x = [torch.zeros(s, device=device) for s in shapes]
    with torch.no_grad():
        a, b = old(*x), new(*x)
    fa = a if isinstance(a, (list, tuple)) else [a]
    fb = b if isinstance(b, (list, tuple)) else [b]
    if [tuple(t.shape) for t in fa] != [tuple(t.shape) for t in fb]:
        raise AssertionError("pruning changed the output shapes: a dependency the analysis missed")
