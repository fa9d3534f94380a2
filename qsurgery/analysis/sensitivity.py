"""Layer-wise sensitivity: quantize one layer (rest float) or keep one layer float (rest quantized), and
measure how the model's output moves. Which layers break, and what skipping each would buy.

Fast by design, without shrinking the data: calibration runs once (PTQ observers see float activations,
so the ranges a layer gets alone are the ones it gets in the full model), and for every evaluation batch
the reference run (float, or all-quantized) is computed once and cached node by node; each layer then
re-runs only the nodes downstream of it. Cost: one calibration pass (two for histogram observers), plus
per batch one reference forward and, per layer, the part of a forward downstream of that layer.
"""

from __future__ import annotations

import json
import math
from collections import ChainMap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import ConfigError, DataError, QSurgeryError
from ..evaluate import distance
from ..executor import Executor, ScaleOutError, Task, fingerprint, get_executor
from ..graph import device_of, input_count, module_macs
from ..quant.config import QuantConfig
from ..quant.simulate import SimulatedModel, quantize

__all__ = ["sensitivity", "SensitivityReport", "SensitivityRow", "METRICS"]

METRICS = ("top1", "agreement", "kl", "sqnr", "distance")
Mode = Literal["quantize_one", "float_one"]


class _Accumulator:
    """Accumulates one metric over batches; ``value`` is the metric, ``badness`` how bad it is (higher worse)."""

    def __init__(self, metric: str | Callable, distance: Callable[[Any, Any], float] | None = None):
        self.metric = metric
        self.distance = distance
        self.sums: dict[str, float] = {"n": 0.0, "a": 0.0, "b": 0.0}

    def add(self, out_all: Any, ref_all: Any, batch: Any, labels: torch.Tensor | None) -> None:
        """One batch: ``out_all`` / ``ref_all`` are the whole outputs (every metric but ``distance`` reads the
        first tensor)."""
        out, ref = _first_output(out_all), _first_output(ref_all)
        n = out.shape[0]
        s = self.sums
        s["n"] += n
        if self.metric == "distance":
            s["a"] += float((self.distance or distance)(ref_all, out_all)) * n
        elif callable(self.metric):
            v = float(self.metric(out, batch))
            if not math.isfinite(v):
                raise QSurgeryError(f"the metric returned a non-finite value ({v})")
            s["a"] += v * n
        elif self.metric == "top1":
            s["a"] += float((out.argmax(1) == labels).sum())
        elif self.metric == "agreement":
            s["a"] += float((out.argmax(1) == ref.argmax(1)).sum())
        elif self.metric == "kl":
            logp = F.log_softmax(ref.float(), 1)
            s["a"] += float(F.kl_div(F.log_softmax(out.float(), 1), logp, log_target=True, reduction="sum"))
        else:  # sqnr
            s["a"] += float(ref.float().pow(2).sum())
            s["b"] += float((out.float() - ref.float()).pow(2).sum())

    @property
    def value(self) -> float:
        s = self.sums
        if self.metric == "sqnr":
            return math.inf if s["b"] == 0 else 10 * math.log10(s["a"] / s["b"])
        return s["a"] / max(s["n"], 1)

    @property
    def badness(self) -> float:  # KL and distance: lower is better; the rest: higher
        return self.value if self.metric in ("kl", "distance") else -self.value

    def merge(self, part: dict[str, float]) -> None:
        """Add one batch's sums (from a task); merged in batch order, the totals are the in-process ones."""
        for k, v in part.items():
            self.sums[k] += v


@dataclass
class SensitivityRow:
    layer: str
    kind: str
    macs: int
    value: float
    delta: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SensitivityReport:
    """Per layer: the metric with only that layer quantized (``quantize_one``) or only it float (``float_one``),
    and ``delta``: how much worse than float (quantize_one), or how much better than all-int8 (float_one),
    in the metric's units (points of accuracy/agreement, nats of KL, dB of SQNR). Sorted, largest first."""

    mode: str
    metric: str
    reference: float
    baseline: float | None
    rows: list[SensitivityRow]
    forward_cost: dict[str, float] = field(default_factory=dict)

    def top(self, k: int = 5) -> list[SensitivityRow]:
        return self.rows[:k]

    def layers(self) -> list[str]:
        return [r.layer for r in self.rows]

    def __getitem__(self, layer: str) -> SensitivityRow:
        for r in self.rows:
            if r.layer == layer:
                return r
        raise KeyError(layer)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "metric": self.metric, "reference": self.reference, "baseline": self.baseline,
                "forward_cost": self.forward_cost, "rows": [r.to_dict() for r in self.rows]}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_markdown(self, k: int | None = None) -> str:
        what = "only this layer int8" if self.mode == "quantize_one" else "all int8 but this layer"
        head = "worse than float" if self.mode == "quantize_one" else "better than all-int8"
        lines = [f"| rank | layer | op | MMACs | {self.metric} ({what}) | {head} |", "|---:|---|---|---:|---:|---:|"]
        for i, r in enumerate(self.rows[:k], 1):
            lines.append(f"| {i} | `{r.layer}` | {r.kind} | {r.macs / 1e6:.2f} | {r.value:.4g} | {r.delta:+.4g} |")
        return "\n".join(lines)

    def plot(self, path: str | Path, k: int = 30) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows[:k]
        fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
        ax.barh([r.layer for r in rows][::-1], [r.delta for r in rows][::-1], color="#c0504d")
        ax.set_xlabel(f"{self.metric}: " + ("worse than float" if self.mode == "quantize_one"
                                            else "better than all-int8"))
        ax.set_title(f"sensitivity ({self.mode}), top {len(rows)}")
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)


class _Replay(fx.Interpreter):
    """Runs a graph over an environment where most node values are already known (cached)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)

    def run_all(self, inputs: tuple) -> dict[fx.Node, Any]:
        self.env = {}
        self.run(*inputs)
        return dict(self.env)

    def run_from(self, base: dict[fx.Node, Any], nodes: Sequence[fx.Node]) -> Any:
        fresh: dict[fx.Node, Any] = {}
        self.env = ChainMap(fresh, base)
        result = None
        for node in nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                args, _ = self.fetch_args_kwargs_from_env(node)
                result = args[0]
            else:
                fresh[node] = self.run_node(node)
        return result


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_output(out[0])
    if isinstance(out, dict) and out:
        return _first_output(next(iter(out.values())))
    raise QSurgeryError("the model output holds no tensor")


def _downstream(gm: fx.GraphModule, start: fx.Node) -> list[fx.Node]:
    """``start`` and every node that depends on it, in execution order (including the output)."""
    seen = {start}
    for node in gm.graph.nodes:
        if node is start:
            continue
        if any(a in seen for a in node.all_input_nodes):
            seen.add(node)
    return [n for n in gm.graph.nodes if n in seen]


def _split_batch(batch: Any, n_inputs: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and batch:
        inputs = tuple(batch[:n_inputs])
        labels = batch[n_inputs] if len(batch) > n_inputs else None
        return inputs, (torch.as_tensor(labels) if labels is not None else None)
    raise DataError(f"cannot read an evaluation batch of type {type(batch).__name__}")


def _batch_list(eval_data: Any, n_inputs: int, metric: Any) -> list:
    """The evaluation batches as a list (shipped once to workers), checked before any work."""
    batches = [eval_data] if isinstance(eval_data, torch.Tensor) else list(eval_data)
    if not batches:
        raise DataError("evaluation data is empty")
    for i, batch in enumerate(batches):
        _inputs, labels = _split_batch(batch, n_inputs)
        if metric == "top1" and labels is None:
            raise DataError(f"metric 'top1' needs labels: give eval batches as (inputs, labels) (batch {i} has none)")
    return batches


def _chunks(layers: list[str], cost: dict[str, int], n: int) -> list[list[str]]:
    """``layers`` in ``n`` groups of about equal cost (each kept in the given order)."""
    n = max(1, min(n, len(layers)))
    bins: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for name in sorted(layers, key=lambda x: -cost[x]):
        i = load.index(min(load))
        bins[i].append(name)
        load[i] += cost[name]
    order = {name: i for i, name in enumerate(layers)}
    return [sorted(b, key=order.__getitem__) for b in bins if b]


def _setup(sim: SimulatedModel, batches: list, spec: dict) -> dict:
    """A worker's state: the simulated model, the batches and, per layer, the nodes downstream of it."""
    gm = sim.graph_module
    names = [n.name for n in gm.graph.nodes]
    if names != spec["nodes"]:
        raise ScaleOutError("the simulated model did not arrive intact on the worker (its graph was re-traced "
                            "with different node names); run sensitivity in-process (executor=None)")
    if device_of(gm).type == "cuda" and not torch.cuda.is_available():
        sim = sim.cpu()
        gm = sim.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    starts = {name: _downstream(gm, nodes[sim.plan[name].nodes[0]]) for name in spec["layers"]}
    return {"sim": sim, "gm": gm, "batches": batches, "spec": spec, "starts": starts, "replay": _Replay(gm),
            "n_inputs": input_count(gm), "device": device_of(gm)}


def _work(state: dict, payload: tuple[int, list[str]]) -> dict:
    """One batch, some layers: the batch's metric sums for the reference, the baseline (float_one) and each
    layer run alone (quantize_one) or alone float (float_one)."""
    index, layers = payload
    sim, gm, replay, spec = state["sim"], state["gm"], state["replay"], state["spec"]
    metric, mode, dist = spec["metric"], spec["mode"], spec["distance"]
    batch = state["batches"][index]
    inputs, labels = _split_batch(batch, state["n_inputs"])
    inputs = tuple(t.to(state["device"]) for t in inputs)
    labels = labels.to(state["device"]) if labels is not None else None
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    enabled_before = sim.quantized_names()
    result: dict[str, Any] = {"reference": None, "baseline": None, "layers": {}}
    try:
        with torch.no_grad():
            sim.set_quantized(None, False)
            float_env = replay.run_all(inputs)
            float_out = replay.run_from(float_env, outputs)
            if not torch.isfinite(_first_output(float_out)).all():
                raise QSurgeryError(f"the float model's output is not finite on evaluation batch {index}")
            acc = _Accumulator(metric, dist)
            acc.add(float_out, float_out, batch, labels)
            result["reference"] = acc.sums
            base_env = float_env
            if mode == "float_one":
                sim.set_quantized(None, True)
                base_env = replay.run_all(inputs)
                acc = _Accumulator(metric, dist)
                acc.add(replay.run_from(base_env, outputs), float_out, batch, labels)
                result["baseline"] = acc.sums
            for name in layers:
                sim.set_quantized([name], mode == "quantize_one")
                out = replay.run_from(base_env, state["starts"][name])
                sim.set_quantized([name], mode != "quantize_one")
                acc = _Accumulator(metric, dist)
                acc.add(out, float_out, batch, labels)
                result["layers"][name] = acc.sums
    finally:
        sim.set_quantized(None, False)
        sim.set_quantized(enabled_before, True)
    return result


def sensitivity(graph: fx.GraphModule, calib_data: Any, eval_data: Any, *, metric: str | Callable = "kl",
                mode: Mode = "quantize_one", config: QuantConfig | None = None, layers: Sequence[str] | None = None,
                simulated: SimulatedModel | None = None, distance: Callable[[Any, Any], float] | None = None,
                executor: Executor | str | None = None, checkpoint: str | Path | None = None,
                progress: bool = True) -> SensitivityReport:
    """Rank quantized layers by how much they hurt (``quantize_one``) or how much keeping them float helps
    (``float_one``), measured on ``eval_data`` with ``metric``: ``"top1"`` (needs labels), ``"agreement"``
    with float, ``"kl"`` divergence from float, ``"sqnr"`` of the outputs, ``"distance"`` from float over
    every output (``distance(ref, out)``, default :func:`qsurgery.evaluate.distance`), or
    ``metric(outputs, batch)`` (higher is better). ``simulated`` reuses an existing calibration instead of
    calibrating ``calib_data``.

    ``executor``: where the layer runs go (None: this process; ``"ray"`` or a cluster address: Ray workers,
    see :mod:`qsurgery.executor`); the report is the same bit for bit. ``checkpoint``: a file keeping finished
    batches, so that an interrupted run resumes.
    """
    if mode not in ("quantize_one", "float_one"):
        raise ConfigError(f"mode must be 'quantize_one' or 'float_one', got {mode!r}")
    if not callable(metric) and metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use one of {METRICS} or a callable(outputs, batch)")
    if distance is not None and metric != "distance":
        raise ConfigError("distance= is the function of metric='distance'; pass both or neither")
    ex = get_executor(executor)  # Ray missing or unreachable: said now, before calibration
    sim = simulated
    if sim is None:
        sim, _ = quantize(graph, calib_data, config, progress=progress)
    plan = sim.plan
    quantized = [layer.name for layer in plan if not layer.is_float]
    if layers is None:
        layers = quantized
    else:
        layers = list(layers)
        bad = [name for name in layers if name not in quantized]
        if bad:
            from difflib import get_close_matches

            raise ConfigError(f"not quantized layers: {bad[:5]} (close: {get_close_matches(bad[0], quantized, n=4)})")
    gm = sim.graph_module
    batches = _batch_list(eval_data, input_count(gm), metric)
    nodes = {n.name: n for n in gm.graph.nodes}
    macs = module_macs(gm)
    starts = {name: _downstream(gm, nodes[plan[name].nodes[0]]) for name in layers}
    total_nodes = sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))

    spec = {"metric": metric, "mode": mode, "distance": distance, "layers": list(layers),
            "nodes": [n.name for n in gm.graph.nodes]}
    # one task per batch; more (a batch's layers in groups of equal cost) when there are more workers than
    # batches to keep busy. A layer's figure does not depend on the grouping: the same report on any executor.
    workers = ex.workers
    groups = _chunks(list(layers), {n: len(starts[n]) for n in layers}, math.ceil(2 * workers / len(batches))
                     if workers > 1 else 1)
    tasks = [Task(f"batch{b}/group{g}", (b, group), len(group)) for b in range(len(batches))
             for g, group in enumerate(groups)]
    key = fingerprint(sim, sim.plan.to_json(), batches, {k: v for k, v in spec.items() if k != "nodes"},
                      sim.quantized_names()) if checkpoint is not None else ""
    parts = ex.map(_setup, {"sim": sim, "batches": batches, "spec": spec}, _work, tasks,
                   desc=f"sensitivity ({mode})", unit="layer-run", progress=progress, checkpoint=checkpoint,
                   depends_on=key)

    reference, baseline = _Accumulator(metric, distance), _Accumulator(metric, distance)
    per_layer = {name: _Accumulator(metric, distance) for name in layers}
    for task, part in zip(tasks, parts):  # tasks are in batch order: the sums add up as in one process
        if task.key.endswith("/group0"):
            reference.merge(part["reference"])
            if mode == "float_one":
                baseline.merge(part["baseline"])
        for name, sums in part["layers"].items():
            per_layer[name].merge(sums)

    ref_bad = reference.badness
    base_bad = baseline.badness if mode == "float_one" else None
    rows = []
    for name in layers:
        acc = per_layer[name]
        if mode == "quantize_one":
            delta = acc.badness - ref_bad if metric != "sqnr" else -acc.value
        else:
            delta = base_bad - acc.badness
        layer = plan[name]
        rows.append(SensitivityRow(name, layer.kind, macs.get(layer.module, 0) if layer.module else 0,
                                   acc.value, delta))
    rows.sort(key=lambda r: (-r.delta if math.isfinite(r.delta) else math.inf, r.layer))
    downstream = sum(sum(1 for n in starts[name] if n.op != "output") for name in layers) / max(total_nodes, 1)
    cost = {"reference_forwards_per_batch": 1.0 if mode == "quantize_one" else 2.0,
            "layer_forwards_per_batch": round(downstream, 2), "naive_forwards_per_batch": float(len(layers)),
            "batches": len(batches)}
    return SensitivityReport(mode, metric if isinstance(metric, str) else getattr(metric, "__name__", "custom"),
                             reference.value, baseline.value if mode == "float_one" else None, rows, cost)
