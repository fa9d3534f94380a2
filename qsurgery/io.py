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
_SIM_FORMAT = "qsurgery-simulated-1"


def save(obj: Any, path: str | Path) -> Path:
    """Write what qsurgery made to ``path``: a graph (from ``capture`` or a pass, with everything qsurgery keeps
    beside it), a simulated model (``quantize``'s first result) or a ``QuantPlan`` (JSON). ``RepairResult``
    has its own ``save(folder)``; :func:`load` reads all of them back."""
    from .quant.plan import QuantPlan
    from .quant.simulate import SimulatedModel

    path = Path(path)
    if isinstance(obj, QuantPlan):
        obj.to_json(path)
        return path
    if isinstance(obj, SimulatedModel):
        torch.save({"format": _SIM_FORMAT, "simulated": obj}, path)
        return path
    if hasattr(obj, "save") and hasattr(obj, "trials"):
        raise QSurgeryError("a RepairResult is saved to a folder: result.save(folder), read by qsurgery.load(folder)")
    graph = obj
    if not isinstance(graph, fx.GraphModule):
        raise QSurgeryError(f"qsurgery.save takes a captured graph, a simulated model or a QuantPlan, got "
                            f"{type(graph).__name__}")
    torch.save(pack_graph(graph), path)
    return path


def pack_graph(graph: fx.GraphModule) -> dict:
    """A graph with what qsurgery keeps beside its code, as one picklable dict (what ``save`` writes and what
    is shipped to Ray workers); :func:`unpack_graph` rebuilds it."""
    nodes = [(n.op, str(n.target), {k: v for k, v in n.meta.items() if k == "nn_module_stack"})
             for n in graph.graph.nodes]
    return {"format": _FORMAT, "graph": graph, "meta": dict(graph.meta), "nodes": nodes}


def unpack_graph(data: dict) -> fx.GraphModule:
    """The graph ``pack_graph`` packed: metadata and shapes restored, in eval mode."""
    from .passes.common import refresh_shapes

    gm = data["graph"]
    gm.meta.update(data["meta"])
    new_nodes = list(gm.graph.nodes)
    if len(new_nodes) == len(data["nodes"]) and all(
            n.op == op for n, (op, _t, _m) in zip(new_nodes, data["nodes"])):
        for n, (_op, _t, meta) in zip(new_nodes, data["nodes"]):
            n.meta.update(meta)
    refresh_shapes(gm)
    return gm.eval()


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


def load(path: str | Path) -> Any:
    """What :func:`save` wrote: a graph (metadata and shapes restored, in eval mode), a simulated model or a
    ``QuantPlan`` (a ``.json`` file); for a folder written by ``RepairResult.save``, the repaired model
    (:class:`SavedRepair`). Each gives the same outputs as before saving."""

    path = Path(path)
    if path.is_dir():
        return _load_repair(path)
    if not path.is_file():
        raise QSurgeryError(f"nothing saved at {path}")
    if path.suffix == ".json":
        from .quant.plan import QuantPlan

        return QuantPlan.from_json(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise QSurgeryError(f"{path} cannot be read as a qsurgery file: {exc}") from exc
    if isinstance(data, dict) and data.get("format") == _SIM_FORMAT:
        return data["simulated"].eval()
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise QSurgeryError(f"{path} was not written by qsurgery.save")
    return unpack_graph(data)
