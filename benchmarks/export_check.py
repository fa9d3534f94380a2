"""Real EfficientNet-Lite0 through ONNX: float export vs PyTorch, QDQ export vs our simulation.

For each exported model: file size, nodes before/after onnxsim, max error (absolute, and in output
quantization steps for QDQ), top-1 agreement with PyTorch, and top-1 against the labels, on images the
calibration did not see. onnxruntime runs each file twice: optimizations off (the file's exact Q/DQ
arithmetic) and its default optimizations (its own fused integer kernels). The last row prices 7-bit weights,
which onnxruntime's integer kernels on x86 without VNNI need (its reduce_range). Finally the float32 noise
floor: the simulation against itself at batch size 1 instead of 25 (PyTorch picks other convolution
algorithms, so sums are added in another order), the agreement no float32 runtime can be expected to beat.

    python benchmarks/export_check.py --data ../shared/data/imagenet-sample-dev
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _lite0 import load_lite0

import qsurgery
from qsurgery.export import export_onnx


def run_onnx(path: Path, x: torch.Tensor, bs: int, optimize: bool) -> np.ndarray:
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i:i + bs].numpy()})[0] for i in range(0, len(x), bs)])


def compare(onnx_out: np.ndarray, sim_out: np.ndarray, step: float) -> str:
    """Max error in output steps / top-1 agreement with the simulation."""
    agree = 100 * (onnx_out.argmax(1) == sim_out.argmax(1)).mean()
    return f"{np.abs(onnx_out - sim_out).max() / step:6.2f} / {agree:6.2f} %"


def top1(out: np.ndarray, labels: torch.Tensor) -> float:
    return 100 * float((out.argmax(1) == labels.numpy()).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None, help="keep the ONNX files here (default: temporary)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="qsurgery-export-"))
    out.mkdir(parents=True, exist_ok=True)

    bs = args.batch_size
    d = load_lite0(args.data, args.calib, bs)
    graph, xc, xe, ye, calib = d.graph, d.xc, d.xe, d.ye, d.calib
    print(f"# EfficientNet-Lite0 (real weights): {len(xc)} calibration / {len(xe)} evaluation images; files in {out}")

    with torch.no_grad():
        f_out = torch.cat([graph(xe[i:i + bs]) for i in range(0, len(xe), bs)])
    t = time.perf_counter()
    rep = export_onnx(graph, out / "lite0_float.onnx", xc[:1], verify=False)
    o = run_onnx(rep.path, xe, bs, optimize=True)
    print(f"\nfloat ONNX: {rep.size_bytes / 1e6:.2f} MB, nodes {rep.nodes_before} -> {rep.nodes_after} (onnxsim), "
          f"export {time.perf_counter() - t:.1f} s")
    print(f"  max |onnxruntime - pytorch| = {np.abs(o - f_out.numpy()).max():.2e}; top-1 agreement "
          f"{100 * (o.argmax(1) == f_out.numpy().argmax(1)).mean():.2f} %; top-1 pytorch "
          f"{100 * qsurgery.top1(f_out, ye):.2f} %, onnx {100 * (o.argmax(1) == ye.numpy()).mean():.2f} %")

    plans = [
        ("int8 (W8 per-channel / A8 min-max)", qsurgery.QuantConfig.int8(), 17),
        ("int8, conv_stem + blocks.0.0.conv_dw float", qsurgery.QuantConfig.int8()
         .override("conv_stem", dtype="float").override("blocks.0.0.conv_dw", dtype="float"), 17),
        ("int8, blocks.0.0.conv_dw int16", qsurgery.QuantConfig.int8().override("blocks.0.0.conv_dw", bits=16), 21),
        ("int8, 7-bit weights (ORT x86 reduce_range)", qsurgery.QuantConfig.int8().override("*", weight_bits=7),
         17),
    ]
    print(f"\n| {'QDQ model':<44} | opset | MB   | nodes (sim) | Q/DQ | int W | exact: steps / agree | "
          "ORT int kernels: steps / agree | top-1 sim / exact / ORT |")
    print(f"|{'-' * 46}|------:|-----:|------------:|-----:|------:|---------------------:|"
          "-------------------------------:|------------------------:|")
    for i, (name, cfg, opset) in enumerate(plans):
        sim, plan = qsurgery.quantize(graph, calib, cfg, progress=False)
        with torch.no_grad():
            s_out = torch.cat([sim(xe[j:j + bs]) for j in range(0, len(xe), bs)]).numpy()
        path = out / f"lite0_qdq_{i}.onnx"
        rep = export_onnx(sim, path, xc[:1], opset=opset, verify=False,
                          calib_ranges_json=out / f"lite0_qdq_{i}_ranges.json")
        step = plan.layers[-1].scale
        exact = run_onnx(path, xe, bs, optimize=False)
        fast = run_onnx(path, xe, bs, optimize=True)

        c_exact, c_fast = compare(exact, s_out, step), compare(fast, s_out, step)
        print(f"| {name:<44} | {opset:5d} | {rep.size_bytes / 1e6:4.2f} | {rep.nodes_before:4d} -> "
              f"{rep.nodes_after:4d} | {rep.qdq_pairs:4d} | {rep.int_weights:5d} | {c_exact:>20} | {c_fast:>30} | "
              f"{top1(s_out, ye):.2f} / {top1(exact, ye):.2f} / {top1(fast, ye):.2f} |", flush=True)
        if i == 0:
            with torch.no_grad():
                one = torch.cat([sim(xe[j:j + 1]) for j in range(len(xe))]).numpy()
            noise_floor = compare(one, s_out, step)

    print(f"\nfloat32 noise floor (int8 simulation at batch size 1 vs 25): {noise_floor}", flush=True)


if __name__ == "__main__":
    main()
