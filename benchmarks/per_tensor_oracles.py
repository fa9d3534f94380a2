"""How close per-tensor weights with 16-bit layers can come to float on the real EfficientNet-Lite0, and where the
loss that the engine leaves sits: variants of the per-tensor-int16 repair outside the engine's search.

Each variant runs equalization, bias correction, learned rounding and MSE activation ranges (the steps the
engine keeps on ``per-tensor-int16``), changing one thing: MSE weight scales, high-bias absorption, or
depthwise convs in int16 chosen *before* the fitted steps (every one, or those that fit within 5 % of the
MACs). KL and top-1 on the engine's selection images (the signal it decides on) and on report images.

    python benchmarks/per_tensor_oracles.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.cost import plan_cost
from qsurgery.evaluate import agreement, kl_divergence, top1
from qsurgery.passes import absorb_high_bias, bias_correction, equalize, learned_rounding

# depthwise convs whose MACs sum to 4.0 % of EfficientNet-Lite0's (blocks.0.0, 1.1, 2.1, 4.1, 4.2 left out)
DW_WITHIN_5 = ["blocks.1.0.conv_dw", "blocks.2.0.conv_dw", "blocks.3.*.conv_dw", "blocks.4.0.conv_dw",
               "blocks.5.*.conv_dw", "blocks.6.0.conv_dw"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--select", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    d = load_lite0(args.data, 64, 32)
    sel, rep = (d.xe[:args.select], d.ye[:args.select]), (d.xe[args.select:], d.ye[args.select:])
    target = qsurgery.get_target("per-tensor-int16")
    with torch.no_grad():
        f_sel, f_rep = d.graph(sel[0]), d.graph(rep[0])
    base_cost = plan_cost(d.graph, qsurgery.quantize(d.graph, d.calib, target.config(), progress=False)[1],
                          target).total
    eq = equalize(d.graph).graph

    def widened(patterns):
        cfg = target.config()
        for p in patterns:
            cfg = cfg.override(p, weight_bits=16, act_bits=16)
        return cfg

    plain = target.config()
    variants = [("engine's steps", eq, plain),
                ("MSE weight scales", eq, replace(plain, weight=replace(plain.weight, observer="mse"))),
                ("high-bias absorption", absorb_high_bias(eq, d.calib).graph, plain),
                ("depthwise convs int16, within 5 % of MACs", eq, widened(DW_WITHIN_5)),
                ("every depthwise conv int16", eq, widened(["blocks.*.conv_dw"]))]
    print(f"# EfficientNet-Lite0 on per-tensor-int16: 64 calibration / {len(sel[0])} selection / {len(rep[0])} report "
          f"images (1 report image = {100 / len(rep[0]):.2f} pt); float top-1 on the report "
          f"{100 * top1(f_rep, rep[1]):.2f}\n")
    print("| variant | KL selection | top-1 selection | KL report | top-1 drop report | agreement report | "
          "MACs int8 | cost | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, graph, cfg in variants:
        t = time.perf_counter()
        g = bias_correction(graph, d.calib, cfg).graph
        g = learned_rounding(g, d.calib, cfg, reference=graph, progress=False).graph
        cfg = replace(cfg, activation=replace(cfg.activation, observer="mse"))
        sim, plan = qsurgery.quantize(g, d.calib, cfg, progress=False)
        cost = plan_cost(g, plan, target)
        with torch.no_grad():
            o_sel, o_rep = sim(sel[0]), sim(rep[0])
        print(f"| {name} | {kl_divergence(f_sel, o_sel):.5f} | {100 * top1(o_sel, sel[1]):.2f} | "
              f"{kl_divergence(f_rep, o_rep):.5f} | {100 * (top1(f_rep, rep[1]) - top1(o_rep, rep[1])):.2f} | "
              f"{100 * agreement(f_rep, o_rep):.2f} | {100 * cost.macs_by_format.get('int8', 0) / cost.macs:.2f} % | "
              f"x{cost.total / base_cost:.3f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
