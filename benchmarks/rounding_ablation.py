"""Learned rounding, its design choices on the real EfficientNet-Lite0: the error measured after the clip that
follows a layer (``through_clip``) and steps taking turns on a pool of positions (``pool``), each alone and
together, and the layers of each block fitted together to the block's output (``blocks``), at W4
per-channel / A8 with MSE weight scales (first and last layer 8-bit).

These choices were made on the development images (the 200 images after the calibration ones, never the
report images of ``techniques.py``), so this script measures there: top-1, agreement and KL against float,
and the seconds of learned rounding.

    python benchmarks/rounding_ablation.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time

import torch
from _lite0 import load_lite0
from techniques import regimes

import qsurgery
from qsurgery.evaluate import kl_divergence
from qsurgery.passes import learned_rounding

VARIANTS = {"before (pool 1, no clip)": dict(pool=1, through_clip=False),
            "through the clip": dict(pool=1, through_clip=True),
            "pool of 8 steps": dict(pool=8, through_clip=False),
            "both (the default)": dict(pool=8, through_clip=True),
            "blocks": dict(pool=8, through_clip=True, blocks=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="image folder with labels.csv (imagenet-sample-dev)")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--dev", type=int, default=200, help="development images (after the calibration ones)")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--variants", nargs="*", choices=list(VARIANTS), help="default: all")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = load_lite0(args.data, args.calib, 32)
    x, y = d.xe[:args.dev], d.ye[:args.dev]

    def logits(m):
        with torch.no_grad():
            return torch.cat([m(x[i:i + 50]) for i in range(0, len(x), 50)])

    ref = logits(d.graph)
    name, cfg = regimes()[4]
    print(f"# EfficientNet-Lite0, {name}: {len(d.xc)} calibration / {len(x)} development images (1 image = "
          f"{100 / len(x):.2f} pt), float top-1 {100 * qsurgery.top1(ref, y):.2f} %, "
          f"{torch.get_num_threads()} CPU threads\n")
    print("| learned rounding | top-1 | agreement | KL | s |\n|---|---:|---:|---:|---:|")
    for label, kwargs in VARIANTS.items():
        if args.variants and label not in args.variants:
            continue
        t = time.perf_counter()
        g = learned_rounding(d.graph, d.calib, cfg, iters=args.iters, progress=False, **kwargs).graph
        secs = time.perf_counter() - t
        sim, _ = qsurgery.quantize(g, d.calib, cfg, progress=False)
        out = logits(sim)
        print(f"| {label} | {100 * qsurgery.top1(out, y):.2f} | {100 * qsurgery.agreement(ref, out):.2f} | "
              f"{kl_divergence(ref, out):.4f} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
