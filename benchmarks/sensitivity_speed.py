"""Layer sensitivity on the real EfficientNet-Lite0: the naive loop (for every layer: quantize only it,
calibrate, run the whole model, as the field report did) against qsurgery.sensitivity (one calibration,
cached float prefix), in one run: wall times and their ratio, Spearman rank correlation of the rankings,
the top-5, and int8 top-1 with the top-2 layers kept float.

    python benchmarks/sensitivity_speed.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.analysis import sensitivity


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def kl(out: torch.Tensor, ref: torch.Tensor) -> float:
    lp, lq = ref.log_softmax(1), out.log_softmax(1)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=128, help="calibration images = evaluation images = this many")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    bs = args.batch_size
    d = load_lite0(args.data, args.images, bs, eval_limit=args.images)
    graph, xc, xe, ye, calib = d.graph, d.xc, d.xe, d.ye, d.calib
    evals = [(xe[i:i + bs], ye[i:i + bs]) for i in range(0, len(xe), bs)]
    print(f"# EfficientNet-Lite0 (real weights), {len(xc)} calibration + {len(xe)} evaluation images, metric: KL "
          f"divergence of int8 from float outputs, mode quantize_one")

    t = time.perf_counter()
    report = sensitivity(graph, calib, evals, metric="kl", mode="quantize_one", progress=False)
    ours = time.perf_counter() - t
    layers = [r.layer for r in report.rows]

    t = time.perf_counter()
    with torch.no_grad():
        ref = torch.cat([graph(x) for x, _ in evals])
    naive = {}
    for name in layers:
        cfg = qsurgery.QuantConfig.int8().override("*", dtype="float").override(name, dtype="int")
        sim, _ = qsurgery.quantize(graph, calib, cfg, progress=False)
        with torch.no_grad():
            out = torch.cat([sim(x) for x, _ in evals])
        naive[name] = kl(out, ref)
    naive_s = time.perf_counter() - t

    ours_scores = [report[name].delta for name in layers]
    naive_scores = [naive[name] for name in layers]
    rho = spearman(ours_scores, naive_scores)
    top_naive = sorted(layers, key=lambda n: -naive[n])[:5]
    print(f"\nlayers: {len(layers)}; naive loop {naive_s:.1f} s, qsurgery.sensitivity {ours:.1f} s: "
          f"{naive_s / ours:.1f}x faster; Spearman rank correlation {rho:.4f}")
    print(f"cost model (forwards per batch): {report.forward_cost}")
    print("\ntop-5 (qsurgery):  " + ", ".join(f"{r.layer} ({r.delta:.2e})" for r in report.top(5)))
    print("top-5 (naive):     " + ", ".join(f"{n} ({naive[n]:.2e})" for n in top_naive))
    print(f"field report's worst two (conv_stem, blocks.0.0.conv_dw) reproduced: "
          f"{set(layers[:2]) == {'conv_stem', 'blocks.0.0.conv_dw'}}")

    top2 = layers[:2]
    gain = sensitivity(graph, calib, evals, metric="top1", mode="float_one", layers=top2, progress=False)
    sim_all, _ = qsurgery.quantize(graph, calib, progress=False)
    cfg = qsurgery.QuantConfig.int8()
    for name in top2:
        cfg = cfg.override(name, dtype="float")
    sim_two, _ = qsurgery.quantize(graph, calib, cfg, progress=False)
    with torch.no_grad():
        f_out = ref
        a_out = torch.cat([sim_all(x) for x, _ in evals])
        t_out = torch.cat([sim_two(x) for x, _ in evals])
    print("\nfloat_one (top-1 gain of keeping one layer float): "
          + ", ".join(f"{r.layer} {100 * r.delta:+.2f} pt" for r in gain.rows))
    print(f"top-1 on the {len(xe)} evaluation images: float {100 * qsurgery.top1(f_out, ye):.2f} %, int8 "
          f"{100 * qsurgery.top1(a_out, ye):.2f} %, int8 with {top2} float {100 * qsurgery.top1(t_out, ye):.2f} %; "
          f"agreement with float {100 * qsurgery.agreement(f_out, a_out):.2f} % -> "
          f"{100 * qsurgery.agreement(f_out, t_out):.2f} %")


if __name__ == "__main__":
    main()
