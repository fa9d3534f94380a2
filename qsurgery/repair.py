"""The recipe engine: model + calibration images + evaluation images + budget + device target -> the cheapest
repaired quantized model that meets the budget, the record of every trial, and a verifiable export.

How it decides:

1. ``eval_data`` is split (seeded) into a *selection* part, on which every decision is taken, and a *report*
   part, on which the result is measured once at the end and nothing is chosen.
2. Float and the target's plain quantized model are measured on the selection part; when the budget holds
   the engine stops there.
3. Otherwise every remedy the target allows proposes priced changes (cost in the target's currency, relative
   to the plain model). Free remedies (techniques that keep every layer in the target's default format) come
   first, the exact rewrites among them before the steps fitted to the weights those rewrites change, then the
   ones that cost, in order of expected gain per cost. Each trial is measured on the
   selection part and kept only when the outputs moved measurably closer to float (KL divergence, the soft
   signal that sees changes top-1 on a few hundred images cannot) without breaking a cost cap; a rejected
   trial is stepped back. The loop stops when the budget holds, nothing is left to try, or ``max_trials``.
4. With ``out_dir`` every trial is stored as it is measured, keyed by what produced it: a rerun continues
   where an interrupted one stopped, and a rerun with other arguments refuses, naming the difference.

Remedies are registered by name (:data:`REMEDIES`, :func:`register_remedy`) with what they fix, whether they
are exact, what data they need and which targets allow them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .capture import capture
from .cost import PlanCost, plan_cost
from .errors import CalibrationError, ConfigError, DataError, QSurgeryError
from .evaluate import distance, kl_per_image, predict, score, take
from .graph import module_macs
from .quant.config import QuantConfig
from .quant.plan import QuantPlan
from .quant.simulate import SimulatedModel, iter_inputs, quantize
from .targets import Target, get_target

__all__ = ["Budget", "repair", "RepairResult", "Trial", "Proposal", "Remedy", "Finding", "REMEDIES",
           "register_remedy", "RepairError"]


class RepairError(QSurgeryError, ValueError):
    """The repair cannot start or continue as asked (bad budget, remedy, data or a resumed run that differs)."""


@dataclass(frozen=True)
class Budget:
    """What the repaired model may lose against float, in points of ``metric``: ``"top1"`` (labels needed),
    ``"agreement"`` (with float, no labels) or a callable ``metric(outputs, labels) -> points`` (the evaluator
    contract; detectors pass mAP this way). ``max_cost``: largest cost allowed, relative to the target's plain
    quantized model (1.0 = no extra cost).

    ``confidence``: the budget holds on the selection images when the drop is below ``max_drop`` with this
    one-sided confidence (paired, per image: the measured drop, never below 0, plus z standard errors, the
    standard error with half an image added to each cell of the paired table, so that one changed image, or
    none, does not make it vanish). On a few hundred images top-1 moves in coarse steps and can show no loss,
    or a gain, where there is a loss; 0.5 takes the measured drop as it is. A callable metric that is not a
    mean over images (mAP) gets its standard error from random halves of the selection images."""

    max_drop: float = 1.0
    metric: str | Callable = "top1"
    max_cost: float | None = None
    confidence: float = 0.84

    def __post_init__(self) -> None:
        if not isinstance(self.max_drop, (int, float)) or not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise RepairError(f"budget max_drop must be a number of points >= 0, got {self.max_drop!r}")
        if not callable(self.metric) and self.metric not in ("top1", "agreement"):
            raise RepairError(f"budget metric must be 'top1', 'agreement' or a callable(outputs, labels), "
                              f"got {self.metric!r}")
        if self.max_cost is not None and not self.max_cost > 0:
            raise RepairError(f"max_cost must be > 0 (relative to the plain model), got {self.max_cost!r}")
        if not 0.5 <= self.confidence < 1:
            raise RepairError(f"confidence must be in [0.5, 1), got {self.confidence!r}")

    @property
    def z(self) -> float:
        """Standard errors the measured drop must stay below the budget by."""
        from statistics import NormalDist

        return NormalDist().inv_cdf(self.confidence)

    @property
    def metric_name(self) -> str:
        return self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric")


@dataclass
class Finding:
    """What the analysis saw: ``layer`` (or ``"*"`` for the whole model), ``symptom``, and the measured
    ``evidence`` behind it."""

    layer: str
    symptom: str
    evidence: str


@dataclass
class Proposal:
    """One change a remedy offers, priced before it is applied: ``cost`` is the extra cost on the target,
    relative to the plain quantized model; ``expected_gain`` orders proposals (a share of the current KL)."""

    remedy: str
    params: dict
    why: str
    expected_gain: float
    cost: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.remedy}:{json.dumps(self.params, sort_keys=True)}"


@dataclass
class Trial:
    """One measured proposal: selection-part metric and KL before and after, cost, kept or not and why."""

    proposal: dict
    metric_before: float
    metric_after: float
    kl_before: float
    kl_after: float
    cost: float
    accepted: bool
    reason: str
    seconds: float
    cached: bool = False


@dataclass
class _State:
    """A candidate: the (possibly rewritten) graph, the quantization config, and the accepted steps."""

    graph: fx.GraphModule
    config: QuantConfig
    steps: list[dict] = field(default_factory=list)
    reference: fx.GraphModule | None = None  # the float model as of the last exact step (None: ``graph``)
    merge: Callable | None = None  # rebuilds the original outputs from a split graph's (split_head)
    output_names: list[str] | None = None
    origin: fx.GraphModule | None = None  # the float model as the structural steps left it (None: ``graph``)


@dataclass(frozen=True)
class Remedy:
    """A registered remedy: what it fixes, whether it keeps the float model exact, what data it needs, whether
    it may change the model's outputs, and how it proposes and applies changes."""

    name: str
    fixes: tuple[str, ...]
    exact: bool
    needs: str
    changes_outputs: bool
    description: str
    propose: Callable[[_Context, _State], list[Proposal]]
    apply: Callable[[_Context, _State, Proposal], _State]
    forbidden_on: Callable[[Target], str | None] = lambda _t: None
    free: bool = True
    default: bool = True  # used when ``repair(remedies=None)``; False: only when named (slow remedies)


REMEDIES: dict[str, Remedy] = {}


def register_remedy(remedy: Remedy) -> Remedy:
    """Add a remedy to the registry (``repair(remedies=[...])`` names them)."""
    if remedy.name in REMEDIES:
        raise ConfigError(f"a remedy named {remedy.name!r} is already registered")
    REMEDIES[remedy.name] = remedy
    return remedy


@dataclass
class _Context:
    target: Target
    calib: list
    sel_x: torch.Tensor
    sel_y: torch.Tensor | None
    sel_ref: torch.Tensor
    budget: Budget
    base_cost: float
    seed: int
    progress: bool
    batch_size: int
    findings: list[Finding] = field(default_factory=list)
    memos: dict[str, dict] = field(default_factory=dict)  # per remedy: what it measured once and reuses
    halves: list | None = None  # (indices, float metric) of the selection halves (callable metrics)
    executor: Any = None  # where sensitivity's layer runs go (qsurgery.executor)

    def memo(self, remedy: str) -> dict:
        """The remedy's own cache for this run (a layer ranking, the heads found)."""
        return self.memos.setdefault(remedy, {})


# ---------------------------------------------------------------------- measuring
def _batches(x: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [x[i:i + bs] for i in range(0, len(x), bs)]


class _Merged(nn.Module):
    """A split model seen through its output merge: the outputs the original model gives."""

    def __init__(self, inner: nn.Module, merge: Callable):
        super().__init__()
        self.inner, self.merge = inner, merge

    def forward(self, *x: torch.Tensor) -> Any:
        return self.merge(self.inner(*x))


def _outputs(model: nn.Module, x: torch.Tensor, bs: int, merge: Callable | None = None) -> Any:
    """The model's outputs on ``x`` (a tensor, or a tuple of tensors for several outputs), in the original
    model's structure when ``merge`` is given."""
    out, _ = predict(_Merged(model, merge) if merge is not None else model, _batches(x, bs))
    return out


@dataclass
class _Measure:
    metric: float
    kl: float
    agreement: float
    cost: float
    drop_se: float = 0.0  # standard error of the paired drop against float, in points (0: not per image)
    plan_cost: PlanCost | None = None
    kl_each: list[float] | None = None  # class scores: each selection image's KL from float (its mean is ``kl``)


def _build(ctx: _Context, state: _State) -> tuple[SimulatedModel, QuantPlan]:
    return quantize(state.graph, ctx.calib, state.config, progress=False)


def _measure(ctx: _Context, state: _State, sim: SimulatedModel | None = None) -> tuple[_Measure, SimulatedModel]:
    """``state`` on the selection images (``sim``: its simulation, if already built)."""
    sim, plan = (sim, sim.plan) if sim is not None else _build(ctx, state)
    ctx.target.check(plan)
    out = _outputs(sim, ctx.sel_x, ctx.batch_size, state.merge)
    pc = plan_cost(state.graph, plan, ctx.target)
    each = None
    if _own_distance(ctx.budget) is None and isinstance(out, torch.Tensor) and out.dim() == 2:
        each = kl_per_image(ctx.sel_ref, out).tolist()
    return _Measure(score(out, ctx.sel_y, ctx.budget.metric, ctx.sel_ref), _distance(ctx.sel_ref, out, ctx.budget),
                    _agreement(ctx.sel_ref, out), pc.total / ctx.base_cost, _drop_se(ctx, out), pc, each), sim


def _agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Top-1 agreement with float in points; NaN for outputs that are not class scores."""
    return score(out, None, "agreement", ref) if isinstance(out, torch.Tensor) and out.dim() == 2 else float("nan")


def _per_image(metric: Any, out: torch.Tensor, labels: torch.Tensor | None, ref: torch.Tensor
               ) -> torch.Tensor | None:
    """Per image, 1 where ``out`` scores under ``metric`` (top-1 right, or agreeing with float), else 0."""
    if metric == "top1" and labels is not None:
        return (out.argmax(1) == labels).float()
    if metric == "agreement":
        return (out.argmax(1) == ref.argmax(1)).float()
    return None


_HALVES = 12  # random halves of the selection images that estimate a callable metric's standard error


def _halves(ref: Any, labels: torch.Tensor, metric: Callable, seed: int) -> list[tuple[torch.Tensor, float]]:
    """Random halves of a part's images, with the float model's metric on each."""
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(labels)
    halves = [torch.randperm(n, generator=gen)[:n // 2].sort().values for _ in range(_HALVES)]
    return [(h, score(take(ref, h), labels[h], metric, take(ref, h))) for h in halves]


def _half_sample_se(halves: list[tuple[torch.Tensor, float]], ref: Any, out: Any, labels: torch.Tensor,
                    metric: Callable) -> float:
    """Standard error of the drop of a metric that is not a mean over images (mAP), from random halves of
    the images (delete-half jackknife: the spread of the halves' paired drops estimates the full set's)."""
    drops = torch.tensor([f - score(take(out, h), labels[h], metric, take(ref, h)) for h, f in halves],
                         dtype=torch.float64)
    return float(drops.std())


def _drop_se(ctx: _Context, out: torch.Tensor) -> float:
    if callable(ctx.budget.metric):
        if ctx.sel_y is None or len(ctx.sel_y) < 8:
            return 0.0
        if ctx.halves is None:
            ctx.halves = _halves(ctx.sel_ref, ctx.sel_y, ctx.budget.metric, ctx.seed)
        return _half_sample_se(ctx.halves, ctx.sel_ref, out, ctx.sel_y, ctx.budget.metric)
    q = _per_image(ctx.budget.metric, out, ctx.sel_y, ctx.sel_ref)
    f = _per_image(ctx.budget.metric, ctx.sel_ref, ctx.sel_y, ctx.sel_ref)
    if q is None or len(q) < 2:
        return 0.0
    return _paired_binary_se(f, q)


def _distance(ref: Any, out: Any, budget: Budget | None = None) -> float:
    """The one distance from float: the budget metric's own ``distance(ref, out)`` where it has one (detectors:
    decoded boxes and scores), else KL of class scores, else the relative squared error summed over outputs."""
    own = _own_distance(budget)
    return float(own(ref, out)) if own is not None else distance(ref, out)


def _own_distance(budget: Budget | None) -> Callable | None:
    """The budget metric's own distance from float (detectors: decoded boxes and scores), or None."""
    own = getattr(budget.metric, "distance", None) if budget is not None else None
    return own if callable(own) else None


# ---------------------------------------------------------------------- remedies
def _regime(target: Target) -> list[str]:
    found = []
    if not target.per_channel:
        found.append("per-tensor weights")
    if target.pow2:
        found.append("power-of-two scales")
    if target.default == "w4a8":
        found.append("4-bit weights")
    return found


def _graph_remedy(name: str, prior_strict: float, prior_plain: float, why: str, fn: Callable[[_Context, _State, dict],
                  fx.GraphModule], params: Callable[[_Context], dict] = lambda _ctx: {}) -> tuple[Callable, Callable]:
    def propose(ctx: _Context, state: _State) -> list[Proposal]:
        if any(s["remedy"] == name for s in state.steps):
            return []
        prior = prior_strict if _regime(ctx.target) else prior_plain
        return [Proposal(name, params(ctx), why, prior)]

    def apply(ctx: _Context, state: _State, p: Proposal) -> _State:
        graph = fn(ctx, state, p.params)
        exact = REMEDIES[name].exact
        reference = None if exact else (state.reference if state.reference is not None else state.graph)
        return replace(state, graph=graph, steps=state.steps + [{"remedy": name, "params": p.params}],
                       reference=reference)

    return propose, apply


def _equalize(ctx: _Context, state: _State, _params: dict) -> fx.GraphModule:
    from .passes.equalize import equalize

    return equalize(state.graph).graph


def _bias_correction(ctx: _Context, state: _State, _params: dict) -> fx.GraphModule:
    from .passes.bias_correction import bias_correction

    return bias_correction(state.graph, ctx.calib, state.config).graph


def _learned_rounding(ctx: _Context, state: _State, params: dict) -> fx.GraphModule:
    from .passes.learned_rounding import learned_rounding

    return learned_rounding(state.graph, ctx.calib, state.config, reference=state.reference, seed=ctx.seed,
                            progress=ctx.progress, **params).graph


def _rounding_params(ctx: _Context) -> dict:
    """Block-wise rounding on 4-bit weights (where it was measured to bring the model closer to float),
    layer-wise elsewhere."""
    return {"blocks": True} if "4-bit weights" in _regime(ctx.target) else {}


def _distillation(ctx: _Context, state: _State, _params: dict) -> fx.GraphModule:
    from .passes.distillation import distill_quantized

    return distill_quantized(state.graph, ctx.calib, state.config, reference=state.reference, seed=ctx.seed,
                             progress=ctx.progress).graph


for _name, _strict, _plain, _why, _fn, _fixes, _exact, _params in (
    ("equalize", 0.6, 0.05, "per-channel weight ranges differ widely under one scale (cross-layer equalization)",
     _equalize, ("per-tensor weights", "power-of-two scales"), True, lambda _ctx: {}),
    ("bias_correction", 0.5, 0.1, "weight rounding shifts the mean of layer outputs", _bias_correction,
     ("per-tensor weights", "power-of-two scales", "4-bit weights", "mean shift"), False, lambda _ctx: {}),
    ("learned_rounding", 0.4, 0.05, "round-to-nearest is not the best rounding for the layer's output",
     _learned_rounding, ("4-bit weights", "per-tensor weights", "power-of-two scales"), False, _rounding_params),
    ("distillation", 0.3, 0.02, "train the weights through the quantization against the float model's outputs "
     "(the last resort: minutes per trial)", _distillation,
     ("4-bit weights", "per-tensor weights", "power-of-two scales", "int8 error"), False, lambda _ctx: {}),
):
    _p, _a = _graph_remedy(_name, _strict, _plain, _why, _fn, _params)
    register_remedy(Remedy(_name, _fixes, _exact, "calibration images (no labels)" if _name != "equalize" else
                           "nothing", False, _why, _p, _a, default=_name != "distillation"))


_FITTED_TO_SCALES = ("bias_correction", "learned_rounding", "distillation")


def _absorb_propose(ctx: _Context, state: _State) -> list[Proposal]:
    """After equalization and before anything fitted to the weight grids (it moves biases): once."""
    done = {s["remedy"] for s in state.steps}
    if "equalize" not in done or "absorb_high_bias" in done or done & set(_FITTED_TO_SCALES):
        return []
    return [Proposal("absorb_high_bias", {}, "activation channels that never fall below a floor widen the "
                     "per-tensor activation grid (high-bias absorption)", 0.55 if _regime(ctx.target) else 0.05)]


def _absorb_apply(ctx: _Context, state: _State, p: Proposal) -> _State:
    from .passes.equalize import absorb_high_bias

    graph = absorb_high_bias(state.graph, ctx.calib).graph
    return replace(state, graph=graph, steps=state.steps + [{"remedy": "absorb_high_bias", "params": {}}])


# not tried unless named: on EfficientNet-Lite0 it narrows the grids a little (KL -4 % per-tensor) but leaves
# the model further from float once bias correction and learned rounding have run (README, "Measured")
register_remedy(Remedy("absorb_high_bias", ("per-tensor weights", "power-of-two scales"), True,
                       "calibration images (activation floors)", False,
                       "move each activation channel's floor into the next layer's bias", _absorb_propose,
                       _absorb_apply, default=False))


def _observer_propose(ctx: _Context, state: _State) -> list[Proposal]:
    out = [Proposal("observer", {"observer": o}, f"activation ranges from the {o} observer clip outliers", 0.1)
           for o in ("percentile", "mse")]
    if any(s["remedy"] in _FITTED_TO_SCALES for s in state.steps):
        return out  # bias correction and learned rounding were fitted to the weight scales: they stay
    prior = 0.55 if state.config.weight.bits < 8 else 0.05  # first after equalization on narrow grids
    return out + [Proposal("observer", {"weight_observer": "mse"}, "weight scales that minimise the rounding error "
                           "(clip the largest weights)", prior)]


def _observer_apply(ctx: _Context, state: _State, p: Proposal) -> _State:
    cfg = state.config
    if "observer" in p.params:
        cfg = replace(cfg, activation=replace(cfg.activation, observer=p.params["observer"]))
    if "weight_observer" in p.params:
        cfg = replace(cfg, weight=replace(cfg.weight, observer=p.params["weight_observer"]))
    return replace(state, config=cfg, steps=state.steps + [{"remedy": "observer", "params": p.params}])


register_remedy(Remedy("observer", ("activation outliers",), False, "calibration images", False,
                       "choose activation ranges with a clipping observer", _observer_propose, _observer_apply))

_OVERRIDE = {"int8": {"weight_bits": 8, "act_bits": 8}, "w4a8": {"weight_bits": 4, "act_bits": 8},
             "a16w8": {"weight_bits": 8, "act_bits": 16}, "int16": {"weight_bits": 16, "act_bits": 16},
             "fp16": {"dtype": "fp16"}, "float": {"dtype": "float"}}
_RECOVERY = {"float": 1.0, "fp16": 1.0, "int16": 1.0, "a16w8": 0.8, "int8": 0.9}


def _with_format(config: QuantConfig, layer: str, fmt: str) -> QuantConfig:
    return config.override(layer, **_OVERRIDE[fmt])


def _precision_propose(ctx: _Context, state: _State) -> list[Proposal]:
    wider = [f for f in ctx.target.formats if f != ctx.target.default]
    if not wider:
        return []
    memo = ctx.memo("precision")
    ranking = _ranking(ctx, state)
    state_key = json.dumps(state.steps, sort_keys=True)
    if state_key in memo:  # a rejected trial leaves the state, and so its priced proposals, as they were
        return memo[state_key]
    done = {s["params"]["layer"]: s["params"]["format"] for s in state.steps if s["remedy"] == "precision"}
    sim, plan = _build(ctx, state)
    base = plan_cost(state.graph, plan, ctx.target).total
    out = memo[state_key] = []
    for layer, gain in ranking.items():
        if gain <= 0:
            continue
        for fmt in wider:
            if layer in done and wider.index(done[layer]) >= wider.index(fmt):
                continue
            trial_plan = _reformat(plan, layer, fmt, ctx.target)
            if (trial_plan[layer].weight, trial_plan[layer].activation) == (plan[layer].weight,
                                                                           plan[layer].activation):
                continue  # the same formats (a weightless add is int8 under w4a8 too): nothing to try
            extra = (plan_cost(state.graph, trial_plan, ctx.target).total - base) / ctx.base_cost
            out.append(Proposal("precision", {"layer": layer, "format": fmt},
                                f"keeping {layer} float recovers KL {gain:.4g} (float_one, selection images)",
                                gain * _RECOVERY.get(fmt, 1.0), max(extra, 0.0)))
    return out


def _ranking(ctx: _Context, state: _State) -> dict[str, float]:
    """What keeping each layer float buys (float_one KL on selection images), measured once per model: it holds
    until a graph remedy changes the model (precision steps do not)."""
    memo = ctx.memo("ranking")
    graph_key = json.dumps([s for s in state.steps if s["remedy"] != "precision"], sort_keys=True)
    if graph_key not in memo:
        # ranked on the float weights: after bias correction or learned rounding the graph holds values fitted
        # to the narrow grid, and "keeping a layer float" would keep those (what widening buys is unseen)
        ranked = state if state.reference is None else replace(state, graph=state.reference)
        memo[graph_key] = _rank_layers(ctx, ranked)
    return memo[graph_key]


def _reformat(plan: QuantPlan, layer: str, fmt: str, target: Target) -> QuantPlan:
    new = copy.deepcopy(plan)
    new[layer].weight, new[layer].activation = target.formats_of(fmt, new[layer].weight, new[layer].activation)
    return new


@dataclass
class _MergedDistance:
    """The engine's distance from float on a (possibly split) graph's raw outputs: merged back to the original
    outputs first. A class, not a closure, so that it ships to Ray workers."""

    merge: Callable | None
    own: Callable | None

    def __call__(self, ref: Any, out: Any) -> float:
        if self.merge is not None:
            ref, out = self.merge(ref), self.merge(out)
        return float(self.own(ref, out)) if self.own is not None else distance(ref, out)


def _rank_layers(ctx: _Context, state: _State) -> dict[str, float]:
    """float_one sensitivity on selection images (32; 16 for several outputs): what keeping each layer float
    buys, in KL (class scores) or in the one distance from float (detectors: the metric's own)."""
    from .analysis.sensitivity import sensitivity

    sim, _ = _build(ctx, state)
    if isinstance(ctx.sel_ref, torch.Tensor) and ctx.sel_ref.dim() == 2:
        kwargs: dict[str, Any] = {"metric": "kl"}
        x = ctx.sel_x[:32]
    else:
        kwargs = {"metric": "distance", "distance": _MergedDistance(state.merge, getattr(ctx.budget.metric,
                                                                                          "distance", None))}
        x = ctx.sel_x[:16]
    report = sensitivity(state.graph, None, _batches(x, ctx.batch_size), mode="float_one", simulated=sim,
                         executor=ctx.executor, progress=ctx.progress, **kwargs)
    ranking, baseline = {r.layer: float(r.delta) for r in report.rows}, report.baseline
    for layer, delta in list(ranking.items())[:5]:
        if delta > 0:
            ctx.findings.append(Finding(layer, "int8 error", f"kept float, the distance from float falls by "
                                                             f"{delta:.4g} (of {baseline:.4g})"))
    return ranking


def _precision_apply(ctx: _Context, state: _State, p: Proposal) -> _State:
    cfg = _with_format(state.config, p.params["layer"], p.params["format"])
    graph = _rerounded(ctx, state, p.params["layer"], cfg)
    return replace(state, graph=graph, config=cfg, steps=state.steps + [{"remedy": "precision", "params": p.params}])


def _rerounded(ctx: _Context, state: _State, layer: str, config: QuantConfig) -> fx.GraphModule:
    """The graph for ``layer`` in its new format. Approximate steps fitted the layer to its old weight grid: bias
    correction moved its bias by the old grid's mean shift, learned rounding or distillation put its weights on
    the old grid (a finer format would only copy the coarse values). The layer gets its float weights and bias
    back (from the float model before those steps) and, where learned rounding had pinned it, is rounded again
    by learned rounding on the new format's grid (when that is an integer one); where learned rounding fitted
    blocks, the other layers of its block are rounded again with it, as one block."""
    from .graph import WEIGHT_SCALES, find_units
    from .passes.common import folded_copy

    module = next((u.module for u in find_units(state.graph) if u.name == layer), None)
    if state.reference is None or module is None or state.config.formats_for(layer)[0] == config.formats_for(layer)[0]:
        return state.graph  # nothing fitted, or its weights keep their grid (a16w8): what was fitted still holds
    source = dict(folded_copy(state.reference).named_modules()).get(module)
    current = state.graph.get_submodule(module)
    if source is None or getattr(source, "weight", None) is None or source.weight.shape != current.weight.shape \
            or (source.bias is None) != (current.bias is None):
        return state.graph  # the float model no longer has this layer's shape: keep it as it is
    pinned = module in state.graph.meta.get(WEIGHT_SCALES, {})
    same = torch.equal(source.weight, current.weight) and (source.bias is None
                                                           or torch.equal(source.bias, current.bias))
    if same and not pinned:
        return state.graph
    graph = copy.deepcopy(state.graph)
    graph.meta.update(copy.deepcopy(dict(state.graph.meta)))
    target = graph.get_submodule(module)
    with torch.no_grad():
        target.weight.copy_(source.weight)
        if source.bias is not None:
            target.bias.copy_(source.bias)
    if not pinned:
        return graph
    del graph.meta[WEIGHT_SCALES][module]
    from .passes.learned_rounding import _why_not, learned_rounding

    layers, blocks = [layer], any(s["remedy"] == "learned_rounding" and s["params"].get("blocks")
                                  for s in state.steps)
    if not blocks and _why_not(target, config.formats_for(layer)[0]):
        return graph  # float, fp16 or 16-bit weights: nothing to round again (learned rounding would skip it)
    if blocks:  # its block was rounded as one: the others made up for its coarse grid, so they are rounded again
        parent = module.rpartition(".")[0]
        pins = graph.meta[WEIGHT_SCALES]
        siblings = [u for u in find_units(folded_copy(graph)) if u.module and u.module != module and parent
                    and u.module.rpartition(".")[0] == parent and u.module in pins]
        references = dict(folded_copy(state.reference).named_modules())
        for u in siblings:
            src, dst = references.get(u.module), graph.get_submodule(u.module)
            if src is None or src.weight.shape != dst.weight.shape:
                continue
            with torch.no_grad():
                dst.weight.copy_(src.weight)  # its bias keeps its correction: the grid is the same
            del pins[u.module]
            layers.append(u.name)
    return learned_rounding(graph, ctx.calib, config, layers=layers, blocks=blocks and len(layers) > 1,
                            reference=state.reference, seed=ctx.seed, progress=False).graph


register_remedy(Remedy("precision", ("int8 error",), False, "selection images (ranking)", False,
                       "run a sensitive layer in a wider format the target allows", _precision_propose,
                       _precision_apply, free=False,
                       forbidden_on=lambda t: None if t.mixed else f"target {t.name} runs every layer in "
                                                                   f"{t.default}"))


def _split_head_propose(ctx: _Context, state: _State) -> list[Proposal]:
    from .passes.split_head import find_heads, output_concats

    if state.merge is not None or state.reference is not None:  # split once, before approximate steps
        return []
    memo = ctx.memo("split_head")
    if "heads" not in memo:  # found once, on the model before any split
        memo["heads"], memo["concats"] = find_heads(state.graph, ctx.calib), output_concats(state.graph)
    heads, concats = memo["heads"], memo["concats"]
    out = []
    if concats:  # decoupled heads: box and class branches joined (and requantized with one scale) in the graph
        out.append(Proposal("split_head", {"outputs": "uncat"}, f"{len(concats)} model output(s) concatenate "
                            f"branches {[c['channels'] for c in concats]} under one int8 scale: move the concat to "
                            "the host", 0.6))
    worthy = [h for h in heads if h.get("split_worthy", True)]
    if not worthy:
        return out
    lost = max(h["bits_lost"] for h in worthy)
    why = (f"{len(worthy)} head conv(s) share one int8 scale across channels of different ranges (up to "
           f"{lost:.1f} bits lost)")
    out.append(Proposal("split_head", {"groups": "auto"}, why, 0.5))
    if all((h["channels"] % 3 == 0 and h["channels"] // 3 > 5) for h in worthy):  # anchors x (box, obj, classes)
        out += [Proposal("split_head", {"groups": "yolo"}, why + "; YOLO layout: box | objectness | classes", 0.6),
                Proposal("split_head", {"groups": "yolo", "score_floor": -8.0}, why + "; YOLO layout, score "
                         "logits below -8 saturate (sigmoid 3e-4)", 0.55)]
    return out


def _split_head_apply(ctx: _Context, state: _State, p: Proposal) -> _State:
    from .passes.split_head import split_head, split_output_concats

    if p.params.get("outputs") == "uncat":
        result = split_output_concats(state.graph)
    else:
        result = split_head(state.graph, groups=p.params["groups"], calib_data=ctx.calib,
                            score_floor=p.params.get("score_floor"))
    return replace(state, graph=result.graph, steps=state.steps + [{"remedy": "split_head", "params": p.params}],
                   merge=result.merge_outputs, output_names=result.output_names)


register_remedy(Remedy("split_head", ("detection head",), True, "calibration images (channel ranges)", False,
                       "split a detection head conv per channel group, each group with its own int8 scale; "
                       "the outputs are merged on the host, outside the int8 graph", _split_head_propose,
                       _split_head_apply))


# ---------------------------------------------------------------------- structural remedies
# A structural remedy rewrites the float model itself (a dense conv in place of a depthwise-separable unit,
# fewer channels). The steps taken so far were fitted to the model as it was (bias correction, learned
# rounding, ranges), so the change is made on the float model as the structural steps left it (``origin``) and
# every other accepted step is replayed on the result, in its order: the trial is the model the engine would
# have reached had the structural step come first.
_STRUCTURAL = ("dw_to_dense", "prune_channels")


def _rebuilt(ctx: _Context, state: _State, step: dict, graph: fx.GraphModule) -> _State:
    """``state`` as if the structural ``step`` (whose float result is ``graph``) had been taken first."""
    from .graph import find_units
    from .passes.common import folded_copy

    structural = [s for s in state.steps if s["remedy"] in _STRUCTURAL] + [step]
    new = _State(graph, ctx.target.config(), structural, origin=graph)
    names = None
    for s in state.steps:
        if s["remedy"] in _STRUCTURAL:
            continue
        if s["remedy"] == "precision":
            names = names if names is not None else {u.name for u in find_units(folded_copy(graph))}
            if s["params"]["layer"] not in names:
                continue  # the layer is gone (replaced by the dense conv): so is its format
        new = REMEDIES[s["remedy"]].apply(ctx, new, Proposal(s["remedy"], s["params"], "replayed", 0.0))
    return new


def _origin(state: _State) -> fx.GraphModule:
    return state.origin if state.origin is not None else state.graph


def _default_mac_cost(ctx: _Context) -> float:
    return ctx.target.mac_cost.get(ctx.target.default, 1.0)


def _dense_propose(ctx: _Context, state: _State) -> list[Proposal]:
    from .passes.dw_to_dense import find_separable

    if state.merge is not None:
        return []
    memo = ctx.memo("dw_to_dense")
    key = json.dumps([s for s in state.steps if s["remedy"] in _STRUCTURAL], sort_keys=True)
    if key not in memo:
        memo[key] = find_separable(_origin(state))
    done = {s["params"]["block"] for s in state.steps if s["remedy"] == "dw_to_dense"}
    ranking = _ranking(ctx, state)
    out = []
    for unit in memo[key]:
        gain = ranking.get(unit.dw, 0.0) + ranking.get(unit.pw, 0.0)
        if unit.block in done or gain <= 0:
            continue
        extra = (unit.dense_macs - unit.macs) * _default_mac_cost(ctx) / ctx.base_cost
        out.append(Proposal("dw_to_dense", {"block": unit.block},
                            f"keeping {unit.dw} and {unit.pw} float recovers KL {gain:.4g}: one dense conv in their "
                            f"place ({unit.macs / 1e6:.1f} -> {unit.dense_macs / 1e6:.1f} M MACs)",
                            0.5 * gain, max(extra, 0.0)))  # half: the dense conv is fitted, not exact
    return out


def _dense_apply(ctx: _Context, state: _State, p: Proposal) -> _State:
    from .passes.dw_to_dense import dw_to_dense

    graph = dw_to_dense(_origin(state), [p.params["block"]], calib_data=ctx.calib).graph
    return _rebuilt(ctx, state, {"remedy": "dw_to_dense", "params": p.params}, graph)


register_remedy(Remedy("dw_to_dense", ("int8 error", "depthwise conv"), False, "calibration images (least "
                       "squares fit where an activation sits between the convs)", False,
                       "replace a depthwise-separable unit by one dense conv (more MACs, well-conditioned weights); "
                       "kept only when it measurably pays; each trial replays the fitted steps (minutes on a real "
                       "model), so it runs only when named", _dense_propose, _dense_apply, free=False, default=False))


def _pay_with_pruning(ctx: _Context, state: _State, blocked: Proposal, current: _Measure,
                      budget: Budget) -> Proposal | None:
    """A proposal that prunes the float model's cheapest channels (by pruning sensitivity) to pay for
    ``blocked``, a proposal the cost cap refused: the MACs pruned are the cost it is over the cap by, at the
    target's default-format price, with a 10 % margin."""
    if blocked.remedy in _STRUCTURAL or state.merge is not None:
        return None
    over = current.cost + blocked.cost - budget.max_cost
    origin = _origin(state)
    macs = sum(module_macs(origin).values())
    share = 1.1 * over * ctx.base_cost / _default_mac_cost(ctx) / max(macs, 1)
    if not 0 < share < 0.5:
        return None
    keep = round(1 - share, 4)
    return Proposal("prune_channels", {"target_macs": keep, "then": {"remedy": blocked.remedy,
                                                                      "params": blocked.params}},
                    f"prune {100 * (1 - keep):.1f} % of the MACs where pruning sensitivity says channels are cheap, "
                    f"to pay for {_step_text({'remedy': blocked.remedy, 'params': blocked.params})} "
                    f"(x{blocked.cost:.3f}) under the cap", 0.5 * blocked.expected_gain,
                    blocked.cost)  # ordered as the remedy it pays for; the trial measures what it costs


def _prune_apply(ctx: _Context, state: _State, p: Proposal) -> _State:
    from .passes.prune import prune_channels, pruning_sensitivity

    origin = _origin(state)
    memo = ctx.memo("prune_channels")
    key = json.dumps([s for s in state.steps if s["remedy"] in _STRUCTURAL], sort_keys=True)
    if key not in memo:  # where channels are cheap: measured once per float model
        memo[key] = pruning_sensitivity(origin, ctx.calib, progress=False)
    graph = prune_channels(origin, amount=None, target_macs=p.params["target_macs"], calib_data=ctx.calib,
                           allocation="sensitivity", sensitivity=memo[key], progress=False).graph
    step = {"remedy": "prune_channels", "params": {"target_macs": p.params["target_macs"]}}
    new = _rebuilt(ctx, state, step, graph)
    then = p.params.get("then")
    if then is None:
        return new
    return REMEDIES[then["remedy"]].apply(ctx, new, Proposal(then["remedy"], then["params"], "paid by pruning", 0.0))


register_remedy(Remedy("prune_channels", ("cost over the cap",), False, "calibration images (pruning "
                       "sensitivity, bias compensation)", False,
                       "with a cost cap (Budget.max_cost), prune the cheapest channels to pay for a remedy the cap "
                       "refuses", lambda _ctx, _state: [], _prune_apply, free=False))


# ---------------------------------------------------------------------- the result
@dataclass
class PartFigures:
    """Figures on the report part (never used to decide)."""

    images: int
    float_metric: float
    baseline_metric: float
    repaired_metric: float
    baseline_agreement: float
    repaired_agreement: float
    baseline_kl: float
    repaired_kl: float
    drop_interval: tuple[float, float] | None
    one_image: float


@dataclass
class RepairResult:
    """The repaired model and how it was found. ``graph`` + ``config`` reproduce ``sim``/``plan``;
    ``reached`` says whether the budget held on the selection part; ``report`` holds the report-part
    figures (with their resolution)."""

    graph: fx.GraphModule
    config: QuantConfig
    plan: QuantPlan
    sim: SimulatedModel
    target: str
    budget: Budget
    reached: bool
    steps: list[dict]
    trials: list[Trial]
    findings: list[Finding]
    selection: dict
    report: PartFigures
    cost: PlanCost
    relative_cost: float
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    default_format: str = "int8"
    merge_outputs: Callable | None = None  # split heads: the host-side merge back to the original outputs
    output_names: list[str] | None = None

    @property
    def model(self) -> nn.Module:
        """The repaired quantized model as a module that gives the original model's outputs (a split head's
        groups merged on the host)."""
        return _Merged(self.sim, self.merge_outputs) if self.merge_outputs is not None else self.sim

    @property
    def default_mac_share(self) -> float:
        """Share of the model's MACs in the target's default format (int8 on most targets)."""
        return self.cost.macs_by_format.get(self.default_format, 0) / max(self.cost.macs, 1)

    def headline(self) -> str:
        r = self.report
        m = self.budget.metric_name
        resolution = "" if callable(self.budget.metric) else f" (1 image = {r.one_image:.2f} pt)"
        return (f"{m} on {r.images} report images{resolution}: float {r.float_metric:.2f}, "
                f"plain {self.target} {r.baseline_metric:.2f}, repaired {r.repaired_metric:.2f} "
                f"(drop {r.float_metric - r.repaired_metric:.2f}"
                + (f", 95 % interval {r.drop_interval[0]:.2f}..{r.drop_interval[1]:.2f}" if r.drop_interval else "")
                + f"); cost x{self.relative_cost:.3f} of plain; {100 * self.default_mac_share:.1f} % of MACs in "
                  f"{self.default_format}; "
                + ("budget met on the selection images" if self.reached else "BUDGET NOT MET: best model found"))

    def _distance_name(self) -> str:
        """What the one distance from float is for this budget's metric (detectors bring their own)."""
        return "distance" if _own_distance(self.budget) is not None else "KL"

    def to_markdown(self) -> str:
        r, s = self.report, self.selection
        dist = self._distance_name()
        agreement = ([] if math.isnan(r.baseline_agreement) else
                     [f"| agreement with float, report | 100 | {r.baseline_agreement:.2f} | "
                      f"{r.repaired_agreement:.2f} |"])
        lines = [f"# Repair on `{self.target}`, budget {self.budget.max_drop} pt of {self.budget.metric_name}", "",
                 self.headline(), "",
                 "| | float | plain | repaired |", "|---|---:|---:|---:|",
                 f"| {self.budget.metric_name}, report ({r.images} images) | {r.float_metric:.2f} | "
                 f"{r.baseline_metric:.2f} | {r.repaired_metric:.2f} |",
                 *agreement,
                 f"| {dist} from float, report | 0 | {r.baseline_kl:.3g} | {r.repaired_kl:.3g} |",
                 f"| {self.budget.metric_name}, selection ({s['images']} images) | {s['float']:.2f} | "
                 f"{s['baseline']:.2f} | {s['repaired']:.2f} |", "",
                 f"The budget is judged on the selection images: drop + {self.budget.z:.2f} standard errors = "
                 f"{s['drop_bound']:.2f} points ({100 * self.budget.confidence:.0f} % one-sided confidence) "
                 f"against {self.budget.max_drop}.", "",
                 f"Accepted steps: {', '.join(_step_text(x) for x in self.steps) or 'none'}.", "",
                 f"Cost on the target: {self.cost.summary()}", "", *self._path_markdown(),
                 "## Trials (decided on the selection images)", "",
                 f"| # | remedy | params | metric | {dist} | cost | kept | why | s |",
                 "|---:|---|---|---:|---:|---:|---|---|---:|"]
        for i, t in enumerate(self.trials, 1):
            lines.append(f"| {i} | {t.proposal['remedy']} | {json.dumps(t.proposal['params'])} | "
                         f"{t.metric_before:.2f} -> {t.metric_after:.2f} | {t.kl_before:.3g} -> {t.kl_after:.3g} | "
                         f"x{t.cost:.3f} | {'yes' if t.accepted else 'no'} | {t.reason} | "
                         f"{t.seconds:.1f}{' (cached)' if t.cached else ''} |")
        if self.findings:
            lines += ["", "## Findings", ""] + [f"- `{f.layer}`: {f.symptom} ({f.evidence})" for f in self.findings]
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        lines += ["", "Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())]
        return "\n".join(lines) + "\n"

    def path(self) -> list[dict]:
        """The kept steps in order, each with the model's cost and selection figures after it (the first row is the
        plain model): where the cost went, and which cheaper model the run passed on its way."""
        if not self.trials:
            return [{"step": "plain", "trial": 0, "cost": self.relative_cost, "metric": self.selection["repaired"],
                     "kl": self.selection["kl_repaired"]}]
        first = self.trials[0]
        rows = [{"step": "plain", "trial": 0, "cost": 1.0, "metric": first.metric_before, "kl": first.kl_before}]
        # from the kept trials, not ``steps``: a structural step moves the steps before it behind it
        rows += [{"step": _step_text(t.proposal), "trial": i, "cost": t.cost, "metric": t.metric_after,
                  "kl": t.kl_after} for i, t in enumerate(self.trials, 1) if t.accepted]
        return rows

    def _path_markdown(self) -> list[str]:
        rows = self.path()
        dist, m = self._distance_name(), self.budget.metric_name
        lines = ["## Where the cost went (selection images)", "",
                 f"| after | trial | cost | {m} | {dist} |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['trial']} | x{r['cost']:.3f} | {r['metric']:.2f} | {r['kl']:.3g} |"
                  for r in rows]
        free = [r for r in rows if r["cost"] <= 1.0 + 1e-9]
        if self.relative_cost > 1.0 + 1e-9 and free:
            last = free[-1]
            cap = "" if self.budget.max_cost is not None else "; a budget with `max_cost=1.0` stops there"
            lines += ["", f"At the plain model's cost the run reached {dist} {last['kl']:.3g} and {m} "
                          f"{last['metric']:.2f} (after {last['step']}); the steps after it brought the cost to "
                          f"x{self.relative_cost:.3f} and the {dist} to {rows[-1]['kl']:.3g}" + cap + "."]
        return lines + [""]

    def plot(self, path: str | Path) -> Path:
        """Two panels: the selection images' distance from float (KL, or the metric's own) after each trial, kept
        ones joined; and the same with the selection metric against the cost on the target along the kept path
        (what each step cost), or the metric per trial where no trial cost anything."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
        xs = list(range(len(self.trials) + 1))
        kl = [self.trials[0].kl_before if self.trials else self.report.repaired_kl] + [t.kl_after for t in self.trials]
        ax.plot(xs, kl, "o", c="#bbbbbb", label="tried")
        kept = [0] + [i + 1 for i, t in enumerate(self.trials) if t.accepted]
        ax.plot(kept, [kl[i] for i in kept], "o-", c="#c0504d", label="kept")
        ax.set_yscale("log")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"{self._distance_name()} from float (selection images)")
        ax.set_title(f"repair on {self.target}")
        ax.legend()
        self._plot_cost(bx, xs, kept)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def _plot_cost(self, bx: Any, xs: list[int], kept: list[int]) -> None:
        """The plot's second panel: KL and the selection metric against cost along the kept path, or the metric
        per trial where no trial cost anything (a strict target: every point would sit at x1.000)."""
        m = self.budget.metric_name
        if all(abs(t.cost - 1.0) < 1e-9 for t in self.trials):
            metric = [self.trials[0].metric_before if self.trials else self.selection["repaired"]]
            metric += [t.metric_after for t in self.trials]
            bx.plot(xs, metric, "o", c="#bbbbbb", label="tried")
            bx.plot(kept, [metric[i] for i in kept], "s-", c="#4f81bd", label="kept")
            bx.set_xlabel("trial")
            bx.set_ylabel(f"{m} (selection images)")
            bx.set_title(f"no trial cost anything on {self.target}")
            bx.legend()
            return
        bx.plot([t.cost for t in self.trials], [t.kl_after for t in self.trials], "o", c="#bbbbbb", label="tried")
        rows = self.path()
        bx.plot([r["cost"] for r in rows], [r["kl"] for r in rows], "o-", c="#c0504d", label="kept path")
        for r in rows[1:]:
            bx.annotate(f"{r['trial']}", (r["cost"], r["kl"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        bx.set_yscale("log")
        bx.set_xlabel("cost on the target (x plain)")
        bx.set_ylabel(f"{self._distance_name()} from float (selection images)")
        mx = bx.twinx()
        mx.plot([r["cost"] for r in rows], [r["metric"] for r in rows], "s--", c="#4f81bd", ms=4,
                label=f"{m}, kept path")
        mx.set_ylabel(f"{m} (selection images)")
        bx.set_title("what each kept step cost (numbers: trials)")
        handles, more = bx.get_legend_handles_labels(), mx.get_legend_handles_labels()
        bx.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8)

    def save(self, directory: str | Path) -> Path:
        """Write the repaired graph, its config and plan, and the record; :func:`qsurgery.load` reads it back."""
        from .io import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save(self.graph, directory / "graph.pt")
        torch.save(self.config, directory / "config.pt")
        if self.merge_outputs is not None:
            torch.save({"merge_outputs": self.merge_outputs, "output_names": self.output_names},
                       directory / "merge.pt")
        self.plan.to_json(directory / "plan.json")
        (directory / "repair.md").write_text(self.to_markdown())
        (directory / "repair.json").write_text(json.dumps(self._record(), indent=1, default=str))
        return directory

    def _record(self) -> dict:
        return {"target": self.target, "budget": {"max_drop": self.budget.max_drop, "metric": self.budget.metric_name,
                                                  "max_cost": self.budget.max_cost},
                "reached": self.reached, "steps": self.steps, "trials": [asdict(t) for t in self.trials],
                "findings": [asdict(f) for f in self.findings], "selection": self.selection,
                "report": asdict(self.report), "relative_cost": self.relative_cost, "cost": self.cost.to_dict(),
                "seconds": self.seconds, "warnings": self.warnings, "default_mac_share": self.default_mac_share}

    def export_onnx(self, path: str | Path, example_inputs: torch.Tensor, **kwargs: Any):
        """The repaired model as QDQ ONNX, verified against the simulation and the integer twin. A split head's
        groups are separate outputs of the file (named by ``output_names``); ``merge_outputs`` joins them on
        the host, outside the integer graph."""
        from .export import export_onnx

        if self.output_names is not None:
            kwargs.setdefault("output_names", self.output_names)
        return export_onnx(self.sim, path, example_inputs, **kwargs)


def _step_text(step: dict) -> str:
    return step["remedy"] + (f"({', '.join(f'{k}={v}' for k, v in step['params'].items())})" if step["params"] else "")


# ---------------------------------------------------------------------- data
def _materialise(data: Any, n_inputs: int, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs and labels (None unless every batch has them) of ``data``: a tensor, ``(inputs, labels)``, a
    Dataset of ``(image, label)`` or an iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data) \
            and data[0].dim() > 1 and data[1].dim() == 1 and len(data[0]) == len(data[1]):
        return data[0], data[1]
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=32)
    xs, ys, labeled = [], [], True
    for i, batch in enumerate(data if not isinstance(data, torch.Tensor) else [data]):
        if isinstance(batch, torch.Tensor):
            xs.append(batch)
            labeled = False
        elif isinstance(batch, (tuple, list)) and len(batch) > n_inputs and isinstance(batch[n_inputs], torch.Tensor):
            xs.append(batch[0])
            ys.append(torch.as_tensor(batch[n_inputs]))
        elif isinstance(batch, (tuple, list)) and batch:
            xs.append(batch[0])
            labeled = False
        else:
            raise DataError(f"{what} batch {i} is a {type(batch).__name__}; expected a tensor or (inputs, labels)")
    if not xs:
        raise DataError(f"{what} data is empty")
    x = torch.cat(xs)
    y = torch.cat(ys) if labeled and ys else None
    if y is not None and (y < 0).any():
        y = None
    return x, y


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(p, nn.Module):
            h.update(str(getattr(p, "code", type(p).__name__)).encode())
            for k, v in p.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _paired_interval(correct_a: torch.Tensor, correct_b: torch.Tensor) -> tuple[float, float]:
    """95 % interval of the mean paired difference a - b of two 0/1 per-image scores, in points."""
    mean = 100 * float((correct_a.float() - correct_b.float()).mean())
    half = 1.96 * _paired_binary_se(correct_a, correct_b) if len(correct_a) > 1 else math.inf
    return mean - half, mean + half


def _paired_binary_se(correct_a: torch.Tensor, correct_b: torch.Tensor) -> float:
    """Standard error of the mean paired difference a - b of two 0/1 per-image scores, in points, with Agresti
    and Min's adjustment (half an image added to each cell of the paired table): when one image changed, or
    none, the plain estimate says the drop is known to within half an image or exactly; this one does not."""
    d = torch.as_tensor(correct_a, dtype=torch.float64) - torch.as_tensor(correct_b, dtype=torch.float64)
    n = len(d) + 2
    up, down = (float((d > 0).sum()) + 0.5) / n, (float((d < 0).sum()) + 0.5) / n
    return 100 * math.sqrt(max(up + down - (up - down) ** 2, 0.0) / n)


def _paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of the mean paired difference a - b of per-image values (the KL per image), x 100."""
    d = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    return 100 * float(d.std(unbiased=True)) / math.sqrt(len(d))


# ---------------------------------------------------------------------- the engine
def repair(model_or_graph: nn.Module, calib_data: Any, eval_data: Any, *, budget: Budget | None = None,
           target: str | Target | dict = "generic", remedies: Sequence[str] | None = None, selection: float = 0.5,
           report_data: Any = None, max_trials: int = 24, min_gain: float = 0.02, min_gain_per_cost: float = 1.0,
           out_dir: str | Path | None = None, seed: int = 0, batch_size: int = 50,
           executor: Any = None, progress: bool = True) -> RepairResult:
    """The cheapest quantized version of ``model_or_graph`` on ``target`` that keeps ``budget``.

    ``calib_data``: calibration batches (inputs; labels ignored). ``eval_data``: evaluation images with
    labels for ``top1`` (a ``(inputs, labels)`` pair of tensors, a Dataset or batches); ``selection`` of
    them (seeded) decide, the rest report; with ``report_data`` (a fixed test set) all of ``eval_data``
    decides and ``report_data`` reports. ``remedies``: names from :data:`REMEDIES` (default: every one
    the target allows, except those registered ``default=False``: ``distillation`` and ``dw_to_dense``,
    minutes per trial; ``absorb_high_bias``, which did not pay on EfficientNet-Lite0). A
    trial is kept when it lowers the selection KL by at least ``min_gain`` (relative) and, if it costs, by
    more than the budget's ``z`` standard errors of its per-image falls and by at least ``min_gain_per_cost``
    percent of the KL per percent of cost it adds (0: any resolved fall pays); on a callable metric (mAP) when
    the distance from float falls by ``min_gain`` (and, if it costs, by that price) and the metric does not
    fall, or the metric rises by two standard errors.
    ``out_dir``: where trials are kept for resuming (and the result saved). ``executor``: where the layer
    ranking's runs go (None: this process; ``"ray"``, a Ray address or a :mod:`qsurgery.executor` executor:
    Ray workers; the same result)."""
    from .executor import Task, get_executor

    t_start = time.perf_counter()
    executor = get_executor(executor)  # Ray missing or unreachable: said before any work
    budget = budget or Budget()
    if not isinstance(budget, Budget):
        raise RepairError(f"budget must be a qsurgery.Budget, got {type(budget).__name__}")
    target = get_target(target)
    names = [n for n, r in REMEDIES.items() if r.default] if remedies is None else list(remedies)
    unknown = [n for n in names if n not in REMEDIES]
    if unknown:
        raise RepairError(f"unknown remedy {unknown[0]!r}; known: {sorted(REMEDIES)}")
    forbidden = {n: REMEDIES[n].forbidden_on(target) for n in names}
    if remedies is not None:
        bad = {n: why for n, why in forbidden.items() if why}
        if bad:
            n, why = next(iter(bad.items()))
            raise RepairError(f"remedy {n!r} is not allowed on target {target.name}: {why}")
    names = [n for n in names if not forbidden[n]]
    if not 0 < selection < 1:
        raise RepairError(f"selection must be a share in (0, 1), got {selection!r}")
    if max_trials < 0:
        raise RepairError(f"max_trials must be >= 0, got {max_trials}")
    for name, value in (("min_gain", min_gain), ("min_gain_per_cost", min_gain_per_cost)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise RepairError(f"{name} must be a number >= 0, got {value!r}")
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise RepairError(f"out_dir {out_dir} exists and is not a folder")
    # capture (the user's model is never changed)
    if isinstance(model_or_graph, fx.GraphModule) and model_or_graph.meta.get("qsurgery_input_shapes"):
        graph = model_or_graph
    else:
        x0 = next(iter(iter_inputs(calib_data if not isinstance(calib_data, torch.utils.data.Dataset)
                                   else torch.utils.data.DataLoader(calib_data, batch_size=1))))
        graph = capture(model_or_graph, tuple(t[:1] for t in x0))
    calib = [tuple(b) for b in iter_inputs(
        calib_data if not isinstance(calib_data, torch.utils.data.Dataset)
        else torch.utils.data.DataLoader(calib_data, batch_size=batch_size),
        1, expected_shapes=graph.meta.get("qsurgery_input_shapes"), what="calibration")]
    x, y = _materialise(eval_data, 1, "evaluation")
    if budget.metric == "top1" and y is None:
        raise RepairError("budget metric 'top1' needs labeled evaluation data; give (images, labels) or use "
                          "Budget(metric='agreement')")
    if report_data is not None:
        xr, yr = _materialise(report_data, 1, "report")
        if budget.metric == "top1" and yr is None:
            raise RepairError("budget metric 'top1' needs labels in report_data too")
        n_sel = len(x)
        x = torch.cat([x, xr])
        y = torch.cat([y, yr]) if y is not None and yr is not None else None
        perm = torch.arange(len(x))
    else:
        n_sel = int(round(selection * len(x)))
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if n_sel < 1 or len(x) - n_sel < 1:
        raise RepairError(f"{len(x)} evaluation image(s) cannot be split into selection and report parts")
    sel_idx, rep_idx = perm[:n_sel], perm[n_sel:]
    warnings_: list[str] = []
    for part, n in (("selection", n_sel), ("report", len(x) - n_sel)):
        if not callable(budget.metric) and 100 / n > budget.max_drop:
            warnings_.append(f"the {part} part has {n} images: one image moves {budget.metric_name} by "
                             f"{100 / n:.2f} points, more than the {budget.max_drop}-point budget")
    if not callable(budget.metric) and budget.z > 0 and 100 / n_sel <= budget.max_drop:
        # the least bound a model with one changed image can get: above the budget, only no change certifies
        one_lost = torch.ones(n_sel)
        one_lost[0] = 0.0
        one_changed = budget.z * _paired_binary_se(torch.ones(n_sel), one_lost)
        if one_changed > budget.max_drop:
            warnings_.append(f"the selection part's {n_sel} images certify a {budget.max_drop}-point budget at "
                             f"{100 * budget.confidence:.0f} % only if the repaired model changes no image's "
                             f"{budget.metric_name} (one changed image already bounds the drop at "
                             f"{one_changed:.2f}): give more evaluation images, a larger selection share or a lower "
                             "confidence")

    # resumable record
    args_key = {"model": _fingerprint(graph), "calib": _fingerprint(*[t for b in calib for t in b]),
                "eval": _fingerprint(x, y if y is not None else torch.zeros(0)),
                "budget": [budget.max_drop, budget.metric_name, budget.max_cost, budget.confidence],
                "target": target.to_dict(),
                "remedies": names, "selection": selection if report_data is None else "all (report_data given)",
                "seed": seed, "min_gain": min_gain, "min_gain_per_cost": min_gain_per_cost}
    args_key = json.loads(json.dumps(args_key))  # as it reads back from run.json (tuples become lists)
    cache: dict[str, dict] = {}
    log_path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_file, log_path = out_dir / "run.json", out_dir / "trials.jsonl"
        if run_file.exists():
            old = json.loads(run_file.read_text())
            diff = [k for k in args_key if old.get(k) != args_key[k]]
            if diff:
                verb = "differs" if len(diff) == 1 else "differ"
                raise RepairError(f"{out_dir} holds a repair run with other arguments ({', '.join(diff)} {verb}): "
                                  "use another out_dir, or delete it to start over")
            if log_path.exists():
                for line in log_path.read_text().splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        cache[rec["key"]] = rec
        else:
            run_file.write_text(json.dumps(args_key, indent=1))

    t0 = time.perf_counter()
    sel_x, rep_x = x[sel_idx], x[rep_idx]
    sel_y = y[sel_idx] if y is not None else None
    rep_y = y[rep_idx] if y is not None else None
    sel_ref = _outputs(graph, sel_x, batch_size)
    rep_ref = _outputs(graph, rep_x, batch_size)
    config0 = target.config()
    state = _State(graph, config0, [], origin=graph)
    sim0, plan0 = quantize(graph, calib, config0, progress=False)
    base_cost = plan_cost(graph, plan0, target).total
    ctx = _Context(target, calib, sel_x, sel_y, sel_ref, budget, base_cost, seed, progress, batch_size,
                   executor=executor)
    for symptom in _regime(target):
        ctx.findings.append(Finding("*", symptom, f"the target {target.name} requires it for every layer"))
    float_sel = score(sel_ref, sel_y, budget.metric, sel_ref)
    current, sim = _measure(ctx, state, sim0)
    if callable(budget.metric) and budget.z * current.drop_se > budget.max_drop:
        warnings_.append(f"the selection part's {budget.metric_name} drop has a standard error of "
                         f"{current.drop_se:.2f} points (random halves of its {n_sel} images): it cannot certify a "
                         f"{budget.max_drop}-point budget; give more evaluation images")
    seconds = {"set-up and baseline": time.perf_counter() - t0}

    def bound(m: _Measure) -> float:
        # a quantized model that beats float on the selection images is taken as no better than float
        return max(float_sel - m.metric, 0.0) + budget.z * m.drop_se

    def holds(m: _Measure) -> bool:
        return bound(m) <= budget.max_drop and (budget.max_cost is None or m.cost <= budget.max_cost)

    trials: list[Trial] = []
    tried: set[str] = set()
    t1 = time.perf_counter()
    bar = tqdm(total=max_trials, desc=f"repair ({target.name})", unit="trial", disable=not progress, leave=False)
    width = max(1, executor.workers)
    shipped_ctx = replace(ctx, executor=None) if width > 1 else None
    while len(trials) < max_trials and not holds(current):
        # the proposals one after another would try if each were dropped: with several workers they are
        # measured at once, and the first one kept makes the rest stale (same trials as one at a time)
        window: list[Proposal] = []
        hypothetical = set(tried)
        while len(window) < min(width, max_trials - len(trials)):
            p = _next_proposal(ctx, state, names, hypothetical, current, budget)
            if p is None:
                break
            window.append(p)
            hypothetical.add(p.key)
        if not window:
            break
        remote = None
        if len(window) > 1 and not any(_trial_key(state, p) in cache for p in window):
            t = time.perf_counter()
            remote = executor.map(_trial_setup, {"ctx": shipped_ctx}, _trial_work,
                                  [Task(f"trial{len(trials) + k}", (state, REMEDIES[p.remedy], p))
                                   for k, p in enumerate(window)], progress=False)
            each = (time.perf_counter() - t) / len(window)
        for k, p in enumerate(window):
            key = _trial_key(state, p)
            tried.add(p.key)
            t = time.perf_counter()
            rec = cache.get(key)
            new_sim = None
            failed = None
            if remote is not None:
                new_state, after = remote[k]
                if new_state is None:  # the remedy could not be applied there: ``after`` says why
                    failed, after = after, current
            else:
                new_state, failed = _applied(ctx, state, REMEDIES[p.remedy], p)
                if failed is not None:
                    after = current
                elif rec is not None:
                    after = _Measure(**rec["measure"])
                else:
                    after, new_sim = _measure(ctx, new_state)
            accepted, reason = (False, failed) if failed is not None else _judge(current, after, budget, min_gain,
                                                                                         min_gain_per_cost)
            trial = Trial({"remedy": p.remedy, "params": p.params, "why": p.why}, current.metric, after.metric,
                          current.kl, after.kl, after.cost, accepted, reason,
                          each if remote is not None else time.perf_counter() - t, rec is not None)
            trials.append(trial)
            if log_path is not None and rec is None:
                with log_path.open("a") as f:
                    f.write(json.dumps({"key": key, "measure": {k: v for k, v in asdict(after).items()
                                                                if k != "plan_cost"}, "trial": asdict(trial)}) + "\n")
            bar.update(1)
            bar.set_postfix_str(f"{p.remedy}: KL {after.kl:.4f} {'kept' if accepted else 'dropped'}")
            if accepted:
                state, current = new_state, after
                sim = new_sim
                break  # the rest of the window was measured on the old state
    bar.close()
    seconds["trials"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    if sim is None or sim.plan is None or current.plan_cost is None:
        current, sim = _measure(ctx, state)
    plan = sim.plan
    base_rep = _outputs(sim0, rep_x, batch_size)
    fixed_rep = _outputs(sim, rep_x, batch_size, state.merge)
    f_rep = score(rep_ref, rep_y, budget.metric, rep_ref)
    fixed_each = _per_image(budget.metric, fixed_rep, rep_y, rep_ref)
    float_each = _per_image(budget.metric, rep_ref, rep_y, rep_ref)
    interval = _paired_interval(float_each, fixed_each) if fixed_each is not None else None
    if callable(budget.metric) and rep_y is not None and len(rep_y) >= 8:
        se = _half_sample_se(_halves(rep_ref, rep_y, budget.metric, seed), rep_ref, fixed_rep, rep_y, budget.metric)
        drop = score(rep_ref, rep_y, budget.metric, rep_ref) - score(fixed_rep, rep_y, budget.metric, rep_ref)
        interval = (drop - 1.96 * se, drop + 1.96 * se)

    report = PartFigures(len(rep_x), f_rep, score(base_rep, rep_y, budget.metric, rep_ref),
                         score(fixed_rep, rep_y, budget.metric, rep_ref), _agreement(rep_ref, base_rep),
                         _agreement(rep_ref, fixed_rep), _distance(rep_ref, base_rep, budget),
                         _distance(rep_ref, fixed_rep, budget), interval, 100 / len(rep_x))
    base_measure = _Measure(trials[0].metric_before, trials[0].kl_before, 0, 1.0) if trials else current
    seconds["report"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t_start
    result = RepairResult(state.graph, state.config, plan, sim, target.name, budget, holds(current), state.steps,
                          trials, ctx.findings, {"images": n_sel, "float": float_sel,
                                                 "baseline": base_measure.metric, "repaired": current.metric,
                                                 "kl_baseline": base_measure.kl, "kl_repaired": current.kl,
                                                 "drop_bound": bound(current),
                                                 "confidence": budget.confidence},
                          report, current.plan_cost, current.cost, seconds, warnings_, target.default, state.merge,
                          state.output_names)
    if out_dir is not None:
        result.save(out_dir / "result")
    return result


def _judge(current: _Measure, after: _Measure, budget: Budget, min_gain: float,
           min_gain_per_cost: float = 1.0) -> tuple[bool, str]:
    """Whether a trial is kept, and why. Class scores: the KL from float must fall by ``min_gain`` (top-1 on
    a few hundred images moves in coarse steps), and where the change costs, its per-image falls must average
    more than ``budget.z`` standard errors (a fall within the images' noise does not pay for anything). A
    callable metric (mAP on a few dozen images) is as coarse:
    the distance from float decides the same way, and the metric vetoes any change that lowers it on the
    selection images (a kept step is never worse on the metric the budget is on, the images that decide); a
    change that raises the metric by two standard errors of the drop (random halves of the images) is kept
    even where the distance rises (saturated low score logits).

    Either way a change that costs pays a price in the one currency: its distance falls by at least
    ``min_gain_per_cost`` percent per percent of cost it adds (keeping a layer float for 14 % more cost to take
    5 % off the KL is refused; a 1 % layer that takes 17 % off is kept)."""
    if budget.max_cost is not None and after.cost > budget.max_cost:
        return False, f"cost x{after.cost:.3f} over the cap x{budget.max_cost}"
    fell = after.kl < current.kl * (1 - min_gain)
    added = after.cost / current.cost - 1 if current.cost > 0 else 0.0
    share = (current.kl - after.kl) / current.kl if current.kl > 0 else 0.0
    priced = added <= 0 or share >= min_gain_per_cost * added
    price = (f" (a {100 * share:.1f} % fall for {100 * added:.1f} % more cost: a step that costs must lower the "
             f"{'distance' if callable(budget.metric) else 'KL'} by {min_gain_per_cost:g} % per 1 % of cost)")
    if callable(budget.metric):
        noise = max(after.drop_se, current.drop_se)
        rose = after.metric > current.metric + 2 * noise
        closer = fell and after.metric >= current.metric  # closer to float without the metric falling
        ok = (closer and priced) or rose
        why = (" (kept)" if ok else price if closer else
               f" (needs the distance to fall by {100 * min_gain:.0f} % without the metric falling, or the metric to "
               f"rise by two standard errors, {2 * noise:.2f})")
        return ok, (f"{budget.metric_name} {current.metric:.2f} -> {after.metric:.2f}, distance {current.kl:.4g} -> "
                    f"{after.kl:.4g}" + why)
    why = f"KL {current.kl:.4g} -> {after.kl:.4g}"
    if not fell:
        return False, why + f" (needs a {100 * min_gain:.0f} % fall)"
    if not priced:
        return False, why + price
    if after.cost > current.cost and current.kl_each and after.kl_each and len(after.kl_each) > 1 and budget.z > 0:
        # a change that costs must pay with a fall the selection images resolve: the paired per-image falls'
        # mean beyond z standard errors (the budget's confidence), not one image's luck
        fall = current.kl - after.kl
        se = _paired_se(current.kl_each, after.kl_each) / 100  # the helper speaks in points
        if fall <= budget.z * se:
            return False, why + (f" (fall {fall:.3g} within {budget.z:.2f} standard errors, {se:.3g}, "
                                 "of the selection images: not worth its cost)")
    return True, why + " (kept)"


def _next_proposal(ctx: _Context, state: _State, names: list[str], tried: set[str], current: _Measure,
                   budget: Budget) -> Proposal | None:
    """The proposal the engine tries next from ``state``: free remedies first (exact rewrites before the steps
    fitted to the weights), then the best expected gain per unit of cost, within the cost cap; None when nothing
    is left."""
    proposals: list[Proposal] = []
    free_pending = [m for m in names if REMEDIES[m].free and _pending(m, ctx, state, tried)]
    for n in names:
        remedy = REMEDIES[n]
        if not remedy.free and free_pending:
            continue  # costed remedies wait until the free ones are spent
        if n in _FITTED_TO_SCALES and any(REMEDIES[m].exact for m in free_pending):
            continue  # steps fitted to the weights wait for the exact rewrites (equalization, a head split), which
            # would change the weights they fit (DFQ's order: equalize, then correct the bias, then round)
        proposals += [p for p in remedy.propose(ctx, state) if p.key not in tried]
    if budget.max_cost is not None:
        over = [p for p in proposals if current.cost + p.cost > budget.max_cost]
        proposals = [p for p in proposals if current.cost + p.cost <= budget.max_cost]
        if "prune_channels" in names:  # the cap refused these: pruning may pay for them
            paid = (_pay_with_pruning(ctx, state, p, current, budget) for p in over)
            proposals += [p for p in paid if p is not None and p.key not in tried]
    if not proposals:
        return None
    return max(proposals, key=lambda q: (q.expected_gain / max(q.cost, 1e-3) if q.cost > 0 else math.inf,
                                         q.expected_gain))


def _trial_setup(ctx: _Context) -> _Context:
    return ctx


def _trial_work(ctx: _Context, payload: tuple) -> tuple[_State | None, _Measure | str]:
    """One trial on a worker: the remedy applied to the shipped state, measured on the selection images (the
    executor packs the states' graphs on the way); (None, why) when it cannot be applied."""
    state, remedy, proposal = payload
    new_state, failed = _applied(ctx, state, remedy, proposal)
    if failed is not None:
        return None, failed
    after, _sim = _measure(ctx, new_state)
    return new_state, after


def _applied(ctx: _Context, state: _State, remedy: Remedy, p: Proposal) -> tuple[_State | None, str | None]:
    """The proposal applied, or None and why it cannot be on this model (a unit too large for the calibration
    images to fit, say): such a trial is recorded as not kept, and the search goes on."""
    try:
        return remedy.apply(ctx, state, p), None
    except (CalibrationError, ConfigError) as e:
        return None, f"could not be applied: {e}"


def _trial_key(state: _State, p: Proposal) -> str:
    return hashlib.sha256(json.dumps([state.steps, p.key], sort_keys=True).encode()).hexdigest()[:16]


def _pending(name: str, ctx: _Context, state: _State, tried: set[str]) -> bool:
    return any(p.key not in tried for p in REMEDIES[name].propose(ctx, state))
