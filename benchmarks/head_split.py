"""Detection heads under int8, without and with split_head, on two real COCO detectors.

For Yolo-Fastest-1.1-XL and YOLOv5n: calibrate on the first 64 coco128 images, evaluate on the other 64 and
on all 128 (COCO mAP@0.5:0.95 / mAP@0.5, our evaluator = pycocotools). Variants: float; head-only int8 (only
the head convs int8: weights per-channel, outputs per-tensor uint8; everything else float) and whole-model
int8 (W8 per-channel / A8 per-tensor min-max), each unsplit and split with groups="yolo", "yolo-xywh",
"auto", and the yolo groupings again with ``score_floor=-8``; whole-model int8 again with the percentile and MSE
activation observers (unsplit and split, no floor). Prints the per-group output ranges and the wall
time of each step. A second fold swaps the halves (calibrate on the last 64, evaluate on the first 64): how
far 64 held-out images move the comparison. Calibration draws (``--draws``): whole-model int8 without and with
each split (no floor), calibrated on random subsets of 3/4 of the calibration images, to show how far the
calibration images alone move the comparison; the paired differences per draw and their mean.

    python benchmarks/head_split.py --data ../shared/data/coco128
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qsurgery  # noqa: E402
from examples.detectors import load_detector  # noqa: E402
from qsurgery.detection import CocoImages, coco_eval, detect  # noqa: E402
from qsurgery.passes import find_heads, split_head  # noqa: E402
from qsurgery.passes.split_head import yolo_groups  # noqa: E402


def head_only(config: qsurgery.QuantConfig, heads: list[str]) -> qsurgery.QuantConfig:
    cfg = config.override("*", dtype="float")
    for h in heads:
        cfg = cfg.override(f"{h}*", dtype="int")
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/coco128", help="COCO-format folder (train2017/, annotations/)")
    ap.add_argument("--detectors", nargs="+", default=["yolo-fastest", "yolov5n"])
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--groups", nargs="+", default=["yolo", "yolo-xywh", "auto"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--score-floor", type=float, default=-8.0,
                    help="also run the yolo groupings with this score_floor (0: skip)")
    ap.add_argument("--folds", type=int, choices=(1, 2), default=2,
                    help="2: also calibrate on the second half and evaluate on the first (a cross-check of the noise)")
    ap.add_argument("--observers", nargs="*", default=["percentile", "mse"],
                    help="whole-model int8 again with these activation observers (min-max is the default one)")
    ap.add_argument("--draws", type=int, default=6,
                    help="whole-model int8 calibration draws (3/4 of the calibration images each) per fold (0: skip)")
    args = ap.parse_args()
    args.variants = {g: {"groups": g} for g in args.groups}
    if args.score_floor:
        args.variants.update({f"{g} floor {args.score_floor:g}": {"groups": g, "score_floor": args.score_floor}
                              for g in args.groups if g.startswith("yolo")})
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    data = CocoImages(Path(args.data) / "train2017", Path(args.data) / "annotations" / "instances_train2017.json")
    first, second = list(range(args.n_calib)), list(range(args.n_calib, len(data)))
    summary: list = []
    draws: list = []
    for fold, (calib_ids, held_ids) in enumerate([(first, second), (second, first)][:args.folds], 1):
        calib_set, held_out = data.subset(calib_ids), data.subset(held_ids)
        print(f"\n# fold {fold}: {len(data)} images: calibrate on images {calib_ids[0]}..{calib_ids[-1]}, "
              f"evaluate on the other {len(held_out)} and on all")
        run_fold(args, data, calib_set, held_out, f"{fold}", summary, draws)
    report(args, summary, draws)


def run_fold(args, data, calib_set, held_out, fold: str, summary: list, draws: list) -> None:
    """Every detector and variant calibrated on ``calib_set``; rows appended to ``summary``."""
    for name in args.detectors:
        t0 = time.perf_counter()
        det = load_detector(name)
        graph = qsurgery.capture(det.model, torch.zeros(1, 3, det.size, det.size))
        calib = calib_set.calibration(det.size, 8, stretch=det.stretch)
        heads = [h["conv"] for h in find_heads(graph, calib)]
        print(f"\n== {name}: {det.size}x{det.size}, heads {heads} (capture + calibration images "
              f"{time.perf_counter() - t0:.1f} s)")
        for h in find_heads(graph, calib):
            print(f"   {h['conv']}: {h['bits_lost']:.2f} bits lost to one shared scale")

        probe = held_out.subset(range(16)).calibration(det.size, 8, stretch=det.stretch)
        with torch.no_grad():
            reference = [graph(x) for x in probe]

        def head_sqnr(fn, probe=probe, reference=reference) -> dict[str, float]:
            """SQNR (dB) against float per YOLO field group over 16 held-out images: box on the raw outputs,
            objectness and classes on their sigmoid (the scores the decoder uses)."""
            sig: dict[str, float] = {}
            err: dict[str, float] = {}
            with torch.no_grad():
                for x, ref in zip(probe, reference):
                    for r, o in zip(ref, fn(x)):
                        for field, idx in yolo_groups(r.shape[1]).items():
                            a, b = r[:, idx], o[:, idx]
                            if field != "box":
                                a, b = torch.sigmoid(a), torch.sigmoid(b)
                            sig[field] = sig.get(field, 0.0) + float(a.pow(2).sum())
                            err[field] = err.get(field, 0.0) + float((a - b).pow(2).sum())
            return {k: 10 * torch.log10(torch.tensor(sig[k] / max(err[k], 1e-30))).item() for k in sig}

        def score(model, label, merge=None, det=det, name=name):
            t = time.perf_counter()
            fn = (lambda inp: merge(model(inp))) if merge else model
            res = detect(fn, data, det.decode, size=det.size, stretch=det.stretch, progress=False)
            a, b = coco_eval(res, held_out), coco_eval(res, data)
            sq = head_sqnr(fn) if label != "float" else {}
            row = (name, fold, label, 100 * a.map, 100 * a.map50, 100 * b.map, 100 * b.map50, sq)
            summary.append(row)
            sq_text = "  head SQNR box/obj/cls " + "/".join(f"{sq[k]:.1f}" for k in ("box", "obj", "cls")) + " dB" \
                if sq else ""
            print(f"   {label:<32} held-out mAP {row[3]:5.1f} / {row[4]:5.1f}   all-128 mAP {row[5]:5.1f} / "
                  f"{row[6]:5.1f}{sq_text}   ({time.perf_counter() - t:.0f} s)")
            return row

        score(graph, "float")
        base = qsurgery.QuantConfig.int8()
        splits = {}
        for label, kwargs in args.variants.items():
            t = time.perf_counter()
            splits[label] = split_head(graph, heads, merge="outputs", calib_data=calib, **kwargs)
            r = splits[label]
            print(f"   split {label} ({time.perf_counter() - t:.1f} s, float error {r.float_error:.2g}):")
            for c in r.changes:
                rngs = ", ".join(f"{k} {c['groups'][k]} ch [{lo:.1f}, {hi:.1f}]"
                                 for k, (lo, hi) in c["group_ranges"].items())
                print(f"     {c['conv']}: {rngs}")
        plain = {g: splits[g] for g in args.groups}
        scopes = [("head-only int8", base, splits), ("whole int8", base, splits)]
        scopes += [(f"whole int8 {obs}", qsurgery.QuantConfig.int8(observer=obs), plain) for obs in args.observers]
        for scope, config, variants in scopes:
            def make(hs, config=config, scope=scope):
                return head_only(config, hs) if scope == "head-only int8" else config

            sim, _ = qsurgery.quantize(graph, calib, make(heads), progress=False)
            score(sim, scope)
            for groups, r in variants.items():
                split_heads = [f"{c['conv']}" for c in r.changes]
                t = time.perf_counter()
                sim, _ = qsurgery.quantize(r.graph, calib, make(split_heads), progress=False)
                score(sim, f"{scope} + split {groups}", r.merge_outputs)
        if args.draws:
            calibration_draws(args, det, graph, heads, calib_set, held_out, fold, draws)
        print(f"   {name} total {time.perf_counter() - t0:.0f} s")


def calibration_draws(args, det, graph, heads, calib_set, held_out, fold: str, draws: list) -> None:
    """Whole-model int8 held-out mAP, unsplit and with each split (no floor), for ``args.draws`` calibrations on
    random subsets of 3/4 of ``calib_set`` (seeded); a row (detector, fold, draw, {variant: mAP}) per draw."""
    rng = random.Random(f"{det.name} {fold}")
    n = max(1, round(0.75 * len(calib_set)))
    config = qsurgery.QuantConfig.int8()

    def held_map(fn) -> float:
        res = detect(fn, held_out, det.decode, size=det.size, stretch=det.stretch, progress=False)
        return 100 * coco_eval(res, held_out).map

    for k in range(args.draws):
        t = time.perf_counter()
        calib = calib_set.subset(sorted(rng.sample(range(len(calib_set)), n))).calibration(
            det.size, 8, stretch=det.stretch)
        sim, _ = qsurgery.quantize(graph, calib, config, progress=False)
        maps = {"whole int8": held_map(sim)}
        for g in args.groups:
            r = split_head(graph, heads, groups=g, merge="outputs", calib_data=calib)
            sim, _ = qsurgery.quantize(r.graph, calib, config, progress=False)
            maps[f"whole int8 + split {g}"] = held_map(lambda x, sim=sim, r=r: r.merge_outputs(sim(x)))
        draws.append((det.name, fold, k, maps))
        base = maps["whole int8"]
        print(f"   draw {k} ({n} calibration images, {time.perf_counter() - t:.0f} s): whole int8 held-out mAP "
              f"{base:.2f}; " + ", ".join(f"split {v.split()[-1]} {m:.2f} ({m - base:+.2f})"
                                          for v, m in maps.items() if v != "whole int8"))


def report(args, summary: list, draws: list) -> None:
    """The table of every row, the calibration draws, then the two goals per detector and fold."""
    print("\n| detector | fold | variant | held-out mAP | held-out mAP@0.5 | all-128 mAP | all-128 mAP@0.5 | "
          "head SQNR box / obj score / cls score (dB) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for row in summary:
        sq = " / ".join(f"{row[7][k]:.1f}" for k in ("box", "obj", "cls")) if row[7] else "-"
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]:.1f} | {row[4]:.1f} | {row[5]:.1f} | {row[6]:.1f} | {sq} |")
    if draws:
        print(f"\nCalibration draws ({args.draws} per fold, 3/4 of the calibration images each): whole-model int8 "
              "held-out mAP, and the split's difference to it in the same draw")
        print("\n| detector | fold | variant | mean mAP | mean difference | min difference | max difference | "
              "draws worse |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
    for (name, fold), rows in _group_draws(draws).items():
        base = [m["whole int8"] for m in rows]
        for variant in rows[0]:
            d = [m[variant] - b for m, b in zip(rows, base)]
            diff = "- | - | - | -" if variant == "whole int8" else \
                f"{statistics.mean(d):+.2f} | {min(d):+.2f} | {max(d):+.2f} | {sum(x < 0 for x in d)} of {len(d)}"
            print(f"| {name} | {fold} | {variant} | {statistics.mean(m[variant] for m in rows):.2f} | {diff} |")
    print()
    for fold in sorted({r[1] for r in summary}):
        for name in args.detectors:
            rows = {r[2]: r for r in summary if r[0] == name and r[1] == fold}
            f, h = rows["float"][3], rows["head-only int8"][3]
            for groups in args.variants:
                s = rows[f"head-only int8 + split {groups}"][3]
                rec = (s - h) / (f - h) if f != h else float("nan")
                print(f"fold {fold} {name} {groups}: recovers {100 * rec:.0f} % of the head-only int8 loss "
                      f"({h:.1f} -> {s:.1f}, float {f:.1f})")
            for scope in ["whole int8"] + [f"whole int8 {obs}" for obs in args.observers]:
                for groups in (args.variants if scope == "whole int8" else args.groups):
                    w, ws = rows[scope], rows[f"{scope} + split {groups}"]
                    d = [m[f"{scope} + split {groups}"] - m[scope]
                         for m in _group_draws(draws).get((name, fold), []) if f"{scope} + split {groups}" in m]
                    in_draws = f"; calibration draws: mean {statistics.mean(d):+.2f} " \
                               f"({'not worse' if statistics.mean(d) >= 0 else 'WORSE'})" if d else ""
                    print(f"fold {fold} {name} {scope} + split {groups}: held-out {w[3]:.1f} -> {ws[3]:.1f} "
                          f"({'not worse' if ws[3] >= w[3] else 'WORSE'}), all-128 {w[5]:.1f} -> {ws[5]:.1f} "
                          f"({'not worse' if ws[5] >= w[5] else 'WORSE'}){in_draws}")


def _group_draws(draws: list) -> dict[tuple[str, str], list[dict[str, float]]]:
    grouped: dict[tuple[str, str], list[dict[str, float]]] = {}
    for name, fold, _k, maps in draws:
        grouped.setdefault((name, fold), []).append(maps)
    return grouped

if __name__ == "__main__":
    main()
