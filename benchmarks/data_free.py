"""Why data-free calibration of the real EfficientNet-Lite0 holds or fails on unseen photos: count, steps, seed.

Images distilled from the model's BatchNorm statistics (`qsurgery.data.distill_images`) at {40 (the default),
100} optimisation steps per batch and seeds {0, 1}, calibrating W8 per-channel / A8 per-tensor min-max with the
first 64 or all 128 of them; against calibration on 64 and 128 real photos. For each: int8 top-1 and agreement
with float on the 372 held-out photos (1 image = 0.27 pt), KL from float, and which layers' activation ranges
differ most from the 128-real-photo ranges (ratio of the calibrated range widths). Also min-max vs the
percentile observer on distilled images (outlier pixels of a few distilled images can stretch a range).

    python benchmarks/data_free.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.data import distill_images


def batches(x: torch.Tensor, bs: int = 32) -> list[torch.Tensor]:
    return [x[i:i + bs] for i in range(0, len(x), bs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/imagenet-sample-dev")
    ap.add_argument("--steps", type=int, nargs="*", default=[40, 100])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--cache-dir", default=None, help="reuse distilled images (default: none, timed fresh)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    s = load_lite0(args.data, 128, 32)
    graph, xe, ye = s.graph, s.xe, s.ye
    with torch.no_grad():
        ref = torch.cat([graph(b) for b in batches(xe)])
    float_top1 = 100 * (ref.argmax(1) == ye).float().mean().item()
    print(f"# data-free calibration, real EfficientNet-Lite0; {len(xe)} held-out photos (1 image = "
          f"{100 / len(xe):.2f} pt), float top-1 {float_top1:.2f} %", flush=True)

    def measure(x: torch.Tensor, observer: str = "minmax"):
        config = qsurgery.QuantConfig.int8(observer=observer)
        sim, plan = qsurgery.quantize(graph, batches(x), config, progress=False)
        with torch.no_grad():
            out = torch.cat([sim(b) for b in batches(xe)])
        acc = 100 * (out.argmax(1) == ye).float().mean().item()
        agree = 100 * (out.argmax(1) == ref.argmax(1)).float().mean().item()
        kl = torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True,
                                        reduction="batchmean").item()
        widths = {layer.name: layer.clip[1] - layer.clip[0] for layer in plan if layer.clip is not None}
        return acc, agree, kl, widths

    real = {"64 real": s.xc[:64], "128 real": s.xc}
    results = {name: measure(x) for name, x in real.items()}
    base_widths = results["128 real"][3]
    distilled: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for steps in args.steps:
        for seed in args.seeds:
            t = time.perf_counter()
            imgs = distill_images(s.model, 128, size=224, steps=steps, batch_size=32, seed=seed,
                                  cache_dir=args.cache_dir, progress=False)
            seconds[f"{steps}/{seed}"] = time.perf_counter() - t
            print(f"distilled 128 images, {steps} steps, seed {seed}: {seconds[f'{steps}/{seed}']:.0f} s; pixels "
                  f"{imgs.min().item():.2f}..{imgs.max().item():.2f} (real {s.xc.min().item():.2f}.."
                  f"{s.xc.max().item():.2f})", flush=True)
            for n in (64, 128):
                distilled[f"{n} distilled, {steps} steps, seed {seed}"] = imgs[:n]
    for name, x in distilled.items():
        results[name] = measure(x)
    for name in [k for k in distilled if k.startswith("128")][:2]:
        results[name + ", percentile"] = measure(distilled[name], "percentile")

    print("\n| calibration set | int8 top-1 | drop | agreement | KL | range width vs 128 real: median, "
          "most different layers |")
    print("|---|---:|---:|---:|---:|---|")
    for name, (acc, agree, kl, widths) in results.items():
        ratios = {k: widths[k] / base_widths[k] for k in widths if k in base_widths and base_widths[k] > 0}
        ordered = sorted(ratios.items(), key=lambda kv: -abs(torch.tensor(kv[1]).log().item()))
        med = torch.tensor(list(ratios.values())).median().item()
        worst = ", ".join(f"{k} x{v:.2f}" for k, v in ordered[:3])
        print(f"| {name} | {acc:.2f} | {float_top1 - acc:+.2f} | {agree:.2f} | {kl:.4f} | x{med:.2f}; {worst} |",
              flush=True)


if __name__ == "__main__":
    main()
