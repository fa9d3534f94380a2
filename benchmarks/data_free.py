"""Why data-free calibration of the real EfficientNet-Lite0 holds or fails on unseen photos: count, steps, seed.

Images distilled from the model's BatchNorm statistics (`qsurgery.data.distill_images`): 40 optimisation steps
per batch (the default) with seeds 0 and 1, and 100 steps with seed 0. W8 per-channel / A8 per-tensor min-max
calibrated on the first 64 or all 128 of them, against 64 and 128 real photos. For each: int8 top-1 and
agreement with float on the 372 held-out photos (1 image = 0.27 pt), KL from float, and the layers whose
activation ranges differ most from the 128-real-photo ranges (ratio of range widths); also the percentile
observer on distilled images, and the classifier kept float (the distilled images' logits are smaller).

    python benchmarks/data_free.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
from _lite0 import load_lite0
from calibration import batches

import qsurgery
from qsurgery.data import distill_images
from qsurgery.evaluate import agreement, kl_divergence, top1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/imagenet-sample-dev")
    ap.add_argument("--runs", nargs="*", default=["40:0", "40:1", "100:0"],
                    help="distillations as STEPS:SEED (128 images each; 40 steps take ~8 min on 2 cores)")
    ap.add_argument("--cache-dir", default=None, help="reuse distilled images (default: none, timed fresh)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    s = load_lite0(args.data, 128, 32)
    graph, xe, ye = s.graph, s.xe, s.ye
    with torch.no_grad():
        ref = torch.cat([graph(b) for b in batches(xe)])
    float_top1 = 100 * top1(ref, ye)
    print(f"# data-free calibration, real EfficientNet-Lite0; {len(xe)} held-out photos (1 image = "
          f"{100 / len(xe):.2f} pt), float top-1 {float_top1:.2f} %", flush=True)

    def measure(x: torch.Tensor, observer: str = "minmax", keep_float: str | None = None):
        config = qsurgery.QuantConfig.int8(observer=observer)
        if keep_float:
            config = config.override(keep_float, dtype="float")
        sim, plan = qsurgery.quantize(graph, batches(x), config, progress=False)
        with torch.no_grad():
            out = torch.cat([sim(b) for b in batches(xe)])
        acc, agree, kl = 100 * top1(out, ye), 100 * agreement(ref, out), kl_divergence(ref, out)
        widths = {layer.name: layer.clip[1] - layer.clip[0] for layer in plan if layer.clip is not None}
        return acc, agree, kl, widths

    header = ("| calibration set | int8 top-1 | drop | agreement | KL | range width vs 128 real: median, most "
              "different layers |\n|---|---:|---:|---:|---:|---|")
    base_widths: dict[str, float] = {}

    def row(name: str, x: torch.Tensor, observer: str = "minmax", keep_float: str | None = None) -> None:
        acc, agree, kl, widths = measure(x, observer, keep_float)
        if not base_widths:
            base_widths.update(widths)
        ratios = {k: widths[k] / base_widths[k] for k in widths if base_widths.get(k, 0) > 0}
        ordered = sorted(ratios.items(), key=lambda kv: -abs(math.log(kv[1])) if kv[1] > 0 else -math.inf)
        med = statistics.median(ratios.values())
        worst = ", ".join(f"{k} x{v:.2f}" for k, v in ordered[:3])
        print(f"| {name} | {acc:.2f} | {float_top1 - acc:+.2f} | {agree:.2f} | {kl:.4f} | x{med:.2f}; {worst} |",
              flush=True)

    print(header, flush=True)
    row("128 real", s.xc)
    row("64 real", s.xc[:64])
    for run in args.runs:
        steps, seed = (int(v) for v in run.split(":"))
        t = time.perf_counter()
        imgs = distill_images(s.model, 128, size=224, steps=steps, batch_size=32, seed=seed,
                              cache_dir=args.cache_dir, progress=False)
        print(f"<!-- distilled 128 images, {steps} steps, seed {seed}: {time.perf_counter() - t:.0f} s; pixels "
              f"{imgs.min().item():.2f}..{imgs.max().item():.2f} -->", flush=True)
        with torch.no_grad():
            top = torch.cat([graph(b) for b in batches(imgs[:64])]).max().item()
        print(f"<!-- largest logit: {top:.1f} on the first 64 distilled images, {ref.max().item():.1f} on the "
              "photos -->", flush=True)
        for n in (64, 128):
            row(f"{n} distilled, {steps} steps, seed {seed}", imgs[:n])
        row(f"64 distilled, {steps} steps, seed {seed}, classifier kept float", imgs[:64], keep_float="classifier")
        row(f"128 distilled, {steps} steps, seed {seed}, percentile ranges", imgs, "percentile")


if __name__ == "__main__":
    main()
