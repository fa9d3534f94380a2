"""Sensitivity on Ray against in-process, in one run, on the real EfficientNet-Lite0: every quantized layer,
KL from float (quantize_one), the same images. In-process with 2 torch threads, then a local Ray with 1 worker
x 1 thread and with 2 workers x 1 thread: wall times and ratios, whether the reports are identical (every
figure, bit for bit, and the ranking), bytes shipped once and per task, the fixed start-up cost, and a cost
model (start-up + transfer + tasks scheduled on N workers) fitted on the 1-worker run and checked against the
2-worker run, then used to say what N machines would give.

    python benchmarks/scaleout.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import time

import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.analysis import sensitivity
from qsurgery.executor import RayExecutor


def makespan(durations: list[float], workers: int) -> float:
    """Greedy list scheduling in task order (what the executor does): when the last task finishes."""
    free = [0.0] * workers
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", type=int, default=128, help="evaluation images (calibration: as many others)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bandwidth", type=float, default=1e9, help="bits/s between machines, for the model")
    args = ap.parse_args()

    bs = args.batch_size
    d = load_lite0(args.data, args.images, bs, eval_limit=args.images)
    evals = [d.xe[i:i + bs] for i in range(0, len(d.xe), bs)]
    sim, _ = qsurgery.quantize(d.graph, d.calib, progress=False)
    layers = len([u for u in sim.plan if not u.is_float])
    print(f"# EfficientNet-Lite0 (real weights): sensitivity of {layers} layers (quantize_one, KL) on "
          f"{len(d.xe)} images in {len(evals)} batches of {bs}; {os.cpu_count()} cores here")

    runs = {}
    torch.set_num_threads(2)
    t = time.perf_counter()
    runs["in-process, 2 threads"] = (sensitivity(d.graph, None, evals, simulated=sim, progress=False),
                                     time.perf_counter() - t, None)
    for workers in (1, 2):
        import ray

        if ray.is_initialized():
            ray.shutdown()
        ex = RayExecutor(workers=workers, threads=1)
        t = time.perf_counter()
        report = sensitivity(d.graph, None, evals, simulated=sim, progress=False, executor=ex)
        runs[f"Ray, {workers} worker(s) x 1 thread"] = (report, time.perf_counter() - t, ex.stats)
        ex.close()
        ray.shutdown()

    base_report, base_s, _ = runs["in-process, 2 threads"]
    print("\n| run | wall s | start-up s | tasks | s per task | vs in-process | same report |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, (report, seconds, stats) in runs.items():
        same = report.to_dict() == base_report.to_dict()
        if stats is None:
            print(f"| {name} | {seconds:.1f} | - | {len(evals)} | - | 1.00 | (reference) |")
        else:
            per = sum(stats.task_s) / len(stats.task_s)
            print(f"| {name} | {seconds:.1f} | {stats.startup_s:.1f} | {len(stats.task_s)} | {per:.1f} | "
                  f"{base_s / seconds:.2f} | {same} |")
    one, two = runs["Ray, 1 worker(s) x 1 thread"], runs["Ray, 2 worker(s) x 1 thread"]
    print(f"\n2 workers vs 1 worker: {one[1] / two[1]:.2f}x faster (goal >= 1.7)")
    print(f"Ray 2 workers vs in-process 2 threads: {two[1] / base_s:.2f} of the in-process time (goal <= 1.10)")
    print(f"identical ranking on every run: {all(r.layers() == base_report.layers() for r, _, _ in runs.values())}")
    stats = two[2]
    n = len(stats.task_s)
    print(f"shipped once per run: {stats.shared_bytes / 1e6:.1f} MB (simulated model and batches, to the object "
          f"store); per task: {stats.task_bytes / n:.0f} B out, {stats.result_bytes / n:.0f} B back")

    # the model, fitted on the 1-worker run: T(N) = start-up + transfer + makespan(task times, N). Beyond as many
    # workers as batches, each batch's layers are split in groups and every group repeats the batch's float run.
    s1 = one[2]
    startup = s1.startup_s
    tasks = s1.task_s
    torch.set_num_threads(1)
    with torch.no_grad():
        t = time.perf_counter()
        for x in evals[:2]:
            sim.set_quantized(None, False)
            sim(x)
        ref_s = (time.perf_counter() - t) / 2
        sim.set_quantized(None, True)
    torch.set_num_threads(2)
    per_layer = (sum(tasks) / len(tasks) - ref_s) / layers
    transfer = stats.shared_bytes * 8 / args.bandwidth
    predicted_two = startup + makespan(tasks, 2)
    print(f"\nmodel: start-up {startup:.1f} s, a batch's float run {ref_s:.2f} s, {per_layer * 1000:.0f} ms per "
          f"layer-run per batch (1 thread); predicted 2-worker wall {predicted_two:.1f} s, measured {two[1]:.1f} s "
          f"({100 * (two[1] - predicted_two) / two[1]:+.0f} %)")
    print(f"N machines of 1 worker each (transfer {transfer:.1f} s per machine at {args.bandwidth / 1e9:g} Gb/s, "
          f"sent in parallel):")
    print("| workers | groups per batch | tasks | predicted wall s | speed-up vs 1 |")
    print("|---:|---:|---:|---:|---:|")
    t1 = startup + makespan(tasks, 1)
    for workers in (1, 2, 4, 8, 16, 32):
        groups = 1 if workers == 1 else math.ceil(2 * workers / len(evals))
        durations = [ref_s + per_layer * layers / groups] * (len(evals) * groups)
        wall = startup + (transfer if workers > 1 else 0.0) + makespan(durations, workers)
        print(f"| {workers} | {groups} | {len(durations)} | {wall:.1f} | {t1 / wall:.2f} |")


if __name__ == "__main__":
    main()
