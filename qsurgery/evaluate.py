"""Running models over data and the simplest comparisons: top-1 accuracy, float-vs-quantized agreement and the
KL divergence of the outputs (the soft signal that ranks changes where top-1 moves in coarse steps)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .graph import device_of

__all__ = ["predict", "top1", "agreement", "kl_divergence", "kl_per_image", "distance", "score", "take"]


@torch.no_grad()
def predict(model: nn.Module, data: Any, *, progress: bool = False, desc: str = "evaluating"
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``model`` over ``data`` (a tensor, or an iterable of tensors / (inputs, labels) batches).

    Returns the concatenated outputs (on the CPU; a model with several outputs gives a tuple, each output
    concatenated over the batches) and the labels if every batch carried them.
    """
    device = device_of(model)
    batches = [data] if isinstance(data, torch.Tensor) else data
    outputs, labels, all_labeled = [], [], True
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        if isinstance(batch, torch.Tensor):
            x, y = batch, None
        elif isinstance(batch, (tuple, list)) and len(batch) >= 1:
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            raise DataError(f"cannot read a batch of type {type(batch).__name__}")
        out = model(x.to(device))
        outputs.append(out.float().cpu() if isinstance(out, torch.Tensor) else tuple(o.float().cpu() for o in out))
        if y is None:
            all_labeled = False
        else:
            labels.append(torch.as_tensor(y).cpu())
    if not outputs:
        raise DataError("no data to evaluate")
    lab = torch.cat(labels) if all_labeled and labels else None
    if lab is not None and (lab < 0).any():
        lab = None
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs)), lab
    return torch.cat(outputs), lab


def top1(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose arg-max equals the label."""
    return (outputs.argmax(1) == labels).float().mean().item()


def agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of rows whose arg-max is the same in both outputs (label-free)."""
    return (reference.argmax(1) == other.argmax(1)).float().mean().item()


def kl_per_image(reference: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(out)) of each row of ``(N, classes)`` logits: ``(N,)``."""
    p = torch.log_softmax(reference.float(), 1)
    q = torch.log_softmax(out.float(), 1)
    return (p.exp() * (p - q)).sum(1)


def kl_divergence(reference: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over samples of KL(softmax(reference) || softmax(out)) for ``(N, classes)`` logits."""
    return float(kl_per_image(reference, out).mean())


def take(outputs: Any, index: Any) -> Any:
    """Rows ``index`` (a slice or an index tensor) of a model's outputs: a tensor, or a list/tuple of them."""
    if isinstance(outputs, torch.Tensor):
        return outputs[index]
    return type(outputs)(take(o, index) for o in outputs) if isinstance(outputs, (list, tuple)) else outputs


def distance(reference: Any, out: Any) -> float:
    """The one distance of outputs from float: KL of class scores (2-d), else the relative squared error summed
    over the outputs (a tuple of tensors for several outputs)."""
    if isinstance(reference, torch.Tensor) and reference.dim() == 2:
        return kl_divergence(reference, out)
    refs, outs = (reference, out) if isinstance(reference, (tuple, list)) else ((reference,), (out,))
    return float(sum((r - o).pow(2).mean() / r.pow(2).mean().clamp(min=1e-12) for r, o in zip(refs, outs)))


def score(out: torch.Tensor, labels: torch.Tensor | None, metric: str | Callable, reference: torch.Tensor | None
          ) -> float:
    """The one evaluator contract, in points (higher is better): ``"top1"`` (needs labels), ``"agreement"``
    with the float ``reference`` outputs, or ``metric(outputs, labels) -> points`` (e.g. mAP for detectors)."""
    if callable(metric):
        return float(metric(out, labels))
    if metric == "top1":
        if labels is None:
            raise ConfigError("metric 'top1' needs labeled evaluation data; use metric='agreement'")
        return 100 * (out.argmax(1) == labels).float().mean().item()
    if metric == "agreement":
        return 100 * (out.argmax(1) == reference.argmax(1)).float().mean().item()
    raise ConfigError(f"metric must be 'top1', 'agreement' or a callable(outputs, labels), not {metric!r}")
