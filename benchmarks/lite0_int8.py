"""Real EfficientNet-Lite0 under int8 simulation: qsurgery's schemes vs torch.ao reference simulation.

Prints float top-1, and for every scheme int8 top-1 and top-1 agreement with float on images disjoint
from the calibration images; then float vs simulated throughput in the same run.

    python benchmarks/lite0_int8.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from _lite0 import load_lite0

import qsurgery


def batches(x: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [x[i:i + bs] for i in range(0, len(x), bs)]


@torch.no_grad()
def logits(model, x, bs):
    return torch.cat([model(b) for b in batches(x, bs)])


def torch_ao(graph, calib, scheme: str):
    """torch.ao FX reference-mode simulation of the same scheme, on the same captured graph."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    act = (HistogramObserver if scheme == "hist" else MinMaxObserver).with_args(
        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    if scheme == "per_tensor":
        weight = MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                          quant_min=-127, quant_max=127)
    else:
        weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                    quant_min=-127, quant_max=127)
    mapping = QConfigMapping().set_global(QConfig(activation=act, weight=weight))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(graph), mapping, example_inputs=(calib[0][:1],))
        with torch.no_grad():
            for b in calib:
                prepared(b)
        return convert_to_reference_fx(prepared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="image folder with labels.csv (imagenet-sample-dev)")
    ap.add_argument("--calib", type=int, default=100, help="calibration images (the rest are evaluated)")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--no-torch-ao", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    t0 = time.perf_counter()
    d = load_lite0(args.data, args.calib, args.batch_size)
    model, graph, xc, xe, ye, calib = d.model, d.graph, d.xc, d.xe, d.ye, d.calib
    print(f"# EfficientNet-Lite0 (real weights), {len(xc)} calibration / {len(xe)} evaluation images "
          f"(disjoint, seeded split); set-up {time.perf_counter() - t0:.1f} s")
    ref = logits(graph, xe, args.batch_size)
    f_top1 = qsurgery.top1(ref, ye)
    print(f"float top-1: {100 * f_top1:.2f} %\n")
    print(f"| {'scheme':<52} | int8 top-1 | drop (pt) | agreement | calib s |")
    print(f"|{'-' * 54}|-----------:|----------:|----------:|--------:|")

    def row(name, out, secs):
        t1 = qsurgery.top1(out, ye)
        print(f"| {name:<52} | {100 * t1:9.2f}  | {100 * (f_top1 - t1):8.2f}  | "
              f"{100 * qsurgery.agreement(ref, out):8.2f}  | {secs:7.1f} |", flush=True)

    schemes = [
        ("(a) W8 per-channel / A8 min-max", qsurgery.QuantConfig.int8()),
        ("(b) W8 per-channel / A8 percentile 99.99", qsurgery.QuantConfig.int8(observer="percentile")),
        ("(b) W8 per-channel / A8 MSE", qsurgery.QuantConfig.int8(observer="mse")),
        ("(b) W8 per-channel / A8 entropy (KL)", qsurgery.QuantConfig.int8(observer="entropy")),
        ("(c) W8 per-tensor / A8 min-max", qsurgery.QuantConfig.int8(per_channel=False)),
        ("pow2-int8 (DPU-like, symmetric, power-of-two)", qsurgery.QuantConfig.pow2_int8()),
    ]
    sim_a = None
    for name, cfg in schemes:
        t = time.perf_counter()
        sim, _plan = qsurgery.quantize(graph, calib, cfg, progress=False)
        secs = time.perf_counter() - t
        sim_a = sim_a or sim
        row("qsurgery " + name, logits(sim, xe, args.batch_size), secs)
    if not args.no_torch_ao:
        for name, scheme in (("(a) W8 per-channel / A8 min-max", "minmax"),
                             ("(b) W8 per-channel / A8 histogram", "hist"),
                             ("(c) W8 per-tensor / A8 min-max", "per_tensor")):
            t = time.perf_counter()
            try:
                ao = torch_ao(graph, calib, scheme)
            except Exception as exc:  # report, don't hide
                print(f"| torch.ao {name:<43} | failed: {type(exc).__name__}: {str(exc)[:60]}")
                continue
            row("torch.ao " + name + " (on our graph)", logits(ao, xe, args.batch_size), time.perf_counter() - t)
        try:
            torch_ao(model, calib, "minmax")
            print("| torch.ao directly on the timm model: traced")
        except Exception as exc:
            first = str(exc).splitlines()[0][:70]
            print(f"| torch.ao directly on the timm model: fails ({type(exc).__name__}: {first})")

    # throughput: float graph vs simulated, alternated, median of 3
    runs = {"float": [], "simulated": []}
    for _ in range(3):
        for key, m in (("float", graph), ("simulated", sim_a)):
            t = time.perf_counter()
            logits(m, xe, args.batch_size)
            runs[key].append(len(xe) / (time.perf_counter() - t))
    f_ips, s_ips = statistics.median(runs["float"]), statistics.median(runs["simulated"])
    print(f"\nthroughput (batch {args.batch_size}, {torch.get_num_threads()} threads, median of 3): float "
          f"{f_ips:.1f} img/s, simulated int8 {s_ips:.1f} img/s, overhead {f_ips / s_ips:.2f}x")


if __name__ == "__main__":
    main()
