"""The recipe engine on the real EfficientNet-Lite0: per target and budget, float / plain / repaired top-1 and
agreement on report images the engine never saw, cost, share of MACs in the default format, trials, time.

Images: a seeded split of the folder into 64 calibration images and the rest; the engine decides on the first
``--select`` of the rest and reports on the others. Anchors in the same run (on the ``generic`` target, split 0): the
field report's method (the k most sensitive layers kept float, k the smallest that meets the budget on the
selection images) and ``assign_precision`` alone on ``int8-int16``.

``--splits K`` repeats every run on K seeded splits of the folder (split 0 is the default one; each split draws
calibration, selection and report images anew) and ends with each target and budget's mean report drop and mean
paired change (repaired - plain) over the splits, with 95 % t-intervals: one report part of ~236 images moves
by 0.42 point an image, the mean over splits estimates what the engine does on this pool of images with less
noise (the splits share the pool's 500 images, so the interval says how the protocol varies, not ImageNet).

    python benchmarks/repair.py --data ../shared/data/imagenet-sample-dev
    python benchmarks/repair.py --data ../shared/data/imagenet-sample-dev --targets generic --budgets 0.5 --splits 3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _lite0 import load_lite0
from _stats import mean_interval

import qsurgery
from qsurgery import Budget, repair
from qsurgery.analysis import sensitivity
from qsurgery.cost import plan_cost
from qsurgery.passes import assign_precision

TARGETS = ["generic", "int8-int16", "full-int8", "per-tensor-int16", "per-tensor-int8", "pow2-int8", "pow2-int16",
           "w4a8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--select", type=int, default=200)
    ap.add_argument("--targets", nargs="*", default=TARGETS)
    ap.add_argument("--budgets", nargs="*", type=float, default=[0.5, 1.0])
    ap.add_argument("--max-trials", type=int, default=24)
    ap.add_argument("--remedies", nargs="*", help="remedy names (default: every one the target allows)")
    ap.add_argument("--max-cost", type=float, help="cost cap relative to the plain model (Budget.max_cost)")
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--log-dir", default="out/repair", help="each run's trial table (markdown) goes here")
    ap.add_argument("--splits", type=int, default=1, help="seeded splits of the folder to repeat every run on")
    ap.add_argument("--split-seeds", nargs="*", type=int, help="these splits instead of 0 .. --splits - 1")
    args = ap.parse_args()
    if args.splits < 1:
        ap.error("--splits must be >= 1")
    seeds = args.split_seeds if args.split_seeds else list(range(args.splits))
    drops: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for seed in seeds:
        torch.manual_seed(0)
        d = load_lite0(args.data, args.calib, 32, seed=seed)
        sel = (d.xe[:args.select], d.ye[:args.select])
        rep = (d.xe[args.select:], d.ye[args.select:])
        n_rep = len(rep[0])
        print(f"# EfficientNet-Lite0, split {seed}: {len(d.xc)} calibration / {len(sel[0])} selection / {n_rep} "
              f"report images (disjoint; 1 report image = {100 / n_rep:.2f} pt), {torch.get_num_threads()} threads\n")
        print("| target | budget | float | plain | repaired | drop [95 % interval] | agreement plain -> repaired | "
              "cost | MACs in default format | non-default layers | kept steps | trials | s (set-up / trials / "
              "report) | met on selection |")
        print("|---|---:|---:|---:|---:|---|---|---:|---:|---:|---|---:|---|---|")
        for target in args.targets:
            for b in args.budgets:
                p = _run(d, sel, rep, target, b, args, seed)
                drops.setdefault((target, b), []).append((p.float_metric - p.repaired_metric,
                                                          p.repaired_metric - p.baseline_metric))
        if seed == 0 and not args.no_anchors:
            anchors(d, sel, rep, args.budgets)
        print()
    if len(seeds) > 1:
        print(f"over splits {seeds} (report top-1 points; 95 % t-intervals)\n")
        print("| target | budget | splits | mean drop [95 % interval] | sd | mean repaired - plain [95 % interval] |")
        print("|---|---:|---:|---|---:|---|")
        for (target, b), v in drops.items():
            m, sd, lo, hi = mean_interval([x[0] for x in v])
            g, _, glo, ghi = mean_interval([x[1] for x in v])
            print(f"| {target} | {b} | {len(v)} | {m:.2f} [{lo:.2f}, {hi:.2f}] | {sd:.2f} | "
                  f"{g:+.2f} [{glo:+.2f}, {ghi:+.2f}] |", flush=True)


def _run(d, sel, rep, target: str, b: float, args, seed: int):
    """One engine run on one split: prints its row, returns its report."""
    allowed = None if args.remedies is None else [
        n for n in args.remedies if qsurgery.REMEDIES[n].forbidden_on(qsurgery.get_target(target)) is None]
    r = repair(d.graph, d.calib, sel, report_data=rep, budget=Budget(b, "top1", args.max_cost), target=target,
               remedies=allowed, max_trials=args.max_trials, progress=False)
    log = Path(args.log_dir)
    log.mkdir(parents=True, exist_ok=True)
    (log / (f"{target}-budget{b}" + ("" if seed == 0 else f"-split{seed}") + ".md")).write_text(r.to_markdown())
    p = r.report
    lo, hi = p.drop_interval
    steps = "; ".join(s["remedy"] + ("" if not s["params"] else
                                      "(" + ", ".join(f"{k}={v}" for k, v in s["params"].items()) + ")")
                      for s in r.steps) or "-"
    sec = r.seconds
    print(f"| {target} | {b} | {p.float_metric:.2f} | {p.baseline_metric:.2f} | {p.repaired_metric:.2f} | "
          f"{p.float_metric - p.repaired_metric:.2f} [{lo:.2f}, {hi:.2f}] | {p.baseline_agreement:.2f} -> "
          f"{p.repaired_agreement:.2f} | x{r.relative_cost:.3f} | {100 * r.default_mac_share:.2f} % | "
          f"{len(r.cost.non_int8_layers) if r.default_format == 'int8' else '-'} | {steps} | "
          f"{len(r.trials)} | {sec['set-up and baseline']:.0f} / {sec['trials']:.0f} / {sec['report']:.0f} | "
          f"{'yes' if r.reached else 'no'} |", flush=True)
    return p


def anchors(d, sel, rep, budgets) -> None:
    """The field report's method and assign_precision alone, decided on the selection images."""
    def batches(x, y):
        return [(x[i:i + 50], y[i:i + 50]) for i in range(0, len(x), 50)]

    sim, plan = qsurgery.quantize(d.graph, d.calib, qsurgery.QuantConfig.int8(), progress=False)
    t = time.perf_counter()
    sens = sensitivity(d.graph, None, batches(*sel), metric="kl", mode="quantize_one", simulated=sim, progress=False)
    with torch.no_grad():
        f_sel = qsurgery.top1(torch.cat([d.graph(x) for x, _ in batches(*sel)]), sel[1]) * 100
        f_rep = qsurgery.top1(torch.cat([d.graph(x) for x, _ in batches(*rep)]), rep[1]) * 100
    print(f"\nanchors (generic; float top-1 {f_rep:.2f} on the report images; sensitivity "
          f"{time.perf_counter() - t:.0f} s)\n")
    print("| method | budget | k / formats | repaired (report) | drop | cost | MACs int8 |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for b in budgets:
        chosen = None
        for k in range(0, 16):
            cfg = qsurgery.QuantConfig.int8()
            for row in sens.rows[:k]:
                cfg = cfg.override(row.layer, dtype="float")
            s, p = qsurgery.quantize(d.graph, d.calib, cfg, progress=False)
            with torch.no_grad():
                acc = qsurgery.top1(torch.cat([s(x) for x, _ in batches(*sel)]), sel[1]) * 100
            if f_sel - acc <= b:
                chosen = (k, s, p)
                break
        if chosen is None:
            print(f"| k most sensitive float | {b} | no k <= 15 meets it on selection | | | | |")
        else:
            k, s, p = chosen
            with torch.no_grad():
                acc = qsurgery.top1(torch.cat([s(x) for x, _ in batches(*rep)]), rep[1]) * 100
            c = plan_cost(d.graph, p, "generic")
            base = plan_cost(d.graph, plan, "generic")
            print(f"| k most sensitive float | {b} | k={k} | {acc:.2f} | {f_rep - acc:.2f} | "
                  f"x{c.total / base.total:.3f} | {100 * (1 - c.non_int8_mac_share):.2f} % |", flush=True)
        t = time.perf_counter()
        f1 = sensitivity(d.graph, None, batches(*sel), metric="kl", mode="float_one", simulated=sim, progress=False)
        res = assign_precision(d.graph, plan, f1, target="int8-int16", data=batches(*sel), budget=b, progress=False)
        s, _ = qsurgery.quantize(d.graph, None, plan=res.plan, progress=False)
        with torch.no_grad():
            acc = qsurgery.top1(torch.cat([s(x) for x, _ in batches(*rep)]), rep[1]) * 100
        base = plan_cost(d.graph, plan, "int8-int16")
        print(f"| assign_precision alone (int8-int16) | {b} | {len(res.formats)} widened | {acc:.2f} | "
              f"{f_rep - acc:.2f} | x{res.cost.total / base.total:.3f} | "
              f"{100 * (1 - res.cost.non_int8_mac_share):.2f} % ({time.perf_counter() - t:.0f} s) |", flush=True)


if __name__ == "__main__":
    main()
