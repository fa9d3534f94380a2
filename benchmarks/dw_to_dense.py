"""Depthwise-separable units replaced by dense convs on the real EfficientNet-Lite0: float top-1, int8 top-1,
top-1 agreement with the original float model and MACs relative to the original, in one run.

    python benchmarks/dw_to_dense.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.passes import dw_to_dense

CONFIGS = [
    ("no change", []),
    ("blocks.0.0", ["blocks.0.0"]),
    ("first 2 units (blocks.0.0, blocks.1.0)", ["blocks.0.0", "blocks.1.0"]),
    ("first 4 units (blocks.0.0 .. blocks.2.0)", ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--finetune-steps", type=int, default=0)
    args = ap.parse_args()
    bs = args.batch_size
    d = load_lite0(args.data, args.calib, bs)
    graph, xc, xe, ye, calib = d.graph, d.xc, d.xe, d.ye, d.calib
    with torch.no_grad():
        ref = torch.cat([graph(xe[i:i + bs]) for i in range(0, len(xe), bs)])
    print(f"# EfficientNet-Lite0 (real weights): {len(xc)} calibration images (fit + int8 calibration), "
          f"{len(xe)} evaluation images; int8 = W8 per-channel / A8 min-max")
    print("| replaced | how | float top-1 | int8 top-1 | int8 agreement w/ float | float rel. error | MACs | pass s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    base_macs = None
    for name, blocks in CONFIGS:
        t = time.perf_counter()
        if blocks:
            result = dw_to_dense(graph, blocks, calib_data=calib, finetune_steps=args.finetune_steps)
            g, how, err = result.graph, ", ".join(sorted({c["how"] for c in result.changes})), result.float_error
        else:
            g, how, err = graph, "-", 0.0
            result = dw_to_dense(graph)
        secs = time.perf_counter() - t
        macs = result.cost_after["macs"] if blocks else result.cost_before["macs"]
        base_macs = base_macs or macs
        sim, _ = qsurgery.quantize(g, calib, progress=False)
        with torch.no_grad():
            f_out = torch.cat([g(xe[i:i + bs]) for i in range(0, len(xe), bs)])
            q_out = torch.cat([sim(xe[i:i + bs]) for i in range(0, len(xe), bs)])
        print(f"| {name} | {how} | {100 * qsurgery.top1(f_out, ye):.2f} | {100 * qsurgery.top1(q_out, ye):.2f} | "
              f"{100 * qsurgery.agreement(ref, q_out):.2f} | {err:.3g} | {100 * macs / base_macs:.1f} % | "
              f"{secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
