"""Bias correction: remove the mean output shift that quantizing each layer's weights introduces.

Rounding a layer's weights (worst under per-tensor, power-of-two or 4-bit grids) changes the mean of its
outputs by ``E[(W_q - W) x]``, and a mean shift passes through every following layer. The pass measures,
on calibration data and without labels, the mean input each weighted layer receives in the quantized model
(so the shifts of the layers before it are in it), computes the expected output shift of its quantized
weights from it, and subtracts that from the layer's bias (Nagel et al. 2019, empirical form). The correction
lives in the graph's biases, so the simulation, the integer twin and the QDQ export all carry it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import CalibrationError, ConfigError
from ..quant.config import QuantConfig
from ..quant.simulate import graph_inputs, quantize
from .common import PassResult, folded_copy, graph_cost

__all__ = ["bias_correction", "output_shift"]


def output_shift(module: nn.Module, mean_input: torch.Tensor, weight_error: torch.Tensor) -> torch.Tensor:
    """Per output channel, the mean change of ``module``'s output when its weight changes by ``weight_error``
    and its input has the (per position) mean ``mean_input`` (exact: the layer is linear in its input)."""
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            out = nn.functional.linear(mean_input, weight_error)
            return out.reshape(-1, out.shape[-1]).mean(0)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out = module._conv_forward(mean_input, weight_error, None)
            return out.transpose(0, 1).reshape(out.shape[1], -1).mean(1)
    raise ConfigError(f"bias correction does not know {type(module).__name__}")


def bias_correction(graph: fx.GraphModule, calib_data: Any, config: QuantConfig | None = None, *,
                    rounds: int = 1, progress: bool = False) -> PassResult:
    """A BN-folded copy of ``graph`` whose biases cancel the mean output shift of ``config``'s weight
    quantization, measured on ``calib_data`` (input batches, no labels needed).

    ``rounds`` > 1 measures again on the corrected model (the inputs' means move a little with each
    correction). Layers whose weights stay float need none and are left alone."""
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    config = config or QuantConfig.int8()
    gm = folded_copy(graph)
    batches = list(graph_inputs(gm, calib_data, what="bias-correction"))
    total: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for _ in range(rounds):
        sim, plan = quantize(gm, batches, config, progress=progress)
        sums: dict[str, list] = {}
        handles = []
        for layer in plan:
            pair = sim.weights(layer.name)
            if pair is None or layer.weight is None or not layer.weight.is_int:
                continue
            module = sim.graph_module.get_submodule(layer.module)
            if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                skipped[layer.name] = f"{type(module).__name__} is not corrected"
                continue
            sums[layer.name] = [None, 0]

            def hook(_m, inputs, _out, acc=sums[layer.name]):
                x = inputs[0].detach()
                s = x.sum(0, keepdim=True)
                acc[0] = s if acc[0] is None else acc[0] + s
                acc[1] += x.shape[0]

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                for b in batches:
                    sim(*b)
        finally:
            for h in handles:
                h.remove()
        for name, (s, n) in sums.items():
            if s is None or n == 0:
                skipped[name] = "not reached by the calibration data"
                continue
            w_float, w_quant = sim.weights(name)
            module_name = plan[name].module
            module = gm.get_submodule(module_name)
            shift = output_shift(module, s / n, (w_quant - w_float).to(s.dtype))
            if not torch.isfinite(shift).all():
                raise CalibrationError(f"bias correction of {name!r}: non-finite output shift")
            bias = module.bias.detach() if module.bias is not None else torch.zeros_like(shift)
            module.bias = nn.Parameter((bias - shift.to(bias.dtype)).clone())
            total[name] = total.get(name, torch.zeros_like(shift)) + shift
    result = PassResult(gm, exact=False, cost_before=graph_cost(graph), cost_after=graph_cost(gm))
    for name, shift in total.items():
        result.changes.append({"layer": name, "mean_abs_shift": float(shift.abs().mean()),
                               "max_abs_shift": float(shift.abs().max())})
    result.notes.append(f"biases of {len(total)} layer(s) corrected for {config.describe()} "
                        f"({rounds} round(s) on {sum(b[0].shape[0] for b in batches)} image(s))")
    result.notes += [f"  not corrected: {k}: {v}" for k, v in skipped.items()]
    return result
