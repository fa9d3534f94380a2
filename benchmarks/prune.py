"""Channel pruning of the real EfficientNet-Lite0 at the MACs of 10/20/30 % of every coupled channel cluster.

For each amount: MACs and parameters, float and int8 (W8 per-channel / A8 min-max) top-1 on 400 held-out
images: uniform allocation (the same share of every cluster) without data and with bias compensation from the
100 calibration images; sensitivity allocation (the same MACs budget spent where pruning one cluster alone
moves the output least, measured on 64 calibration images) with compensation, and with the built-in recovery
on top (`qsurgery.passes.distill` against the unpruned model on the calibration images, `--recover-steps` Adam steps of
batch 25, lr 1e-4); the time of each on this CPU.

    python benchmarks/prune.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.passes import distill, prune_channels, pruning_sensitivity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/imagenet-sample-dev")
    ap.add_argument("--amounts", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--recover-steps", type=int, default=40)
    ap.add_argument("--criterion", default="l1")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    s = load_lite0(args.data, 100, 25)
    graph, xe, ye = s.graph, s.xe, s.ye

    def top1(model) -> float:
        with torch.no_grad():
            out = torch.cat([model(xe[i:i + 50]) for i in range(0, len(xe), 50)])
        return 100 * (out.argmax(1) == ye).float().mean().item()

    def int8(g) -> float:
        sim, _ = qsurgery.quantize(g, s.calib, qsurgery.QuantConfig.int8(), progress=False)
        return top1(sim)

    print(f"{len(s.xc)} calibration / {len(xe)} evaluation images; criterion {args.criterion}", flush=True)
    rows = [("original", 0.0, graph, 0.0)]
    t = time.perf_counter()
    measured = pruning_sensitivity(graph, s.calib, criterion=args.criterion, images=64, progress=False)
    t_sens = time.perf_counter() - t
    print(f"pruning_sensitivity: {len(measured.clusters)} clusters, {t_sens:.0f} s (shared by every amount)",
          flush=True)
    print(measured.to_markdown(), flush=True)
    for amount in args.amounts:
        variants = [
            ("uniform", dict(allocation="uniform")),
            ("uniform + bias compensation", dict(allocation="uniform", calib_data=s.calib)),
            ("sensitivity + compensation", dict(sensitivity=measured, calib_data=s.calib)),
        ]
        for name, kwargs in variants:
            t = time.perf_counter()
            result = prune_channels(graph, amount=amount, criterion=args.criterion, progress=False, **kwargs)
            dt = time.perf_counter() - t
            rows.append((f"{int(100 * amount)} %, {name}", amount, result.graph, dt))
            print(f"pruned {amount:.0%} {name}: {dt:.0f} s", flush=True)
        t = time.perf_counter()
        tuned = distill(result.graph, graph, s.calib, steps=args.recover_steps, lr=1e-4)
        dt = time.perf_counter() - t
        rows.append((f"{int(100 * amount)} %, sensitivity + compensation + KD {args.recover_steps} steps", amount,
                     tuned, dt))
        print(f"distilled {args.recover_steps} steps: {dt:.0f} s", flush=True)
    base = qsurgery.passes.graph_cost(graph)
    print("\n| model | MACs (M) | params (M) | MACs vs original | float top-1 | int8 top-1 | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, _amount, g, t in rows:
        c = qsurgery.passes.graph_cost(g)
        print(f"| {name} | {c['macs'] / 1e6:.1f} | {c['params'] / 1e6:.2f} | {100 * c['macs'] / base['macs']:.0f} % | "
              f"{top1(g):.2f} | {int8(g):.2f} | {t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
