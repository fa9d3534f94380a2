"""Techniques for strict devices on the real EfficientNet-Lite0: equalization (with high-bias absorption), bias
correction, learned rounding, quantization-aware distillation.

For each regime (W8 per-channel / A8, W8 per-tensor / A8, power-of-two per-tensor W8/A8, W4 per-channel / A8
with the first and last layer 8-bit) and each combination of techniques: top-1, drop, agreement and KL
against float on the report images, and the technique's wall time. Every layer stays in the regime's
integer format. Images: a seeded split of the folder into 64 calibration images and the rest; the first
200 of the rest were used while building the techniques (``--dev``), the others report (never used to
choose anything).

    python benchmarks/techniques.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery import QuantConfig
from qsurgery.evaluate import kl_divergence
from qsurgery.passes import absorb_high_bias, bias_correction, distill_quantized, equalize, learned_rounding


def regimes() -> list[tuple[str, QuantConfig]]:
    w4 = QuantConfig.int8()
    w4 = replace(w4, weight=replace(w4.weight, bits=4), name="w4a8")
    w4 = w4.override("conv_stem", weight_bits=8).override("classifier", weight_bits=8)
    w4_mse = replace(w4, weight=replace(w4.weight, observer="mse"))
    return [("W8 per-channel / A8", QuantConfig.int8()),
            ("W8 per-tensor / A8", QuantConfig.int8(per_channel=False)),
            ("pow2 per-tensor W8/A8", QuantConfig.pow2_int8()),
            ("W4 per-channel / A8 (first, last 8-bit)", w4),
            ("W4 per-channel / A8, MSE weight scales (first, last 8-bit)", w4_mse),
            ("W4 per-channel / A8, MSE weight scales, depthwise convs 8-bit (first, last 8-bit)",
             w4_mse.override("*conv_dw", weight_bits=8))]


ROWS = ["plain", "+equalization", "+equalization +absorption", "+bias correction", "+both", "+learned rounding",
        "+all", "+all +absorption", "+distillation", "+all +distillation"]


def _print_weight_share(sim, plan) -> None:
    """How many weights each weight width holds (the memory a regime's exceptions cost)."""
    counts: dict[int, int] = {}
    for layer in plan:
        w = sim.weights(layer.name)
        if w is not None and layer.weight is not None:
            counts[layer.weight.bits] = counts.get(layer.weight.bits, 0) + w[0].numel()
    total = sum(counts.values())
    print("<!-- weights: " + ", ".join(f"{100 * n / total:.2f} % at {b} bits" for b, n in sorted(counts.items()))
          + " -->", flush=True)


def _cached(cache: dict, key: str, make) -> tuple[torch.fx.GraphModule, float]:
    """A step shared by several rows, made once: (graph, seconds it took)."""
    if key not in cache:
        t0 = time.perf_counter()
        cache[key] = (make(), time.perf_counter() - t0)
    return cache[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="image folder with labels.csv (imagenet-sample-dev)")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--dev", type=int, default=200, help="images of the rest kept out of the report")
    ap.add_argument("--calib-dev", action="store_true",
                    help="calibrate (and fit rounding, distil) on the dev images too; the report images stay the same")
    ap.add_argument("--fit-on-report", action="store_true",
                    help="an upper bound, not a result: calibrate and fit on the report images themselves (how far "
                         "the techniques get when the images they fit are the images measured)")
    ap.add_argument("--iters", type=int, default=300, help="learned rounding steps per layer")
    ap.add_argument("--lr-pool", type=int, default=8, help="learned rounding: steps' worth of positions in its pool")
    ap.add_argument("--lr-blocks", action="store_true",
                    help="learned rounding: the layers of each block fitted together to the block's output")
    ap.add_argument("--lr-no-clip", action="store_true",
                    help="learned rounding: the error before the clip that follows a layer (the earlier design)")
    ap.add_argument("--distill-steps", type=int, default=200, help="distillation steps")
    ap.add_argument("--distill-lr", type=float, default=3e-5, help="distillation learning rate")
    ap.add_argument("--mix", type=float, default=0.0, help="distillation: blend share (0: none)")
    ap.add_argument("--regimes", nargs="*", type=int, help="indices of the regimes to run (default all)")
    ap.add_argument("--rows", nargs="*", help="rows to run (default all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (TF32 off, so figures match the CPU's)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    d = load_lite0(args.data, args.calib, 32)
    d.graph.to(args.device)
    d.calib = [b.to(args.device) for b in d.calib]
    xr, yr = d.xe[args.dev:].to(args.device), d.ye[args.dev:].to(args.device)
    if args.calib_dev:
        d.xc = torch.cat([d.xc, d.xe[:args.dev]])
        d.calib = [d.xc[i:i + 32].to(args.device) for i in range(0, len(d.xc), 32)]
    if args.fit_on_report:
        d.xc = xr.cpu()
        d.calib = [xr[i:i + 32] for i in range(0, len(xr), 32)]

    def logits(m):
        with torch.no_grad():
            return torch.cat([m(xr[i:i + 50]) for i in range(0, len(xr), 50)])

    ref = logits(d.graph)
    f_top1 = 100 * qsurgery.top1(ref, yr)
    where = f"{torch.get_num_threads()} CPU threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"# EfficientNet-Lite0, {len(d.xc)} calibration / {len(xr)} report images (1 image = "
          f"{100 / len(xr):.2f} pt); float top-1 {f_top1:.2f} %, on {where}"
          + ("; UPPER BOUND: calibrated and fitted on the report images themselves" if args.fit_on_report else "")
          + "\n")
    print("| regime | techniques | top-1 | drop (pt) | agreement | KL | technique s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    chosen = [r for i, r in enumerate(regimes()) if args.regimes is None or i in args.regimes]
    for name, cfg in chosen:
        cache: dict[str, tuple[torch.fx.GraphModule, float]] = {}  # shared steps and the seconds they took
        for row in ROWS:
            if args.rows and row not in args.rows:
                continue
            t = time.perf_counter()
            g, secs = d.graph, 0.0  # secs: the row's technique time, shared steps counted in every row using them
            full = row in ("+all", "+all +distillation", "+all +absorption")
            if row in ("+equalization", "+both", "+equalization +absorption") or full:
                g, secs = _cached(cache, "eq", lambda: equalize(d.graph).graph)
            absorbed = "+absorption" in row
            if absorbed:  # high-bias absorption: the floors measured on the calibration images
                g, s_abs = _cached(cache, "eq+abs", lambda g=g: absorb_high_bias(g, d.calib).graph)
                secs += s_abs
            if full:
                g, s_lr = _cached(cache, "eq+abs+lr" if absorbed else "eq+lr", lambda g=g, cfg=cfg: learned_rounding(
                    g, d.calib, cfg, iters=args.iters, pool=args.lr_pool, through_clip=not args.lr_no_clip,
                    blocks=args.lr_blocks, progress=False).graph)
                secs += s_lr
            t = time.perf_counter()
            if row == "+learned rounding":
                g = learned_rounding(d.graph, d.calib, cfg, iters=args.iters, pool=args.lr_pool,
                                     through_clip=not args.lr_no_clip, blocks=args.lr_blocks,
                                     progress=False).graph
            if row in ("+bias correction", "+both") or full:
                g = bias_correction(g, d.calib, cfg).graph
            if row in ("+distillation", "+all +distillation"):
                g = distill_quantized(g, d.calib, cfg, steps=args.distill_steps, lr=args.distill_lr, mix=args.mix,
                                      reference=d.graph, seed=0, progress=False).graph
            secs += time.perf_counter() - t
            sim, plan = qsurgery.quantize(g, d.calib, cfg, progress=False)
            if row == next(r for r in ROWS if not args.rows or r in args.rows):
                _print_weight_share(sim, plan)
            bad = [layer.name for layer in plan if not (layer.weight is None or layer.weight.is_int)]
            assert not bad, f"layers left the integer format: {bad}"
            out = logits(sim)
            t1 = 100 * qsurgery.top1(out, yr)
            print(f"| {name} | {row} | {t1:.2f} | {f_top1 - t1:.2f} | {100 * qsurgery.agreement(ref, out):.2f} | "
                  f"{kl_divergence(ref, out):.4f} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
