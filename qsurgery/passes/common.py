"""What every graph pass returns: the new graph, what changed, whether it is exact, and what it costs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..graph import device_of, module_macs

__all__ = ["PassResult", "graph_cost", "refresh_shapes"]


def refresh_shapes(gm: fx.GraphModule) -> None:
    """Re-run shape propagation on the captured example shape (new nodes need shapes for costs)."""
    shapes = gm.meta.get("qsurgery_input_shapes")
    if not shapes:
        return
    device = device_of(gm)
    with torch.no_grad():
        ShapeProp(gm).propagate(*[torch.zeros(s, device=device) for s in shapes])


def graph_cost(gm: fx.GraphModule) -> dict[str, int]:
    """MACs per sample (conv/linear) and parameter count of a graph."""
    return {"macs": sum(module_macs(gm).values()), "params": sum(p.numel() for p in gm.parameters())}


@dataclass
class PassResult:
    """A pass's output graph and its record: ``changes`` (one dict per edit), ``exact`` (float-equivalent),
    ``cost_before``/``cost_after`` (MACs, params), and ``float_error`` where the pass measured one.

    Passes that change the model's outputs also give ``output_names`` (one per new output, for the ONNX
    export) and ``merge_outputs`` (new outputs -> the original ones, for existing post-processing)."""

    graph: fx.GraphModule
    changes: list[dict] = field(default_factory=list)
    exact: bool = True
    cost_before: dict[str, int] = field(default_factory=dict)
    cost_after: dict[str, int] = field(default_factory=dict)
    float_error: float | None = None
    notes: list[str] = field(default_factory=list)
    output_names: list[str] | None = None
    merge_outputs: Callable[[Sequence[torch.Tensor]], Any] | None = None

    @property
    def macs_ratio(self) -> float:
        return self.cost_after.get("macs", 0) / max(self.cost_before.get("macs", 1), 1)

    def summary(self) -> str:
        lines = [f"{len(self.changes)} change(s), {'exact' if self.exact else 'approximate'}; MACs "
                 f"{self.cost_before.get('macs', 0) / 1e6:.1f} M -> {self.cost_after.get('macs', 0) / 1e6:.1f} M "
                 f"({100 * (self.macs_ratio - 1):+.1f} %), params {self.cost_before.get('params', 0) / 1e6:.2f} M -> "
                 f"{self.cost_after.get('params', 0) / 1e6:.2f} M"]
        if self.float_error is not None:
            lines.append(f"float output error (relative, on calibration data): {self.float_error:.3g}")
        lines += [f"  {c}" for c in self.changes]
        lines += self.notes
        return "\n".join(lines)
