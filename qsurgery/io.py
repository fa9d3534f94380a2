"""Save and load what qsurgery makes: captured or rewritten graphs (``qsurgery.save`` / ``qsurgery.load``), and
repaired models (``RepairResult.save(dir)`` / ``qsurgery.load(dir)``).

A ``GraphModule`` pickles by its generated code and re-traces on load, which drops what qsurgery keeps
beside the code (the captured input shapes, range limits, pinned weight scales, the module scope of each
node that names function units). ``save`` stores those too and ``load`` puts them back, so a reloaded graph
quantizes to the same units and the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .errors import QSurgeryError

__all__ = ["save", "load", "SavedRepair"]

_FORMAT = "qsurgery-graph-1"


def save(graph: fx.GraphModule, path: str | Path) -> Path:
    """Write ``graph`` (from ``capture`` or a pass) to ``path`` with everything qsurgery keeps beside it."""
    if not isinstance(graph, fx.GraphModule):
        raise QSurgeryError(f"qsurgery.save takes a captured graph (GraphModule), got {type(graph).__name__}")
    nodes = [(n.op, str(n.target), {k: v for k, v in n.meta.items() if k == "nn_module_stack"})
             for n in graph.graph.nodes]
    path = Path(path)
    torch.save({"format": _FORMAT, "graph": graph, "meta": dict(graph.meta), "nodes": nodes}, path)
    return path


@dataclass
class SavedRepair:
    """A repaired model read back from ``RepairResult.save(dir)``: the graph, its config and plan, the simulated
    model rebuilt from the plan's ranges (the same outputs as before saving, no calibration data needed), the
    host-side output merge of a split head, and the repair's record (``repair.json``)."""

    graph: fx.GraphModule
    config: Any
    plan: Any
    sim: Any
    merge_outputs: Callable | None
    output_names: list[str] | None
    record: dict

    def __call__(self, *x: torch.Tensor) -> Any:
        """The repaired quantized model's outputs, in the original model's structure."""
        out = self.sim(*x)
        return self.merge_outputs(out) if self.merge_outputs is not None else out

    def export_onnx(self, path: str | Path, example_inputs: torch.Tensor, **kwargs: Any):
        """The repaired model as verified QDQ ONNX (as ``RepairResult.export_onnx``)."""
        from .export import export_onnx

        if self.output_names is not None:
            kwargs.setdefault("output_names", self.output_names)
        return export_onnx(self.sim, path, example_inputs, **kwargs)


def _load_repair(directory: Path) -> SavedRepair:
    import json

    from .quant.plan import QuantPlan
    from .quant.simulate import quantize

    missing = [f for f in ("graph.pt", "config.pt", "plan.json") if not (directory / f).is_file()]
    if missing:
        raise QSurgeryError(f"{directory} is not a saved repair (RepairResult.save): {', '.join(missing)} missing")
    graph = load(directory / "graph.pt")
    config = torch.load(directory / "config.pt", weights_only=False)
    plan = QuantPlan.from_json(directory / "plan.json")
    sim, plan = quantize(graph, None, config, plan=plan, progress=False)
    merge, names = None, None
    if (directory / "merge.pt").is_file():
        extra = torch.load(directory / "merge.pt", weights_only=False)
        merge, names = extra["merge_outputs"], extra["output_names"]
    record_file = directory / "repair.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    return SavedRepair(graph, config, plan, sim, merge, names, record)


def load(path: str | Path) -> fx.GraphModule | SavedRepair:
    """A graph written by :func:`save`, with its metadata and shapes restored (in eval mode); or, for a folder
    written by ``RepairResult.save``, the repaired model (:class:`SavedRepair`)."""
    from .passes.common import refresh_shapes

    path = Path(path)
    if path.is_dir():
        return _load_repair(path)
    if not path.is_file():
        raise QSurgeryError(f"no saved graph at {path}")
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise QSurgeryError(f"{path} was not written by qsurgery.save")
    gm = data["graph"]
    gm.meta.update(data["meta"])
    new_nodes = list(gm.graph.nodes)
    if len(new_nodes) == len(data["nodes"]) and all(
            n.op == op for n, (op, _t, _m) in zip(new_nodes, data["nodes"])):
        for n, (_op, _t, meta) in zip(new_nodes, data["nodes"]):
            n.meta.update(meta)
    refresh_shapes(gm)
    return gm.eval()
