"""Save and load what qsurgery makes: captured or rewritten graphs (``qsurgery.save`` / ``qsurgery.load``).

A ``GraphModule`` pickles by its generated code and re-traces on load, which drops what qsurgery keeps
beside the code (the captured input shapes, range limits, pinned weight scales, the module scope of each
node that names function units). ``save`` stores those too and ``load`` puts them back, so a reloaded graph
quantizes to the same units and the same outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx

from .errors import QSurgeryError

__all__ = ["save", "load"]

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


def load(path: str | Path) -> fx.GraphModule:
    """A graph written by :func:`save`, with its metadata and shapes restored (in eval mode)."""
    from .passes.common import refresh_shapes

    path = Path(path)
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
