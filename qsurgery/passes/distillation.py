"""Quantization-aware distillation: a short fine-tuning of the weights through the quantization simulation,
against the float model's own outputs on calibration images (no labels).

The remedy of last resort for strict devices: when equalization, bias correction and learned rounding leave a
loss (4-bit weights, per-tensor scales), the weights are trained so that the *quantized* model reproduces the
float model. Weights are fake-quantized on fixed grids (the scales the plain quantization chose, or those
pinned by learned rounding) with a straight-through gradient, activations on the ranges calibrated before
training; biases train in float (a device adds them in int32). The result pins the weight grids in the graph
(``WEIGHT_SCALES``), so the simulation, the integer twin and the QDQ export round the trained weights on
exactly the grids they were trained for. Approximate: the float model's own outputs change.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..errors import CalibrationError, ConfigError
from ..graph import WEIGHT_SCALES, device_of
from ..quant.config import QuantConfig
from ..quant.observers import fake_quant
from ..quant.simulate import graph_inputs, quantize
from .common import PassResult, folded_copy, graph_cost, output_loss

__all__ = ["distill_quantized"]


def distill_quantized(graph: fx.GraphModule, calib_data: Any, config: QuantConfig | None = None, *,
                      steps: int = 200, lr: float = 3e-5, batch_size: int = 8, flips: bool = True, mix: float = 0.0,
                      reference: fx.GraphModule | None = None, seed: int = 0, progress: bool = True) -> PassResult:
    """A BN-folded copy of ``graph`` whose weights were trained so that its quantization under ``config``
    matches the float model's outputs on ``calib_data`` (KL for class scores, mean squared error otherwise).

    ``steps`` Adam steps of ``batch_size`` images drawn (seeded) from the calibration images, ``lr`` decayed on
    a cosine; ``flips``: each drawn image is mirrored left-right with probability 1/2; ``mix``: each drawn image
    is blended with another one by a share drawn uniformly from [0, ``mix``] (0: none). Both give more views of
    few images, and the float teacher sees the same view. ``reference``: the float model to match (default
    ``graph``; give the graph before an approximate change such as learned rounding). ``float_error``: the
    quantized model's distillation loss on the calibration images after / before; a run that does not lower it
    returns the weights unchanged (the notes say so)."""
    if steps < 1 or batch_size < 1 or not lr > 0 or not 0 <= mix <= 1:
        raise ConfigError(f"steps and batch_size must be >= 1, lr > 0 and mix in [0, 1], got {steps}, {batch_size}, "
                          f"{lr}, {mix}")
    config = config or QuantConfig.int8()
    gm = folded_copy(graph)
    teacher = folded_copy(reference) if reference is not None else copy.deepcopy(gm)
    teacher.eval()
    batches = list(graph_inputs(gm, calib_data, what="distillation"))
    inputs = tuple(torch.cat([b[i] for b in batches]) for i in range(len(batches[0])))
    n = len(inputs[0])
    if n < 2:
        raise CalibrationError(f"distillation needs at least 2 calibration images, got {n}")
    sim, plan = quantize(gm, batches, config, progress=False)
    net = sim.graph_module
    # what trains: every weighted layer's float weights (through its fixed grid) and its bias
    grids: dict[str, tuple[Any, torch.Tensor | None, int | None]] = {}
    masters: dict[str, nn.Parameter] = {}
    biases: dict[str, nn.Parameter] = {}
    for layer in plan:
        if layer.module is None or layer.weight is None or layer.module in masters or sim.weights(layer.name) is None:
            continue
        module = net.get_submodule(layer.module)
        masters[layer.module] = nn.Parameter(sim.weights(layer.name)[0].detach().clone())
        scale = layer.weight_scale if layer.weight.is_int else None
        axis = (1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)) else 0) \
            if layer.weight.is_int and layer.weight.per_channel else None
        grids[layer.module] = (layer.weight, scale, axis)
        if getattr(module, "bias", None) is not None:
            biases[layer.module] = nn.Parameter(module.bias.detach().clone())
    if not masters:
        raise ConfigError("distillation: the graph has no weighted layer to train")
    device = device_of(gm)
    start = {path: w.detach().clone() for path, w in masters.items()}

    def weights() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path, w in masters.items():
            fmt, scale, axis = grids[path]
            if scale is None:
                out[f"{path}.weight"] = w
            else:
                s = scale.to(w.device)
                out[f"{path}.weight"] = fake_quant(w, s if axis is not None else s.reshape(()),
                                                   torch.zeros(s.shape, dtype=torch.int32, device=w.device), fmt, axis)
        out.update({f"{path}.bias": b for path, b in biases.items()})
        return out

    def pool_loss() -> float:
        total = 0.0
        with torch.no_grad():
            params = weights()
            for i in range(0, n, 32):
                x = tuple(t[i:i + 32].to(device) for t in inputs)
                total += float(output_loss(functional_call(net, params, x), teacher(*x))) * len(x[0])
        return total / n

    before = pool_loss()
    gen = torch.Generator().manual_seed(seed)
    params = list(masters.values()) + list(biases.values())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    bar = tqdm(range(steps), desc="distillation", unit="step", disable=not progress, leave=False)
    for _ in bar:
        pick = torch.randperm(n, generator=gen)[:batch_size]
        x = [t[pick] for t in inputs]
        if flips:
            mirror = torch.rand(len(pick), generator=gen) < 0.5
            x = [torch.where(mirror.reshape(-1, *[1] * (t.dim() - 1)), t.flip(-1), t) if t.dim() == 4 else t
                 for t in x]
        if mix > 0:
            other = torch.randperm(n, generator=gen)[:len(pick)]
            share = mix * torch.rand(len(pick), generator=gen)
            x = [(1 - share.reshape(-1, *[1] * (t.dim() - 1))) * t + share.reshape(-1, *[1] * (t.dim() - 1))
                 * inputs[i][other] for i, t in enumerate(x)]
        x = tuple(t.to(device) for t in x)
        with torch.no_grad():
            ref = teacher(*x)
        loss = output_loss(functional_call(net, weights(), x), ref)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix_str(f"loss {float(loss.detach()):.4g}")
    bar.close()
    after = pool_loss()
    result = PassResult(gm, exact=False, cost_before=graph_cost(graph), cost_after=graph_cost(gm))
    if not after < before:
        result.float_error = 1.0
        result.notes.append(f"distillation did not lower the loss on the calibration images ({before:.4g} -> "
                            f"{after:.4g}): weights kept")
        return result
    pins = dict(gm.meta.get(WEIGHT_SCALES, {}))
    with torch.no_grad():
        for path, w in masters.items():
            target = gm.get_submodule(path)
            target.weight.copy_(w.detach())
            if path in biases:
                target.bias.copy_(biases[path].detach())
            fmt, scale, _axis = grids[path]
            if scale is not None:
                pins[path] = (fmt.to_dict(), scale.detach().cpu().clone())
            moved = (w.detach() - start[path]).norm() / start[path].norm().clamp(min=1e-12)
            result.changes.append({"layer": path, "relative_weight_change": float(moved)})
    gm.meta[WEIGHT_SCALES] = pins
    result.float_error = after / max(before, 1e-12)
    result.notes.append(f"{len(masters)} layer(s) trained through {config.describe()} for {steps} steps of "
                        f"{batch_size} image(s) from {n} (lr {lr:g}, seed {seed}); quantized-model loss on the "
                        f"calibration images {before:.4g} -> {after:.4g}")
    return result
