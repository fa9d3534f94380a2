"""Depthwise-separable units replaced by dense convs on the real EfficientNet-Lite0: float top-1, int8 top-1,
top-1 agreement and KL divergence against the original float model, and MACs relative to the original, in one
run.

Two reference rows bound what a replacement of ``blocks.0.0`` can recover: the unit kept float (what sensitivity
attributes to it) and only its depthwise conv kept float. The latter is a perfect replacement's best case: a
dense conv removes exactly the depthwise weights' and the intermediate activation's quantization, and keeps the
unit's output quantizer.

    python benchmarks/dw_to_dense.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.evaluate import kl_divergence
from qsurgery.passes import dw_to_dense

# (label, units replaced, per-layer overrides of the int8 config)
CONFIGS = [
    ("no change", [], {}),
    ("blocks.0.0 kept float (its sensitivity)", [],
     {"blocks.0.0.conv_dw": {"dtype": "float"}, "blocks.0.0.conv_pw": {"dtype": "float"}}),
    ("blocks.0.0.conv_dw kept float (best case of any replacement)", [], {"blocks.0.0.conv_dw": {"dtype": "float"}}),
    ("blocks.0.0.conv_dw weights 16-bit (where its error sits)", [], {"blocks.0.0.conv_dw": {"weight_bits": 16}}),
    ("blocks.0.0 replaced", ["blocks.0.0"], {}),
    ("first 2 units (blocks.0.0, blocks.1.0)", ["blocks.0.0", "blocks.1.0"], {}),
    ("first 4 units (blocks.0.0 .. blocks.2.0)", ["blocks.0.0", "blocks.1.0", "blocks.1.1", "blocks.2.0"], {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--per-tensor", action="store_true", help="per-tensor int8 weights (DPU-like devices)")
    args = ap.parse_args()
    bs = args.batch_size
    d = load_lite0(args.data, args.calib, bs)
    graph, xc, xe, ye, calib = d.graph, d.xc, d.xe, d.ye, d.calib
    with torch.no_grad():
        ref = torch.cat([graph(xe[i:i + bs]) for i in range(0, len(xe), bs)])
    dry = dw_to_dense(graph, calib_data=calib)
    unit = next(u for u in dry.changes if u["candidate"] == "blocks.0.0")
    print(f"# blocks.0.0: {unit['depthwise']} -> ReLU6 -> {unit['pointwise']}: {unit['live_channels']} of its "
          f"{unit['channels']} depthwise channels are live, and ReLU6 is not the identity on "
          f"{100 * unit['nonlinear_share']:.1f} % of their calibration positions: no linear dense conv "
          f"reproduces the unit")
    print(f"# EfficientNet-Lite0 (real weights): {len(xc)} calibration images (fit + int8 calibration), "
          f"{len(xe)} evaluation images; int8 = W8 {'per-tensor' if args.per_tensor else 'per-channel'} / A8 "
          f"min-max; agreement and KL against the "
          f"original float model")
    print("| model | how | float top-1 | int8 top-1 | int8 agreement | int8 KL | float rel. error | MACs | pass s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    base_macs = dry.cost_before["macs"]
    kl = {}
    for name, blocks, overrides in CONFIGS:
        t = time.perf_counter()
        config = qsurgery.QuantConfig.int8(per_channel=not args.per_tensor)
        for layer, change in overrides.items():
            config = config.override(layer, **change)
        if blocks:
            result = dw_to_dense(graph, blocks, calib_data=calib, finetune_steps=args.finetune_steps)
            g, how, err = result.graph, ", ".join(sorted({c["how"] for c in result.changes})), result.float_error
            macs = result.cost_after["macs"]
        else:
            g, how, err, macs = graph, "precision" if overrides else "-", 0.0, base_macs
        secs = time.perf_counter() - t
        sim, _ = qsurgery.quantize(g, calib, config, progress=False)
        with torch.no_grad():
            f_out = torch.cat([g(xe[i:i + bs]) for i in range(0, len(xe), bs)])
            q_out = torch.cat([sim(xe[i:i + bs]) for i in range(0, len(xe), bs)])
        kl[name] = kl_divergence(ref, q_out)
        print(f"| {name} | {how} | {100 * qsurgery.top1(f_out, ye):.2f} | {100 * qsurgery.top1(q_out, ye):.2f} | "
              f"{100 * qsurgery.agreement(ref, q_out):.2f} | {kl[name]:.4f} | {err:.3g} | "
              f"{100 * macs / base_macs:.1f} % | {secs:.1f} |", flush=True)
    names = [c[0] for c in CONFIGS]
    attributed = kl[names[0]] - kl[names[1]]
    for name in (names[2], names[4]):
        print(f"{name}: recovers {100 * (kl[names[0]] - kl[name]) / attributed:.0f} % of the int8 KL that "
              f"sensitivity attributes to blocks.0.0 ({kl[names[0]]:.4f} -> {kl[name]:.4f}; unit float "
              f"{kl[names[1]]:.4f})")


if __name__ == "__main__":
    main()
