"""Calibration sets for the real EfficientNet-Lite0 (W8 per-channel / A8 per-tensor min-max): real, distilled, noise.

int8 top-1 on the held-out images of the folder (the 372 not among the first 128 calibration candidates)
when calibrated on 8, 32 and 128 real images, 128 images distilled from the model's BatchNorm statistics
(`qsurgery.data.distill_images`, timed here) and 128 uniform-noise images, each with the coverage verdict of
`qsurgery.calibration_coverage` against 128 held-out images (labels not used for the verdict).

    python benchmarks/calibration.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.calibration import calibration_coverage
from qsurgery.data import distill_images


def batches(x: torch.Tensor, bs: int = 32) -> list[torch.Tensor]:
    return [x[i:i + bs] for i in range(0, len(x), bs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/imagenet-sample-dev")
    ap.add_argument("--steps", type=int, default=100, help="distillation steps per batch of 32")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "qsurgery"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    s = load_lite0(args.data, 128, 32)
    graph, xe, ye = s.graph, s.xe, s.ye
    config = qsurgery.QuantConfig.int8()
    with torch.no_grad():
        ref = torch.cat([graph(b) for b in batches(xe)])
    float_top1 = 100 * (ref.argmax(1) == ye).float().mean().item()
    print(f"{len(s.xc)} calibration candidates, {len(xe)} held-out images; float top-1 {float_top1:.2f} %", flush=True)

    t = time.perf_counter()
    distilled = distill_images(s.model, 128, size=224, steps=args.steps, batch_size=32, cache_dir=args.cache_dir)
    t_distill = time.perf_counter() - t
    print(f"distill_images: 128 images at 224x224, {args.steps} steps per batch of 32: {t_distill:.0f} s "
          f"({'from cache' if t_distill < 5 else 'computed'})", flush=True)
    mean = torch.tensor(s.model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(s.model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(128, 3, 224, 224, generator=g) - mean) / std  # uniform pixels, normalised like images
    sets = {"8 real": s.xc[:8], "32 real": s.xc[:32], "128 real": s.xc, "128 distilled": distilled,
            "128 uniform noise": noise}
    coverage_eval = batches(xe[:128])
    print("\n| calibration set | int8 top-1 (held-out) | drop vs float | agreement with float | coverage verdict |")
    print("|---|---:|---:|---:|---|")
    for name, x in sets.items():
        t = time.perf_counter()
        sim, _ = qsurgery.quantize(graph, batches(x, 8 if len(x) <= 32 else 32), config, progress=False)
        with torch.no_grad():
            out = torch.cat([sim(b) for b in batches(xe)])
        acc = 100 * (out.argmax(1) == ye).float().mean().item()
        agree = 100 * (out.argmax(1) == ref.argmax(1)).float().mean().item()
        cov = calibration_coverage(graph, batches(x, 8 if len(x) <= 32 else 32), coverage_eval, config=config,
                                   progress=False)
        print(f"| {name} | {acc:.2f} | {float_top1 - acc:+.2f} | {agree:.2f} | {cov.message} |", flush=True)
        print(f"<!-- {name}: {time.perf_counter() - t:.0f} s; {len(cov.flagged)} of {len(cov.rows)} layers "
              f"flagged; growth curve {cov.curve} -->", flush=True)


if __name__ == "__main__":
    main()
