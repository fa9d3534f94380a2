"""Replace depthwise-separable units (depthwise conv -> [BN] -> [act] -> 1x1 conv -> [BN]) by one dense k x k conv.

Depthwise convs are where MobileNet/EfficientNet-style models lose int8 accuracy (one channel's few weights
under one scale, large folded-BN gains). A dense conv carries the same function with well-conditioned
weights. With nothing non-linear between the two convs the composition is exact
(``W[o, i] = pw[o, i] * dw[i]``); with an activation between them the dense conv is fitted by least squares
over im2col features of calibration data (closed form, no labels), optionally followed by a short
distillation against the original model.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, ConfigError, QSurgeryError
from ..graph import BATCHNORM_MODULES, clip_bounds, is_activation, pair
from ..quant.simulate import graph_inputs
from .common import PassResult, _distill_, graph_cost, refresh_shapes

__all__ = ["dw_to_dense", "find_separable", "activation_linearity", "SeparableUnit"]


@dataclass
class SeparableUnit:
    """A depthwise-separable unit found by structure in a captured graph."""

    block: str
    dw: str
    bn1: str | None
    act: str | None
    pw: str
    bn2: str | None
    nodes: list[str]
    macs: int
    dense_macs: int

    @property
    def linear(self) -> bool:
        return self.act is None

    def to_dict(self) -> dict:
        return asdict(self)


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_pointwise(m: nn.Module, channels: int) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) == (1, 1)
            and tuple(m.stride) == (1, 1) and tuple(pair(m.padding)) == (0, 0) and m.in_channels == channels)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _block_name(dw: str, pw: str) -> str:
    a, b = dw.split("."), pw.split(".")
    common = []
    for x, y in zip(a, b):
        if x != y:
            break
        common.append(x)
    return ".".join(common) if common else dw


def _out_hw(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return int(meta.shape[-1] * meta.shape[-2]) if meta is not None and hasattr(meta, "shape") else 0


def _match(gm: fx.GraphModule, node: fx.Node) -> tuple[SeparableUnit | None, str]:
    """The unit starting at depthwise conv ``node``, or None and why not."""
    dw = _module(gm, node)
    if not _is_depthwise(dw):
        return None, "it is not a depthwise conv (groups must equal in and out channels)"
    chain = [node]
    cur, bn1, act = node, None, None
    nxt = _single_user(cur)
    if nxt is not None and isinstance(_module(gm, nxt), BATCHNORM_MODULES):
        bn1, cur = nxt.target, nxt
        chain.append(nxt)
        nxt = _single_user(cur)
    if nxt is not None and is_activation(gm, nxt):
        act, cur = nxt.name, nxt
        chain.append(nxt)
        nxt = _single_user(cur)
    if nxt is None:
        return None, f"its output ('{cur.name}') is read by {len(cur.users)} ops, not by one 1x1 conv"
    pw = _module(gm, nxt)
    if not _is_pointwise(pw, dw.out_channels) or nxt.args[0] is not cur:
        return None, f"it is followed by '{nxt.name}', not by a 1x1 stride-1 conv over its {dw.out_channels} channels"
    chain.append(nxt)
    cur, bn2 = nxt, None
    after = _single_user(cur)
    if after is not None and isinstance(_module(gm, after), BATCHNORM_MODULES):
        bn2 = after.target
        chain.append(after)
    hw = _out_hw(node)
    k = dw.kernel_size[0] * dw.kernel_size[1]
    macs = hw * (dw.out_channels * k + dw.out_channels * pw.out_channels)
    dense = hw * pw.out_channels * dw.in_channels * k
    unit = SeparableUnit(_block_name(node.target, nxt.target), node.target, bn1, act, nxt.target, bn2,
                         [n.name for n in chain], macs, dense)
    return unit, ""


def find_separable(graph: fx.GraphModule) -> list[SeparableUnit]:
    """Every depthwise-separable unit of a captured graph, in execution order (found by structure)."""
    units = []
    for node in graph.graph.nodes:
        if node.op == "call_module" and _is_depthwise(_module(graph, node)):
            unit, _ = _match(graph, node)
            if unit is not None:
                units.append(unit)
    return units


def _identity_range(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """Where a piecewise-linear activation is the identity ([lo, hi]); None for curved ones (SiLU, GELU, ...)."""
    bounds = clip_bounds(gm, node)
    if bounds is not None:
        return bounds
    leaky = (isinstance(gm.get_submodule(node.target), (nn.LeakyReLU, nn.PReLU)) if node.op == "call_module"
             else node.target is F.leaky_relu)
    return (0.0, math.inf) if leaky else None


class _PreActivations(fx.Interpreter):
    """Runs the graph and counts, per channel of each watched activation's input, positions below, inside and
    above the range where the activation is the identity."""

    def __init__(self, gm: fx.GraphModule, watch: dict[str, tuple[float, float]]):
        super().__init__(gm)
        self.watch = watch
        self.counts: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        if n.name in self.watch:
            z = n.args[0] if isinstance(n.args[0], fx.Node) else None
            z = self.env[z] if z is not None else None
            if isinstance(z, torch.Tensor) and z.dim() >= 2:
                lo, hi = self.watch[n.name]
                z = z.detach().transpose(0, 1).reshape(z.shape[1], -1)
                c = torch.stack([(z < lo).sum(1), ((z >= lo) & (z <= hi)).sum(1), (z > hi).sum(1)], 1).cpu()
                self.counts[n.name] = self.counts[n.name] + c if n.name in self.counts else c
        return super().run_node(n)


def activation_linearity(graph: fx.GraphModule, units: Sequence[SeparableUnit],
                         calib: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, dict]:
    """How far each unit's activation is from the identity on calibration data: its live channels (output not
    constant) and the share of their positions where the activation is not the identity. 0 means a dense conv
    reproduces the unit on this data; curved activations (SiLU, GELU) report ``nonlinear_share=None``."""
    nodes = {n.name: n for n in graph.graph.nodes}
    watch = {u.act: r for u in units if u.act and (r := _identity_range(graph, nodes[u.act])) is not None}
    counts: dict[str, torch.Tensor] = {}
    if watch and calib:
        interp = _PreActivations(graph, watch)
        with torch.no_grad():
            for inputs in calib:
                interp.run(*inputs)
        counts = interp.counts
    out = {}
    for u in units:
        if u.act is None:
            continue
        c = counts.get(u.act)
        if c is None:
            out[u.block] = {"activation": u.act, "live_channels": None, "nonlinear_share": None}
            continue
        total = c.sum(1)
        live = (c[:, 0] < total) & (c[:, 2] < total)  # neither always below nor always above: not constant
        outside = (c[live][:, 0] + c[live][:, 2]).sum()
        share = float(outside) / max(float(total[live].sum()), 1.0)
        out[u.block] = {"activation": u.act, "channels": int(len(c)), "live_channels": int(live.sum()),
                        "nonlinear_share": share}
    return out


def _bn_affine(bn: nn.Module | None, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if bn is None:
        return torch.ones(channels, dtype=like.dtype, device=like.device), torch.zeros_like(like[:channels, 0, 0, 0])
    scale = (bn.weight if bn.weight is not None else 1.0) / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.bias is not None else 0.0) - bn.running_mean * scale
    return scale.detach(), shift.detach()


def _compose(dw: nn.Conv2d, bn1: nn.Module | None, pw: nn.Conv2d, bn2: nn.Module | None) -> nn.Conv2d:
    """The dense conv equal to dw -> bn1 -> pw -> bn2 (no activation between)."""
    with torch.no_grad():
        s1, t1 = _bn_affine(bn1, dw.out_channels, dw.weight)
        wd = dw.weight[:, 0] * s1[:, None, None]
        bd = (dw.bias if dw.bias is not None else torch.zeros_like(s1)) * s1 + t1
        s2, t2 = _bn_affine(bn2, pw.out_channels, pw.weight)
        wp = pw.weight[:, :, 0, 0] * s2[:, None]
        bp = (pw.bias if pw.bias is not None else torch.zeros_like(s2)) * s2 + t2
        dense = _dense_like(dw, pw)
        dense.weight.copy_(wp[:, :, None, None] * wd[None])
        dense.bias.copy_(bp + wp @ bd)
    return dense


def _dense_like(dw: nn.Conv2d, pw: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(dw.in_channels, pw.out_channels, dw.kernel_size, dw.stride, dw.padding, dw.dilation,
                     groups=1, bias=True, padding_mode=dw.padding_mode, device=dw.weight.device,
                     dtype=dw.weight.dtype).eval()


def _fit(gm: fx.GraphModule, unit: SeparableUnit, calib: list[tuple[torch.Tensor, ...]], ridge: float
         ) -> tuple[nn.Conv2d, list[str]]:
    """Least-squares dense conv from the unit's calibration inputs to its outputs (im2col, closed form)."""
    dw = gm.get_submodule(unit.dw)
    pw = gm.get_submodule(unit.pw)
    last = gm.get_submodule(unit.bn2 or unit.pw)
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str, pick):
        def hook(_m, inp, out) -> None:
            seen[key] = pick(inp, out).detach()
        return hook

    if dw.padding_mode != "zeros":
        raise QSurgeryError(f"{unit.dw}: padding mode {dw.padding_mode!r} is not supported by reconstruct")
    hooks = [dw.register_forward_hook(keep("x", lambda i, o: i[0])),
             last.register_forward_hook(keep("y", lambda i, o: o))]
    d = dw.in_channels * dw.kernel_size[0] * dw.kernel_size[1] + 1
    a = torch.zeros(d, d, dtype=torch.float64)
    b = torch.zeros(d, pw.out_channels, dtype=torch.float64)
    rows = 0
    try:
        with torch.no_grad():
            for inputs in calib:
                gm(*inputs)
                x, y = seen["x"], seen["y"]
                cols = F.unfold(x, dw.kernel_size, dw.dilation, pair(dw.padding), dw.stride)  # N, C*k*k, L
                phi = torch.cat([cols, torch.ones_like(cols[:, :1])], 1)  # N, d, L
                target = y.reshape(y.shape[0], y.shape[1], -1)
                # per-batch sums in float32 (fast), accumulated across batches in float64
                a += torch.einsum("ndl,nel->de", phi, phi).double().cpu()
                b += torch.einsum("ndl,nol->do", phi, target).double().cpu()
                rows += phi.shape[0] * phi.shape[2]
    finally:
        for h in hooks:
            h.remove()
    notes = []
    if rows < d:
        raise CalibrationError(
            f"{unit.block}: {rows} calibration positions cannot determine {d} unknowns per output channel; "
            f"give at least {math.ceil(d / max(rows / max(len(calib), 1), 1))} calibration batches like these")
    lam = ridge * float(torch.trace(a)) / d
    if rows < 10 * d:
        lam = max(lam, 1e-3 * float(torch.trace(a)) / d)
        msg = (f"{unit.block}: only {rows} calibration positions for {d} unknowns: fitted with stronger "
               "regularisation; more calibration images give a better fit")
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    # ridge towards the composition that ignores the activation (not towards zero): im2col features of
    # neighbouring pixels are nearly collinear, and an unanchored fit takes large cancelling weights that
    # int8 cannot represent
    prior = _compose(dw, gm.get_submodule(unit.bn1) if unit.bn1 else None, pw,
                     gm.get_submodule(unit.bn2) if unit.bn2 else None)
    w0 = torch.cat([prior.weight.detach().reshape(pw.out_channels, -1).T,
                    prior.bias.detach()[None]]).double().cpu()
    w = torch.linalg.solve(a + lam * torch.eye(d, dtype=torch.float64), b + lam * w0)  # d x out
    dense = _dense_like(dw, pw)
    with torch.no_grad():
        dense.weight.copy_(w[:-1].T.reshape(dense.weight.shape).to(dense.weight))
        dense.bias.copy_(w[-1].to(dense.bias))
    return dense, notes


def _replace(gm: fx.GraphModule, unit: SeparableUnit, dense: nn.Module) -> str:
    nodes = {n.name: n for n in gm.graph.nodes}
    chain = [nodes[n] for n in unit.nodes]
    path = f"{unit.block}.conv_dense" if unit.block != unit.dw else f"{unit.dw}_dense"
    gm.add_submodule(path, dense)
    with gm.graph.inserting_before(chain[0]):
        new = gm.graph.call_module(path, (chain[0].args[0],))
    new.meta = dict(chain[-1].meta)
    chain[-1].replace_all_uses_with(new)
    for node in reversed(chain):
        gm.graph.erase_node(node)
    return path


def _relative_error(a: torch.nn.Module, b: torch.nn.Module, calib: list[tuple[torch.Tensor, ...]]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for inputs in calib:
            ya, yb = a(*inputs), b(*inputs)
            ya = ya if isinstance(ya, torch.Tensor) else ya[0]
            yb = yb if isinstance(yb, torch.Tensor) else yb[0]
            num += float((ya - yb).double().pow(2).sum())
            den += float(ya.double().pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def dw_to_dense(graph: fx.GraphModule, blocks: Sequence[str] | None = None, *,
                mode: Literal["auto", "exact", "reconstruct"] = "auto", calib_data: Iterable | None = None,
                ridge: float = 1e-2, finetune_steps: int = 0, finetune_lr: float = 1e-4) -> PassResult:
    """Replace the named depthwise-separable units (by block name, e.g. ``"blocks.0.0"``, or depthwise conv
    name) with dense convs. ``blocks=None`` changes nothing and lists every candidate with its MACs.

    ``mode="exact"`` composes the two convs (refused where an activation sits between them);
    ``"reconstruct"`` fits the dense conv on ``calib_data`` by least squares; ``"auto"`` picks per unit.
    ``finetune_steps`` > 0 then distils the new convs against the original model on ``calib_data``.
    """
    if mode not in ("auto", "exact", "reconstruct"):
        raise ConfigError(f"mode must be 'auto', 'exact' or 'reconstruct', got {mode!r}")
    candidates = find_separable(graph)
    before = graph_cost(graph)
    if blocks is None:
        changes = [{"candidate": u.block, "depthwise": u.dw, "pointwise": u.pw, "exact_possible": u.linear,
                    "macs": u.macs, "dense_macs": u.dense_macs} for u in candidates]
        notes = ["dry run: nothing replaced; pass blocks=[...] to replace"]
        if calib_data is not None:
            linearity = activation_linearity(graph, candidates, list(graph_inputs(graph, calib_data)))
            for change in changes:
                change.update(linearity.get(change["candidate"], {}))
            notes.append("nonlinear_share: share of the live channels' calibration positions where the activation "
                         "between the convs is not the identity (0: a dense conv reproduces the unit)")
        return PassResult(copy.deepcopy(graph), changes, True, before, before, notes=notes)
    by_name = {u.block: u for u in candidates} | {u.dw: u for u in candidates}
    chosen: list[SeparableUnit] = []
    for name in blocks:
        if name not in by_name:
            raise ConfigError(f"{name!r} is not a depthwise-separable unit: {_why_not(graph, name, candidates)}")
        chosen.append(by_name[name])
    needs_fit = [u for u in chosen if not u.linear or mode == "reconstruct"]
    if mode == "exact" and any(not u.linear for u in chosen):
        bad = [u.block for u in chosen if not u.linear]
        raise ConfigError(f"exact mode cannot replace {bad}: an activation sits between the depthwise and the 1x1 "
                          "conv; use mode='reconstruct' (or 'auto') with calib_data")
    calib: list[tuple[torch.Tensor, ...]] = []
    if needs_fit or finetune_steps:
        if calib_data is None:
            raise CalibrationError(f"reconstructing {[u.block for u in needs_fit] or 'the fine-tune'} needs "
                                   "calib_data (input batches)")
        calib = list(graph_inputs(graph, calib_data))
    linearity = activation_linearity(graph, needs_fit, calib) if needs_fit else {}
    new = copy.deepcopy(graph)
    new.meta.update(copy.deepcopy(dict(graph.meta)))
    changes, notes, new_params = [], [], []
    exact = True
    for unit in chosen:
        if unit.linear and mode != "reconstruct":
            dense = _compose(new.get_submodule(unit.dw), new.get_submodule(unit.bn1) if unit.bn1 else None,
                             new.get_submodule(unit.pw), new.get_submodule(unit.bn2) if unit.bn2 else None)
            how = "exact"
        else:
            dense, fit_notes = _fit(new, unit, calib, ridge)
            notes += fit_notes
            how = "reconstructed"
            exact = False
            lin = linearity.get(unit.block, {})
            if lin.get("nonlinear_share"):  # > 0: the fit cannot be exact
                notes.append(f"{unit.block}: the activation between its convs is not the identity on "
                             f"{100 * lin['nonlinear_share']:.1f} % of the calibration positions of its "
                             f"{lin['live_channels']} live channels; the dense conv can only approximate that. "
                             f"To keep the unit's function, give its depthwise conv more precision instead: "
                             f"QuantConfig.override({unit.dw!r}, weight_bits=16) or dtype='float'")
        path = _replace(new, unit, dense)
        new_params.append(path)
        changes.append({"block": unit.block, "replaced": unit.nodes, "new": path, "how": how,
                        "macs_before": unit.macs, "macs_after": unit.dense_macs} | linearity.get(unit.block, {}))
    new.delete_all_unused_submodules()
    new.graph.lint()
    new.recompile()
    refresh_shapes(new)
    if finetune_steps:
        _distill_(new, graph, calib, finetune_steps, finetune_lr, trainable=new_params)
        exact = False
        notes.append(f"distilled the new convs for {finetune_steps} steps against the original model")
    result = PassResult(new, changes, exact, before, graph_cost(new), notes=notes)
    if calib:
        result.float_error = _relative_error(graph, new, calib)
    return result


def _why_not(gm: fx.GraphModule, name: str, candidates: list[SeparableUnit]) -> str:
    modules = dict(gm.named_modules())
    if name not in modules:
        from difflib import get_close_matches

        near = get_close_matches(name, [u.block for u in candidates] + list(modules), n=4)
        return f"no such block or module (close: {near}); candidates: {[u.block for u in candidates][:8]}"
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == name:
            return _match(gm, node)[1] or "it matched, but not by that name"
    inner = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(name + ".")
             and _is_depthwise(_module(gm, n))]
    if not inner:
        return "it contains no depthwise conv"
    return _match(gm, inner[0])[1] or f"its depthwise conv is {inner[0].target}"
