"""Detectors repaired by the recipe engine to an mAP budget, on two real COCO detectors.

For each detector (Yolo-Fastest-1.1-XL, YOLOv5n), fold (0: the first 64 coco128 images calibrate and select,
the last 64 report; 1: the halves swapped) and target (``full-int8``: every layer int8; ``int8-int16``: 16-bit
layers allowed, priced): the calibrating-and-selecting half is split into calibration and selection images
(disjoint, ``--n-calib`` calibrate), ``qsurgery.repair`` runs with the budget in mAP@0.5:0.95 points
(``DetectionMetric``), and the report half gives float, whole-model int8 and repaired int8 mAP@0.5:0.95 and
mAP@0.5, cost relative to all-int8, share of MACs in int8, the accepted steps, trials and wall time. One
report image moves mAP by far less than a classifier's 1/64 (it is a ranking over every box), but the 64
report images themselves are a small sample: compare with the fold swap.

``--draws K`` repeats each run with K calibration draws (draw 0: the half's first ``--n-calib`` images; draw k:
a seeded permutation of the half), the rest of the half selecting, and ends with each detector/fold/target's mean
paired difference, repaired minus plain int8 on the same report images, over the draws, with its 95 % t-interval.
Every row also says how the selection images judged the accepted steps: the smallest change of the selection mAP
that a kept step made (the engine keeps a step when its distance from float falls and the metric does not),
so the rule "never worse on the selection images" can be checked there.

    python benchmarks/repair_detect.py --data ../shared/data/coco128
    python benchmarks/repair_detect.py --data ../shared/data/coco128 --detectors yolov5n --targets full-int8 --draws 6
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from _stats import mean_interval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qsurgery  # noqa: E402
from examples.detectors import load_detector  # noqa: E402
from qsurgery.detection import CocoImages, DetectionMetric  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/coco128", help="COCO-format folder (train2017/, annotations/)")
    ap.add_argument("--detectors", nargs="+", default=["yolo-fastest", "yolov5n"])
    ap.add_argument("--targets", nargs="+", default=["full-int8", "int8-int16"])
    ap.add_argument("--folds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--budget", type=float, default=1.0, help="mAP@0.5:0.95 points")
    ap.add_argument("--n-calib", type=int, default=32, help="calibration images of the 64 (the rest select)")
    ap.add_argument("--max-trials", type=int, default=12)
    ap.add_argument("--remedies", nargs="*", help="remedy names (default: every one the target allows)")
    ap.add_argument("--draws", type=int, default=1, help="calibration draws per fold (0: the half's first images)")
    ap.add_argument("--out", type=Path, default=Path("out/repair_detect"),
                    help="folder for each run's repair report (every trial, decided on the selection images)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    data = CocoImages(Path(args.data) / "train2017")
    print(f"# {len(data)} coco128 images; {torch.get_num_threads()} CPU threads; budget {args.budget} mAP point(s)\n")
    print("| detector | fold | target | draw | float mAP / @.5 | int8 mAP / @.5 | repaired mAP / @.5 | paired diff | "
          "cost | MACs int8 | steps | least sel. change of a kept step | trials | s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    diffs: dict[tuple, list[float]] = {}
    for name in args.detectors:
        det = load_detector(name)
        metric = DetectionMetric(data, det.decode, size=det.size, stretch=det.stretch)
        x, pos = metric.images()
        graph = qsurgery.capture(det.model, x[:1])
        half = len(data) // 2
        for fold in args.folds:
            first, second = torch.arange(half), torch.arange(half, len(data))
            dev, rep = (first, second) if fold == 0 else (second, first)
            for draw in range(args.draws):
                gen = torch.Generator().manual_seed(draw)
                order = dev if draw == 0 else dev[torch.randperm(len(dev), generator=gen)]
                calib_idx, sel_idx = order[:args.n_calib], order[args.n_calib:]
                calib = [x[calib_idx[i:i + 8]] for i in range(0, len(calib_idx), 8)]
                for target in args.targets:
                    t = time.perf_counter()
                    r = qsurgery.repair(graph, calib, (x[sel_idx], pos[sel_idx]), report_data=(x[rep], pos[rep]),
                                        budget=qsurgery.Budget(args.budget, metric), target=target,
                                        remedies=args.remedies, max_trials=args.max_trials, batch_size=8,
                                        progress=False)
                    secs = time.perf_counter() - t
                    args.out.mkdir(parents=True, exist_ok=True)
                    suffix = f"_draw{draw}" if draw else ""
                    (args.out / f"{name}_fold{fold}_{target}{suffix}.md").write_text(r.to_markdown())
                    sim0, _ = qsurgery.quantize(graph, calib, qsurgery.get_target(target).config(), progress=False)
                    f50, b50, r50 = (_map50(metric, m, x[rep], pos[rep]) for m in (graph, sim0, r.model))
                    rr = r.report
                    diff = rr.repaired_metric - rr.baseline_metric
                    diffs.setdefault((name, fold, target), []).append(diff)
                    kept = [tr.metric_after - tr.metric_before for tr in r.trials if tr.accepted]
                    least = f"{min(kept):+.2f}" if kept else "-"
                    steps = ", ".join(s["remedy"] + (f"({s['params']})" if s["params"] else "") for s in r.steps)
                    print(f"| {name} | {fold} | {target} | {draw} | {rr.float_metric:.2f} / {f50:.2f} | "
                          f"{rr.baseline_metric:.2f} / {b50:.2f} | {rr.repaired_metric:.2f} / {r50:.2f} | "
                          f"{diff:+.2f} | "
                          f"x{r.relative_cost:.3f} | {100 * r.default_mac_share:.1f} % | {steps or 'none'} | {least} | "
                          f"{len(r.trials)} | {secs:.0f} |", flush=True)
    if args.draws > 1:
        print("\n| detector | fold | target | draws | mean paired diff (repaired - int8), report mAP | sd | "
              "95 % interval |")
        print("|---|---:|---|---:|---:|---:|---|")
        for (name, fold, target), d in diffs.items():
            mean, sd, lo, hi = mean_interval(d)
            print(f"| {name} | {fold} | {target} | {len(d)} | {mean:+.2f} | {sd:.2f} | {lo:+.2f}..{hi:+.2f} |")


def _map50(metric: DetectionMetric, model, x: torch.Tensor, positions: torch.Tensor) -> float:
    from qsurgery.evaluate import predict

    out, _ = predict(model, [x[i:i + 8] for i in range(0, len(x), 8)])
    return 100 * metric.report(out, positions).map50


if __name__ == "__main__":
    main()
