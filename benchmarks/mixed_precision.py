"""Mixed precision on the real EfficientNet-Lite0: assign_precision vs keeping the k worst layers float.

Images of the folder: 100 calibrate, 150 "dev" (sensitivity and the search measure on them), the remaining
250 "test" (only reported). For targets `generic` (int8 + float fallback) and `int8-int16` (int8 + 16-bit
activations/weights, no float): the measured Pareto front (top-1 vs share of MACs not int8), the cheapest
plan meeting a 0.5- and a 1.0-point budget, and the field report's method in the same run: keep the k layers
with the largest single-layer float_one gain float (generic) or int16 (int8-int16), k = 1..8.

    python benchmarks/mixed_precision.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import time
import warnings

from _lite0 import load_lite0

import qsurgery
from qsurgery.analysis import sensitivity
from qsurgery.cost import plan_cost
from qsurgery.evaluate import predict
from qsurgery.passes import assign_precision
from qsurgery.passes.assign_precision import measure_plan, with_formats
from qsurgery.targets import get_target


def batches(x, y, bs=50):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/imagenet-sample-dev")
    ap.add_argument("--n-calib", type=int, default=100)
    ap.add_argument("--n-dev", type=int, default=150)
    ap.add_argument("--max-steps", type=int, default=48)
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--plot", default=None, help="folder for the Pareto plots")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    s = load_lite0(args.data, args.n_calib, 50)
    dev = batches(s.xe[:args.n_dev], s.ye[:args.n_dev])
    test = batches(s.xe[args.n_dev:], s.ye[args.n_dev:])
    graph = s.graph
    ref_dev, _ = predict(graph, dev)
    ref_test, y_test = predict(graph, test)
    float_test = 100 * (ref_test.argmax(1) == y_test).float().mean().item()
    sim, plan = qsurgery.quantize(graph, s.calib, get_target("generic").config(), progress=False)
    t = time.perf_counter()
    sens = sensitivity(graph, None, dev, mode="float_one", metric="kl", simulated=sim, progress=False)
    print(f"{len(s.xc)} calibration / {args.n_dev} dev / {len(s.xe) - args.n_dev} test images; float_one KL "
          f"sensitivity of {len(sens.rows)} layers on dev: {time.perf_counter() - t:.0f} s; test float top-1 "
          f"{float_test:.2f}", flush=True)
    print("top-8 single-layer gains:", ", ".join(f"{r.layer} ({r.delta:.4f})" for r in sens.rows[:8]), flush=True)

    def test_acc(p):
        return measure_plan(graph, p, test, "top1", ref_test)[0]

    for name, wide in (("generic", "float"), ("int8-int16", "int16")):
        target = get_target(name)
        t = time.perf_counter()
        full = assign_precision(graph, plan, sens, target=target, data=dev, metric="top1",
                                max_steps=args.max_steps, progress=False)
        print(f"\n== target {name}: search over {len(full.steps) - 1} measured steps in "
              f"{time.perf_counter() - t:.0f} s; dev float {full.float_accuracy:.2f}, int8 {full.int8_accuracy:.2f}")
        print("Pareto front (dev top-1 vs % MACs not int8), with test top-1:")
        print("| non-int8 layers | % MACs not int8 | relative cost | dev top-1 | test top-1 |")
        print("|---|---:|---:|---:|---:|")
        for p in full.front:
            fp = with_formats(plan, p.formats, target)
            layers = ", ".join(f"{k}:{v}" for k, v in p.formats.items()) or "(all int8)"
            print(f"| {layers} | {100 * p.non_int8_mac_share:.2f} | {p.cost / 1e6:.1f} M | {p.accuracy:.2f} | "
                  f"{test_acc(fp):.2f} |", flush=True)
        if args.plot:
            from pathlib import Path

            Path(args.plot).mkdir(parents=True, exist_ok=True)
            full.plot(Path(args.plot) / f"pareto_{name}.png")

        topk = []
        for k in range(0, args.max_k + 1):
            formats = {r.layer: wide for r in sens.rows[:k]}
            p = with_formats(plan, formats, target)
            c = plan_cost(graph, p, target)
            dev_acc = measure_plan(graph, p, dev, "top1", ref_dev)[0]
            topk.append((k, c, dev_acc, test_acc(p)))
        print(f"top-k {wide} (field report's method):")
        print("| k | % MACs not int8 | relative cost | dev top-1 | test top-1 |")
        print("|---:|---:|---:|---:|---:|")
        for k, c, d, te in topk:
            print(f"| {k} | {100 * c.non_int8_mac_share:.2f} | {c.total / 1e6:.1f} M | {d:.2f} | {te:.2f} |",
                  flush=True)

        for budget in (0.5, 1.0):
            # the search is deterministic: assign_precision(..., budget=b) walks the same path and stops at the
            # first plan within the budget, i.e. the cheapest accepted step of the full run that meets it
            ok = [p for p in full.steps if p.accepted and p.accuracy >= full.float_accuracy - budget]
            ok_k = [row for row in topk if row[2] >= full.float_accuracy - budget]
            line = f"budget {budget}: "
            if ok:
                best = min(ok, key=lambda p: p.cost)
                fp = with_formats(plan, best.formats, target)
                c = plan_cost(graph, fp, target)
                line += (f"ours {len(best.formats)} layer(s) {sorted(best.formats)} -> dev {best.accuracy:.2f} "
                         f"(test {test_acc(fp):.2f}), {100 * c.non_int8_mac_share:.2f} % MACs not int8, cost "
                         f"{c.total / 1e6:.1f} M")
            else:
                line += "ours: not reached within the search"
            if ok_k:
                k, c, d, te = min(ok_k, key=lambda r: r[1].total)
                line += (f"; top-k: k={k} -> dev {d:.2f} (test {te:.2f}), {100 * c.non_int8_mac_share:.2f} % MACs "
                         f"not int8, cost {c.total / 1e6:.1f} M")
            else:
                line += f"; top-k: no k <= {args.max_k} meets it"
            print(line, flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
