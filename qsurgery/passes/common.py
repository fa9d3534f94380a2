"""What every graph pass returns: the new graph, what changed, whether it is exact, and what it costs."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import CalibrationError
from ..graph import device_of, module_macs

__all__ = ["PassResult", "graph_cost", "refresh_shapes", "distill", "folded_copy", "output_loss"]


def refresh_shapes(gm: fx.GraphModule) -> None:
    """Re-run shape propagation on the captured example shape (new nodes need shapes for costs)."""
    shapes = gm.meta.get("qsurgery_input_shapes")
    if not shapes:
        return
    device = device_of(gm)
    with torch.no_grad():
        ShapeProp(gm).propagate(*[torch.zeros(s, device=device) for s in shapes])


def folded_copy(graph: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``graph`` with its metadata and its BatchNorms folded into the convs before them: the
    weights a device holds, which the techniques that rescale, round or correct weights work on."""
    from ..graph import fold_batchnorm

    gm = copy.deepcopy(graph)
    gm.meta.update(copy.deepcopy(dict(graph.meta)))
    fold_batchnorm(gm)
    return gm


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


def distill(student: fx.GraphModule, teacher: fx.GraphModule, calib_data: Any, *, steps: int = 50,
            lr: float = 1e-4, trainable: Sequence[str] | None = None) -> fx.GraphModule:
    """A trained copy of ``student`` after ``steps`` Adam steps of output distillation against ``teacher`` on
    ``calib_data`` (no labels): KL for logits, mean squared error for other outputs.

    The short recovery that approximate passes offer (pruning, reconstructed convs). ``trainable``: module
    names whose parameters train (default: all). Both models run in eval mode, so BatchNorm statistics stay
    what they were (a few batches would only make them noisier). ``student`` itself is not modified."""
    new = copy.deepcopy(student)
    new.meta.update(copy.deepcopy(dict(student.meta)))
    _distill_(new, teacher, calib_data, steps, lr, trainable)
    return new


def output_loss(out: Any, ref: Any) -> torch.Tensor:
    """How far a model's outputs are from the reference's: KL for class scores (2-d), mean squared error for
    other outputs (summed over the outputs of a multi-output model). The one distillation loss."""
    if isinstance(ref, torch.Tensor) and ref.dim() == 2:
        return F.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True, reduction="batchmean")
    ref_l = ref if isinstance(ref, (list, tuple)) else [ref]
    out_l = out if isinstance(out, (list, tuple)) else [out]
    return sum(F.mse_loss(o, r) for o, r in zip(out_l, ref_l))


def _distill_(student: fx.GraphModule, teacher: fx.GraphModule, calib_data: Any, steps: int, lr: float,
              trainable: Sequence[str] | None = None) -> None:
    from ..quant.simulate import graph_inputs

    device = device_of(student)
    batches = list(graph_inputs(teacher, calib_data, what="distillation")) if calib_data is not None else []
    if not batches:
        raise CalibrationError("distillation needs calib_data (input batches)")
    if trainable is None:
        params = list(student.parameters())
    else:
        missing = [n for n in trainable if n not in dict(student.named_modules())]
        if missing:
            raise CalibrationError(f"trainable module(s) {missing} are not in the student graph")
        params = [p for n in trainable for p in student.get_submodule(n).parameters()]
    flags = [p.requires_grad for p in student.parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    student.eval()
    teacher.eval()
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for step in range(steps):
            x = [t.to(device) for t in batches[step % len(batches)]]
            with torch.no_grad():
                ref = teacher(*x)
            loss = output_loss(student(*x), ref)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, flag in zip(student.parameters(), flags):
            p.requires_grad_(flag)
