"""Mixed precision: choose a per-layer format the target allows, from measured sensitivity, under a cost model.

Start from the all-int8 plan. Every layer that keeping float helps (``float_one`` sensitivity) becomes a
candidate in each non-int8 format the target runs; candidates are tried in order of estimated gain per unit
of cost (cost from :mod:`qsurgery.cost`). Layers interact, so each step re-measures the whole plan on the
evaluation data and keeps the change only if the outputs measurably moved closer to float (KL), the
correction a sum of single-layer gains cannot make. The measured steps give the accuracy-vs-cost Pareto
front; the answer is the cheapest plan within the budget (or the most accurate one under a cost cap).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..analysis.sensitivity import SensitivityReport
from ..cost import PlanCost, plan_cost
from ..errors import ConfigError
from ..evaluate import distance, predict
from ..evaluate import score as _score
from ..executor import Task, get_executor
from ..quant.plan import QuantPlan
from ..quant.simulate import quantize
from ..targets import Target, get_target

__all__ = ["assign_precision", "PrecisionResult", "FrontPoint", "measure_plan", "with_formats"]

_RECOVERY = {"float": 1.0, "fp16": 1.0, "int16": 1.0, "a16w8": 0.8}  # share of float_one's gain expected


@dataclass
class FrontPoint:
    """One measured plan: its non-int8 layers and formats, accuracy (points) and cost."""

    formats: dict[str, str]
    accuracy: float
    cost: float
    non_int8_mac_share: float
    accepted: bool = True
    kl: float | None = None


@dataclass
class PrecisionResult:
    """The chosen plan and everything measured on the way. ``reached`` is False when no plan met the budget
    (the most accurate one is returned, flagged); ``front`` is the measured accuracy-vs-cost Pareto front."""

    plan: QuantPlan
    formats: dict[str, str]
    accuracy: float
    float_accuracy: float
    int8_accuracy: float
    cost: PlanCost
    reached: bool
    target: str
    metric: str
    steps: list[FrontPoint] = field(default_factory=list)

    @property
    def front(self) -> list[FrontPoint]:
        pts = sorted([p for p in self.steps if p.accepted], key=lambda p: (p.cost, -p.accuracy))
        out: list[FrontPoint] = []
        for p in pts:
            if not out or p.accuracy > out[-1].accuracy:
                out.append(p)
        return out

    def summary(self) -> str:
        flag = "" if self.reached else "  (BUDGET NOT REACHED: most accurate plan found)"
        lines = [f"{self.target}, {self.metric}: float {self.float_accuracy:.2f}, int8 {self.int8_accuracy:.2f}, "
                 f"chosen {self.accuracy:.2f} with {len(self.formats)} non-int8 layer(s), "
                 f"{100 * self.cost.non_int8_mac_share:.2f} % of MACs not int8{flag}"]
        lines += [f"  {k}: {v}" for k, v in self.formats.items()]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        tried = [p for p in self.steps]
        ax.scatter([100 * p.non_int8_mac_share for p in tried], [p.accuracy for p in tried], c="#bbbbbb",
                   label="measured")
        front = self.front
        ax.plot([100 * p.non_int8_mac_share for p in front], [p.accuracy for p in front], "o-", c="#c0504d",
                label="Pareto front")
        ax.axhline(self.float_accuracy, ls="--", c="k", lw=0.8, label="float")
        ax.set_xlabel("MACs not in int8 (%)")
        ax.set_ylabel(self.metric)
        ax.set_title(f"mixed precision on {self.target}")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def with_formats(plan: QuantPlan, formats: dict[str, str], target: Target) -> QuantPlan:
    """A copy of the all-int8 ``plan`` with the named layers in the given per-layer formats."""
    new = copy.deepcopy(plan)
    for name, fmt in formats.items():
        if name not in new:
            raise ConfigError(f"layer {name!r} is not in the plan")
        layer = new[name]
        layer.weight, layer.activation = target.formats_of(fmt, layer.weight, layer.activation)
    return new


def measure_plan(graph: fx.GraphModule, plan: QuantPlan, data: Any, metric: str | Callable,
                 reference: torch.Tensor) -> tuple[float, float]:
    """``graph`` quantized as ``plan`` (ranges reused, no calibration) on ``data``: the accuracy in points
    (``top1`` needs labels; ``agreement`` with the float ``reference``; or ``metric(outputs, labels)``) and the
    mean KL divergence of the outputs from float (the soft signal that guides the search)."""
    sim, _ = quantize(graph, None, plan=plan, progress=False)
    out, labels = predict(sim, data)
    return _score(out, labels, metric, reference), distance(reference, out)


def _measure_setup(graph: fx.GraphModule, data: list, metric: str | Callable, reference: Any) -> dict:
    return {"graph": graph, "data": data, "metric": metric, "reference": reference}


def _measure_work(state: dict, plan: QuantPlan) -> tuple[float, float]:
    return measure_plan(state["graph"], plan, state["data"], state["metric"], state["reference"])


def assign_precision(graph: fx.GraphModule, plan: QuantPlan, sensitivity: SensitivityReport, *,
                     target: str | Target | dict, data: Any, budget: float | None = None,
                     max_cost: float | None = None, metric: str | Callable = "top1", max_steps: int = 48,
                     min_kl_gain: float = 0.005, executor: Any = None, progress: bool = True) -> PrecisionResult:
    """Choose per-layer formats for ``graph`` on ``target``.

    ``plan``: the calibrated all-int8 plan (``quantize`` returns it; its ranges are reused). ``sensitivity``:
    a ``float_one`` report. ``data``: evaluation batches. ``budget``: the accuracy loss allowed against float,
    in points of ``metric`` (the cheapest plan within it is returned); or ``max_cost``: the largest share of
    MACs allowed off int8 (0..1; the most accurate plan within it is returned). Neither: the whole front is
    measured and the most accurate plan returned.

    A step is kept when it lowers the outputs' KL divergence from float by at least ``min_kl_gain``
    (relative): on a few hundred images top-1 moves in coarse steps, KL shows every real improvement.
    ``executor``: where the steps are measured (None: this process; ``"ray"``, an address or a
    :mod:`qsurgery.executor` executor: several candidates at once on Ray workers, the same result).
    """
    target = get_target(target)
    if budget is not None and max_cost is not None:
        raise ConfigError("give budget (accuracy loss allowed) or max_cost (share of MACs off int8), not both")
    if sensitivity.mode != "float_one":
        raise ConfigError("assign_precision needs a float_one sensitivity report (what keeping each layer "
                          f"float buys); got mode {sensitivity.mode!r}")
    target.check(plan)
    ex = get_executor(executor)  # Ray missing or unreachable: said before any work
    batches = [data] if isinstance(data, torch.Tensor) else list(data)
    ref_out, labels = predict(graph, batches)
    float_acc = _score(ref_out, labels, metric, ref_out)
    base_cost = plan_cost(graph, plan, target)
    int8_acc, int8_kl = measure_plan(graph, plan, batches, metric, ref_out)
    steps: list[FrontPoint] = [FrontPoint({}, int8_acc, base_cost.total, base_cost.non_int8_mac_share,
                                          kl=int8_kl)]
    current: dict[str, str] = {}
    current_acc, current_kl = int8_acc, int8_kl
    if not target.mixed:
        return PrecisionResult(plan, {}, int8_acc, float_acc, int8_acc, base_cost, budget is None
                               or int8_acc >= float_acc - budget, target.name, _metric_name(metric), steps)

    candidates = []
    for row in sensitivity.rows:
        if row.layer not in plan or row.delta <= 0:
            continue
        for fmt in target.formats:
            if fmt == "int8":
                continue
            trial = with_formats(plan, {row.layer: fmt}, target)
            extra = plan_cost(graph, trial, target).total - base_cost.total
            candidates.append((row.delta * _RECOVERY.get(fmt, 1.0) / max(extra, 1.0), row.layer, fmt, extra))
    candidates.sort(key=lambda c: -c[0])

    def done() -> bool:
        return budget is not None and current_acc >= float_acc - budget

    # Each step is measured against the plan kept so far. With several workers the next few candidates are
    # measured at once against it; the first one kept makes the later ones stale (measured against the old
    # plan), so they are measured again: the same steps, in the same order, as one at a time.
    shared = {"graph": graph, "data": batches, "metric": metric, "reference": ref_out}
    width = max(1, ex.workers)
    bar = tqdm(total=min(max_steps, len(candidates)), desc=f"assigning precision ({target.name})",
               disable=not progress, leave=False)
    tried, i = 0, 0
    while i < len(candidates) and not done() and tried < max_steps:
        window, j = [], i
        while j < len(candidates) and len(window) < min(width, max_steps - tried):
            _ratio, layer, fmt, _extra = candidates[j]
            j += 1
            if layer in current and target.formats.index(current[layer]) >= target.formats.index(fmt):
                continue
            trial_formats = {**current, layer: fmt}
            trial = with_formats(plan, trial_formats, target)
            cost = plan_cost(graph, trial, target)
            if max_cost is not None and cost.non_int8_mac_share > max_cost:
                continue
            window.append((j, trial_formats, trial, cost))
        if not window:
            break
        results = ex.map(_measure_setup, shared, _measure_work,
                         [Task(f"step{tried + k}", trial) for k, (_j, _f, trial, _c) in enumerate(window)],
                         progress=False)
        i = j
        for (after, trial_formats, _trial, cost), (acc, kl) in zip(window, results):
            tried += 1
            bar.update(1)
            accepted = kl < current_kl * (1 - min_kl_gain)
            steps.append(FrontPoint(trial_formats, acc, cost.total, cost.non_int8_mac_share, accepted, kl))
            if accepted:
                current, current_acc, current_kl = trial_formats, acc, kl
                i = after  # the rest of the window was measured against the old plan
                break
    bar.close()

    if budget is not None:
        ok = [p for p in steps if p.accepted and p.accuracy >= float_acc - budget]
        best = min(ok, key=lambda p: p.cost) if ok else max((p for p in steps if p.accepted),
                                                             key=lambda p: (p.accuracy, -p.cost))
        reached = bool(ok)
    else:
        best = max((p for p in steps if p.accepted), key=lambda p: (p.accuracy, -p.cost))
        reached = True
    final = with_formats(plan, best.formats, target)
    target.check(final)
    return PrecisionResult(final, dict(best.formats), best.accuracy, float_acc, int8_acc,
                           plan_cost(graph, final, target), reached, target.name, _metric_name(metric), steps)


def _metric_name(metric: str | Callable) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
