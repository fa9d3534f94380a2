"""Learned rounding (AdaRound, Nagel et al. 2020): choose, for every weight, whether it rounds up or down,
so that each layer's output on calibration data stays as close as possible to the float model's.

Layers are done in order from the input. For layer ``L`` the pass takes its inputs as the quantized model
produces them (the layers before ``L`` already rounded), samples output positions, and fits a soft rounding
variable per weight (rectified sigmoid, annealed regulariser that pushes it to 0 or 1) so that the layer's
output, after the clipping activation that follows it if any, matches the float model's at the same positions.
Then the weights are put on their grid (``scale x integer``) in the graph and the scale is pinned in the graph
(``WEIGHT_SCALES``), so the simulation, the integer twin and the QDQ export hold exactly the integers chosen here.

With ``blocks=True`` the weighted layers of one module (an inverted residual's expand, depthwise and project convs)
are rounded together (Li et al. 2021, BRECQ): the block runs on whole calibration images with the soft-rounded
weights and its activation grids, from the inputs the quantized blocks before it produced, and its output is
matched to the float model's, so one layer's rounding can make up for another's.

Works for conv (any groups, 2-d) and linear layers, per-channel or per-tensor, free or power-of-two scales,
2..8-bit symmetric weights. Other layers keep round-to-nearest, and the result says which and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..graph import WEIGHT_SCALES, ChannelClip, clip_bounds
from ..quant.config import QuantConfig
from ..quant.simulate import ActQuantizer, graph_inputs, quantize
from .common import PassResult, folded_copy, graph_cost

__all__ = ["learned_rounding"]

_ZETA, _GAMMA = 1.1, -0.1
_MIN_ROWS, _ROWS_PER_WEIGHT = 512, 16  # positions a step uses: 16 per weight of one output, 512 at least
_POOL_FLOATS = 1 << 25  # a layer's pool of sampled inputs: 128 MB at most


def _positions(module: nn.Module, shape: torch.Size) -> int:
    """How many output rows (positions) a layer's output of ``shape`` has."""
    if isinstance(module, nn.Linear):
        return int(torch.tensor(shape[:-1]).prod())
    return int(shape[0] * shape[2] * shape[3])


def _out_rows(module: nn.Module, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Output rows (position, channel) at flat positions ``idx`` (n-major, then height, width)."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])[idx]
    h, w = y.shape[2], y.shape[3]
    n, rest = idx // (h * w), idx % (h * w)
    return y[n, :, rest // w, rest % w]


def _in_rows(module: nn.Module, x: torch.Tensor, idx: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """The input each sampled output position reads: (positions, in features) for linear, (positions,
    groups, in-per-group x kernel) for conv2d (gathered, not unfolded: early layers have 10^5 positions)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])[idx]
    (ph, pw), (sh, sw), (dh, dw) = (_pair(module.padding), _pair(module.stride), _pair(module.dilation))
    kh, kw = module.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph))
    h, w = out_hw
    n, rest = idx // (h * w), idx % (h * w)
    top, left = (rest // w) * sh, (rest % w) * sw
    cols = [xp[n, :, top + i * dh, left + j * dw] for i in range(kh) for j in range(kw)]  # each (P, C)
    rows = torch.stack(cols, dim=2)  # (P, C, kh*kw): channel-major, as the weight is laid out
    return rows.reshape(rows.shape[0], module.groups, -1)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _apply(module: nn.Module, rows: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        out = rows @ w.t()
    elif module.groups == 1:
        out = rows[:, 0] @ w.reshape(w.shape[0], -1).t()
    elif module.groups == w.shape[0]:  # depthwise: one output per group, a weighted sum of its own inputs
        out = (rows * w.reshape(1, module.groups, -1)).sum(-1)
    else:
        g = module.groups
        out = torch.einsum("pgk,gok->pgo", rows, w.reshape(g, w.shape[0] // g, -1)).reshape(rows.shape[0], -1)
    return out + bias if bias is not None else out


def _why_not(module: nn.Module, fmt) -> str | None:
    if fmt is None or not fmt.is_int:
        return "its weights are not integer in this config"
    if not fmt.symmetric:
        return "asymmetric weight grids are not supported"
    if fmt.bits > 8:
        return f"{fmt.bits}-bit weights round finely enough"
    if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and not isinstance(module.padding, str)
                                         and module.padding_mode == "zeros"):
        return None
    return f"{type(module).__name__} is not supported (conv2d with numeric zero padding and linear are)"


def learned_rounding(graph: fx.GraphModule, calib_data: Any, config: QuantConfig | None = None, *,
                     iters: int = 300, samples: int = 2048, pool: int = 8, through_clip: bool = True,
                     blocks: bool = False, block_images: int = 8, reg: float = 0.01, lr: float = 1e-2,
                     layers: list[str] | None = None, reference: fx.GraphModule | None = None, seed: int = 0,
                     progress: bool = True) -> PassResult:
    """A BN-folded copy of ``graph`` whose weights are put on ``config``'s grid by learned rounding.

    ``iters``: optimisation steps per layer; ``samples``: most output positions per step (16 per weight of one
    output, 512 at least); ``pool``: how many steps' worth of positions (a seeded sample, 128 MB of inputs at
    most) the steps take turns on, so the fit sees many positions at the cost of one step's (1: every step fits
    the same positions). ``through_clip``: where a ReLU / ReLU6 / hardtanh alone reads the layer's output, the
    error is measured after it (errors the clip removes do not count; Nagel et al.'s asymmetric reconstruction);
    ``blocks``: the layers of one block (the weighted layers of one module, e.g. an inverted residual: expand,
    depthwise, project) are rounded together, to match the block's output (Li et al.'s BRECQ), so a layer's
    rounding can make up for the errors of the others in its block and of the activation grids inside it; each
    step runs the block on ``block_images`` whole calibration images. Layers outside such blocks are rounded
    alone. ``layers``: unit names to round (default: every weighted layer whose format allows it).
    ``reference``: the float model whose layer outputs the fit matches (default ``graph``); give the graph
    before an approximate change such as bias correction, whose biases are meant for rounded weights, not
    float ones (its layers must carry the same names). Layers with fewer sampled positions than weights
    per output channel keep round-to-nearest (the fit would be under-determined): the notes say which.
    ``float_error``: the rounded layers' output error on their samples, after / before (a ratio)."""
    if iters < 1 or samples < 1 or pool < 1 or block_images < 1:
        raise ConfigError(f"iters, samples, pool and block_images must be >= 1, got {iters}, {samples}, {pool}, "
                          f"{block_images}")
    config = config or QuantConfig.int8()
    gm = folded_copy(graph)
    batches = list(graph_inputs(gm, calib_data, what="learned-rounding"))
    sim, plan = quantize(gm, batches, config, progress=False)
    wanted = set(layers) if layers is not None else None
    if wanted is not None:
        unknown = sorted(wanted - set(plan.names()))
        if unknown:
            raise ConfigError(f"learned_rounding: no quantized layer(s) named {unknown[:5]}")
    todo, skipped = [], {}
    for layer in plan:
        if sim.weights(layer.name) is None or (wanted is not None and layer.name not in wanted):
            continue
        why = _why_not(gm.get_submodule(layer.module), layer.weight)
        if why:
            skipped[layer.name] = why
        else:
            todo.append(layer)
    gen = torch.Generator().manual_seed(seed)
    pins = dict(graph.meta.get(WEIGHT_SCALES, {}))
    result = PassResult(gm, exact=False, cost_before=graph_cost(graph))
    inputs = tuple(torch.cat([b[i] for b in batches]) for i in range(len(batches[0])))
    # one float pass: every layer's output at sampled positions (the targets)
    ref = gm
    if reference is not None:
        ref = folded_copy(reference)
        missing = [layer.module for layer in todo if layer.module not in dict(ref.named_modules())]
        if missing:
            raise ConfigError(f"learned_rounding: the reference has no layer(s) {missing[:5]}")
    not_blocks: dict[str, str] = {}
    groups = _blocks(sim.graph_module, todo, ref, not_blocks) if blocks else []
    in_block = {layer.name for blk in groups for layer in blk.layers}
    alone = [layer for layer in todo if layer.name not in in_block]
    targets = _float_targets(ref, alone, inputs, samples, pool, gen)
    block_targets = _node_values(ref, [blk.target for blk in groups], inputs)
    clips = _clips_after(gm, alone) if through_clip else {}
    # one quantized pass: each layer is rounded just before it runs, on the inputs the rounded layers before
    # it produced, so the layers after it see its rounded outputs
    bar = tqdm(total=len(todo), desc="learned rounding", unit="layer", disable=not progress, leave=False)
    fitted: set[str] = set()

    def fit_before_run(layer):
        def pre_hook(module, args):
            if layer.name in fitted:
                return None
            fitted.add(layer.name)
            idx, y_rows, out_hw = targets[layer.name]
            per_out = module.weight[0].numel()
            x_rows = _in_rows(module, args[0].detach(), idx, out_hw)
            bar.update(1)
            if x_rows.shape[0] < per_out:
                skipped[layer.name] = (f"{x_rows.shape[0]} sampled position(s) for {per_out} weights per output: "
                                       "too few to fit (more calibration images would allow it)")
                return None
            w_float, _ = sim.weights(layer.name)
            scale = layer.weight_scale.to(w_float)
            s = scale.reshape([-1] + [1] * (w_float.dim() - 1)) if scale.numel() > 1 else scale.reshape(())
            bias = module.bias.detach() if module.bias is not None else None
            with torch.enable_grad():
                q, before, after = _fit(module, x_rows, y_rows, w_float, s, layer.weight, iters, reg, lr, bias,
                                        clips.get(layer.name), _batch_rows(module, samples))
            snapped = (q * s).to(w_float.dtype)
            with torch.no_grad():
                module.weight.copy_(snapped)
                gm.get_submodule(layer.module).weight.copy_(snapped)
            pins[layer.module] = (layer.weight.to_dict(), scale.detach().cpu().clone())
            nearest = torch.clamp(torch.round(w_float / s), *layer.weight.qrange)
            result.changes.append({"layer": layer.name, "error_before": before, "error_after": after,
                                   "flipped": float((q != nearest).float().mean())})
            bar.set_postfix_str(f"{layer.name}: error x{after / max(before, 1e-12):.2f}")
            return None
        return pre_hook

    def fit_block(blk: _Block, xs: tuple[torch.Tensor, ...]) -> None:
        bar.update(len(blk.layers))
        parts = []
        for layer in blk.layers:
            w_float, _ = sim.weights(layer.name)
            scale = layer.weight_scale.to(w_float)
            s = scale.reshape([-1] + [1] * (w_float.dim() - 1)) if scale.numel() > 1 else scale.reshape(())
            parts.append((layer, w_float, s))
        with torch.enable_grad():
            qs, before, after = _fit_block(blk.module, xs, block_targets.pop(blk.target), parts, iters, reg, lr,
                                           block_images, gen)
        for (layer, w_float, s), q in zip(parts, qs):
            snapped = (q * s).to(w_float.dtype)
            with torch.no_grad():
                sim.graph_module.get_submodule(layer.module).weight.copy_(snapped)
                gm.get_submodule(layer.module).weight.copy_(snapped)
            pins[layer.module] = (layer.weight.to_dict(), layer.weight_scale.detach().cpu().clone())
            nearest = torch.clamp(torch.round(w_float / s), *layer.weight.qrange)
            result.changes.append({"layer": layer.name, "block": blk.name, "error_before": before,
                                   "error_after": after, "flipped": float((q != nearest).float().mean())})
        bar.set_postfix_str(f"{blk.name}: error x{after / max(before, 1e-12):.2f}")

    handles = [sim.graph_module.get_submodule(layer.module).register_forward_pre_hook(fit_before_run(layer))
               for layer in alone]
    try:
        with torch.no_grad():
            _BlockRunner(sim.graph_module, {blk.first: blk for blk in groups}, fit_block).run(*inputs)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    gm.meta[WEIGHT_SCALES] = pins
    result.cost_after = graph_cost(gm)
    if result.changes:
        once = {c.get("block", c["layer"]): c for c in result.changes}.values()  # a block's error counts once
        result.float_error = sum(c["error_after"] for c in once) / max(sum(c["error_before"] for c in once), 1e-12)
    how = f"{samples} positions each" + (f"; {len(groups)} block(s) of {block_images} images" if groups else "")
    result.notes.append(f"{len(result.changes)} layer(s) rounded by fitting ({iters} steps, {how}, seed {seed}) "
                        f"for {config.describe()}; {len(skipped)} kept round-to-nearest")
    result.notes += [f"  round-to-nearest: {k}: {v}" for k, v in skipped.items()]
    result.notes += [f"  layer by layer, not as a block: {k}: {v}" for k, v in not_blocks.items()]
    return result


@dataclass
class _Block:
    """Layers rounded together: ``module`` runs the block from its inputs (the values of the nodes ``inputs``
    of the simulated graph) to its output before quantization (node ``target``, also in the float graph)."""

    name: str
    layers: list
    first: str
    inputs: list[str]
    target: str
    module: fx.GraphModule


def _scopes(node: fx.Node) -> set[str]:
    """Every module path whose forward created ``node`` (the innermost and all those around it)."""
    stack = node.meta.get("nn_module_stack") or {}
    return {v[0] if isinstance(v, tuple) else k for k, v in stack.items()}


def _blocks(net: fx.GraphModule, todo: list, ref: fx.GraphModule, why_not: dict[str, str]) -> list[_Block]:
    """The blocks of the simulated graph ``net``: per module holding two or more of the layers to round, the
    nodes it created, when they give one output and that output is also in ``ref`` (else ``why_not`` says why
    and its layers are rounded alone)."""
    by_parent: dict[str, list] = {}
    for layer in todo:
        parent = layer.module.rpartition(".")[0]
        if parent:
            by_parent.setdefault(parent, []).append(layer)
    ref_nodes = {n.name for n in ref.graph.nodes}
    nodes = list(net.graph.nodes)
    found = []
    for parent, layers in by_parent.items():
        if len(layers) < 2:
            continue
        region = [n for n in nodes if parent in _scopes(n)]
        inside = set(region)
        leaving = [n for n in region if any(u not in inside for u in n.users)]
        if len(leaving) != 1:
            why_not[parent] = f"its nodes give {len(leaving)} outputs, not one"
            continue
        if {layer.module for layer in layers} - {n.target for n in region if n.op == "call_module"}:
            why_not[parent] = "its layers are not all called inside it"
            continue
        out = leaving[0]
        while out.op == "call_module" and isinstance(net.get_submodule(out.target), ActQuantizer) \
                and out.args[0] in inside:
            out = out.args[0]  # the block's output before it is quantized: what the float graph also has
        if out.name not in ref_nodes:
            why_not[parent] = f"the reference has no node {out.name!r} to match its output"
            continue
        inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in inside))
        g = fx.Graph()
        env = {a: g.placeholder(a.name) for a in inputs}
        for n in region:
            env[n] = g.node_copy(n, lambda a, env=env: env[a])
            if n is out:
                break
        g.output(env[out])
        found.append(_Block(parent, layers, region[0].name, [a.name for a in inputs], out.name,
                            fx.GraphModule(net, g)))
    return found


class _BlockRunner(fx.Interpreter):
    """Runs the simulated graph, and at each block's first node hands the block's inputs to ``fit`` first."""

    def __init__(self, net: fx.GraphModule, starts: dict[str, _Block], fit):
        super().__init__(net)
        self.starts, self.fit = starts, fit
        self.by_name = {n.name: n for n in net.graph.nodes}

    def run_node(self, n: fx.Node) -> Any:
        blk = self.starts.pop(n.name, None)
        if blk is not None:
            self.fit(blk, tuple(self.env[self.by_name[a]].detach() for a in blk.inputs))
        return super().run_node(n)


def _node_values(gm: fx.GraphModule, names: list[str], inputs: tuple) -> dict[str, torch.Tensor]:
    """The values of the nodes ``names`` of ``gm`` on ``inputs`` (one forward pass)."""
    if not names:
        return {}
    wanted, values = set(names), {}

    class _Grab(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted:
                values[n.name] = out.detach()
            return out

    with torch.no_grad():
        _Grab(gm).run(*inputs)
    return values


def _soft_start(w: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For weights ``w`` on the grid ``s``: the integer below each, the nearest one, which weights keep it (the
    largest of each grid, so its scale is reproduced when re-quantized), and the soft rounding logits that start
    at the weights' own fractions."""
    base = torch.floor(w / s)
    frac = (w / s - base).clamp(0, 1)
    nearest = torch.clamp(torch.round(w / s), qmin, qmax)
    flat = w.abs().reshape(w.shape[0], -1) if s.dim() > 0 else w.abs().reshape(1, -1)
    keep = (flat == flat.amax(1, keepdim=True)).reshape(w.shape)
    p = ((frac - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    return base, nearest, keep, torch.log(p / (1 - p)).clone().requires_grad_(True)


def _fit_block(block: fx.GraphModule, xs: tuple[torch.Tensor, ...], y: torch.Tensor, parts: list, iters: int,
               reg: float, lr: float, images: int, gen: torch.Generator) -> tuple[list[torch.Tensor], float, float]:
    """Integers (as floats) for each ``(layer, float weight, scale)`` of ``parts`` that make ``block`` map ``xs``
    to ``y``; steps on ``images`` images drawn (seeded) at a time; errors before and after, on all images."""
    fits = []
    for layer, w, s in parts:
        qmin, qmax = layer.weight.qrange
        base, nearest, keep, v = _soft_start(w, s, qmin, qmax)
        fits.append((f"{layer.module}.weight", s, base, nearest, keep, (qmin, qmax), v))
    n = len(y)
    denom = float(y.pow(2).mean().clamp(min=1e-12))

    def run(weights: dict[str, torch.Tensor], pick) -> torch.Tensor:
        return functional_call(block, weights, tuple(x[pick] for x in xs))

    def error(hard: list[torch.Tensor]) -> float:
        weights = {f[0]: q * f[1] for f, q in zip(fits, hard)}
        with torch.no_grad():
            total = sum(float((run(weights, slice(i, i + images)) - y[i:i + images]).pow(2).sum())
                        for i in range(0, n, images))
        return total / y.numel() / denom

    nearest = [f[3] for f in fits]
    err_before = error(nearest)
    opt = torch.optim.Adam([f[-1] for f in fits], lr=lr)
    warm = int(0.2 * iters)
    order = torch.randperm(n, generator=gen)
    for step in range(iters):
        at = (step * images) % n
        pick = order[at:at + images] if at + images <= n else torch.randperm(n, generator=gen)[:images]
        weights, hs = {}, []
        for path, s, base, near, keep, (qmin, qmax), v in fits:
            h = (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)
            hs.append(h.reshape(-1))
            weights[path] = torch.where(keep, near, torch.clamp(base + h, qmin, qmax)) * s
        loss = (run(weights, pick) - y[pick]).pow(2).mean() / denom
        if step >= warm:
            beta = 20 + (2 - 20) * (step - warm) / max(iters - warm, 1)
            loss = loss + reg * (1 - (2 * torch.cat(hs) - 1).abs().pow(beta)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = [torch.where(keep, near, torch.clamp(base + (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA >= 0.5)
                                                    .to(near.dtype), qmin, qmax))
                for _path, _s, base, near, keep, (qmin, qmax), v in fits]
    err_after = error(hard)
    if err_after > err_before:  # the fit can end worse than nearest: keep nearest then
        hard, err_after = nearest, err_before
    return [q.detach() for q in hard], err_before, err_after


def _float_targets(gm: fx.GraphModule, todo: list, inputs: tuple, samples: int, pool: int, gen: torch.Generator
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """Per layer: sampled output positions (``pool`` steps' worth, shuffled), the float model's outputs there, and
    the output's height and width (one forward pass)."""
    targets: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}

    def grab(layer):
        def hook(module, _inputs, out):
            if layer.name in targets:
                return
            n = _positions(module, out.shape)
            batch = _batch_rows(module, samples)
            row_floats = getattr(module, "groups", 1) * module.weight[0].numel()  # one sampled input row
            rows = max(batch, min(pool * batch, _POOL_FLOATS // max(row_floats, 1)))
            idx = torch.randperm(n, generator=gen)[:rows]  # shuffled: any slice of it is a random sample
            idx = idx.to(out.device)
            hw = (out.shape[2], out.shape[3]) if out.dim() == 4 else (1, 1)
            targets[layer.name] = (idx, _out_rows(module, out.detach(), idx).contiguous(), hw)
        return hook

    handles = [gm.get_submodule(layer.module).register_forward_hook(grab(layer)) for layer in todo]
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        for h in handles:
            h.remove()
    return targets


def _batch_rows(module: nn.Module, samples: int) -> int:
    """Output positions one fitting step uses: 16 per weight of one output, at least 512, at most ``samples``
    (a depthwise conv's broadcast products cost memory per position, not arithmetic)."""
    return min(samples, max(_MIN_ROWS, _ROWS_PER_WEIGHT * module.weight[0].numel()))


_Bound = float | torch.Tensor | None  # a clip bound as ``torch.clamp`` takes it


def _clips_after(gm: fx.GraphModule, layers: list) -> dict[str, tuple[_Bound, _Bound]]:
    """Per layer whose output a ReLU / ReLU6 / hardtanh / ChannelClip alone reads: its clip bounds (lo, hi) as
    ``torch.clamp`` takes them (numbers, None for no bound, or per-channel rows for ChannelClip)."""
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    clips: dict[str, tuple[_Bound, _Bound]] = {}
    for layer in layers:
        node = nodes.get(layer.module)
        if node is None or len(node.users) != 1:
            continue
        nxt = next(iter(node.users))
        if nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), ChannelClip):
            m = gm.get_submodule(nxt.target)
            clips[layer.name] = m.lo.detach().clone().reshape(1, -1), m.hi.detach().clone().reshape(1, -1)
            continue
        bounds = clip_bounds(gm, nxt)
        if bounds is not None and nxt.args and nxt.args[0] is node:
            lo, hi = bounds
            clips[layer.name] = (None if lo == -math.inf else lo), (None if hi == math.inf else hi)
    return clips


def _fit(module: nn.Module, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, s: torch.Tensor, fmt, iters: int,
         reg: float, lr: float, bias: torch.Tensor | None, clip: tuple[_Bound, _Bound] | None,
         batch: int) -> tuple[torch.Tensor, float, float]:
    """Integers (as floats) for ``w`` on the grid ``s`` that fit ``y`` from ``x`` (shuffled rows; each step takes
    the next ``batch`` of them; through ``clip`` when a clipping activation follows); errors before and after,
    on all rows."""
    if clip is not None:  # one fused clamp (a first version with maximum/minimum cost a third more)
        lo, hi = (b.to(y) if isinstance(b, torch.Tensor) else b for b in clip)

        def act(t: torch.Tensor) -> torch.Tensor:
            return torch.clamp(t, lo, hi)
        y = act(y)
    else:
        def act(t: torch.Tensor) -> torch.Tensor:
            return t
    qmin, qmax = fmt.qrange
    base, nearest, keep, v = _soft_start(w, s, qmin, qmax)
    opt = torch.optim.Adam([v], lr=lr)
    denom = float(y.pow(2).sum(1).mean().clamp(min=1e-12))

    def error(q: torch.Tensor) -> float:
        with torch.no_grad():
            return float((act(_apply(module, x, q * s, bias)) - y).pow(2).sum(1).mean() / denom)

    err_before = error(nearest)
    warm = int(0.2 * iters)
    rows = min(batch, len(x))
    slices = len(x) // rows
    for step in range(iters):
        h = (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)
        q = torch.clamp(base + h, qmin, qmax)
        q = torch.where(keep, nearest, q)
        k = step % slices  # the pool is shuffled: its slices are random batches, and slicing copies nothing
        xb, yb = x[k * rows:(k + 1) * rows], y[k * rows:(k + 1) * rows]
        rec = (act(_apply(module, xb, q * s, bias)) - yb).pow(2).sum(1).mean() / denom
        loss = rec
        if step >= warm:
            beta = 20 + (2 - 20) * (step - warm) / max(iters - warm, 1)
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        h = torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA
        q = torch.where(keep, nearest, torch.clamp(base + (h >= 0.5).to(w.dtype), qmin, qmax))
    err_after = error(q)
    if err_after > err_before:  # the fit can end worse than nearest on a hard layer: keep nearest then
        q, err_after = nearest, err_before
    return q.detach(), err_before, err_after
