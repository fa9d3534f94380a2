"""Real EfficientNet-Lite0 through ONNX: float export vs PyTorch, QDQ export vs our simulation.

For each exported model: file size, nodes before/after onnxsim, max error (absolute, and in output
quantization steps for QDQ), top-1 agreement with PyTorch, and top-1 against the labels, on images the
calibration did not see. onnxruntime runs each file twice: optimizations off (the file's exact Q/DQ
arithmetic in float32, compared with the float simulation) and its default optimizations (its own fused
integer kernels, compared with the integer-exact simulation, ``qsurgery.integer_model``). Weights stored as
uint8 + 128 (the same values) let onnxruntime on x86 without VNNI use exact uint8 x uint8 kernels; 7-bit
weights (its reduce_range) are the other way. Finally the float32 noise floor: the float simulation against
itself at batch size 1 instead of 25 (PyTorch picks other convolution algorithms, so sums are added in another
order), the agreement no float32 runtime can be expected to beat.

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

    int8 = qsurgery.QuantConfig.int8()
    plans = [  # (name, config, opset, uint8_weights)
        ("int8 (W8 per-channel / A8 min-max)", int8, 17, False),
        ("int8, weights stored uint8 + 128", int8, 17, True),
        ("int8 u8-stored, conv_stem + blocks.0.0.conv_dw float",
         int8.override("conv_stem", dtype="float").override("blocks.0.0.conv_dw", dtype="float"), 17, True),
        ("int8 u8-stored, blocks.0.0.conv_dw int16", int8.override("blocks.0.0.conv_dw", bits=16), 21, True),
        ("int8, 7-bit weights (ORT x86 reduce_range)", int8.override("*", weight_bits=7), 17, False),
    ]
    print("\nexact = onnxruntime with optimizations off (the file's Q/DQ arithmetic in float32) vs the float "
          "simulation;\nORT = onnxruntime's default session (its fused integer kernels) vs the integer-exact "
          "simulation (qsurgery.integer_model);\nsteps = max |difference| in output quantization steps, agree = "
          "top-1 agreement")
    print(f"\n| {'QDQ model':<52} | opset | MB   | nodes (sim) | Q/DQ | int W | int units | exact: steps / agree | "
          "ORT: steps / agree | int sim vs sim | top-1 sim / int sim / exact / ORT |")
    print(f"|{'-' * 54}|------:|-----:|------------:|-----:|------:|----------:|---------------------:|"
          "-------------------:|---------------:|----------------------------------:|")
    for i, (name, cfg, opset, u8) in enumerate(plans):
        sim, plan = qsurgery.quantize(graph, calib, cfg, progress=False)
        twin = qsurgery.integer_model(sim)
        with torch.no_grad():
            s_out = torch.cat([sim(xe[j:j + bs]) for j in range(0, len(xe), bs)]).numpy()
            i_out = torch.cat([twin(xe[j:j + bs]) for j in range(0, len(xe), bs)]).numpy()
        path = out / f"lite0_qdq_{i}.onnx"
        rep = export_onnx(sim, path, xc[:1], opset=opset, verify=False, uint8_weights=u8,
                          calib_ranges_json=out / f"lite0_qdq_{i}_ranges.json")
        step = plan.layers[-1].scale
        exact = run_onnx(path, xe, bs, optimize=False)
        fast = run_onnx(path, xe, bs, optimize=True)

        c_exact, c_fast = compare(exact, s_out, step), compare(fast, i_out, step)
        twin_agree = f"{100 * (i_out.argmax(1) == s_out.argmax(1)).mean():6.2f} %"
        print(f"| {name:<52} | {opset:5d} | {rep.size_bytes / 1e6:4.2f} | {rep.nodes_before:4d} -> "
              f"{rep.nodes_after:4d} | {rep.qdq_pairs:4d} | {rep.int_weights:5d} | {len(twin.integer_units):9d} | "
              f"{c_exact:>20} | {c_fast:>18} | {twin_agree:>14} | "
              f"{top1(s_out, ye):.2f} / {top1(i_out, ye):.2f} / {top1(exact, ye):.2f} / {top1(fast, ye):.2f} |",
              flush=True)
        if set(twin.float_units) - {"classifier"}:  # float32 on both sides, in different kernels
            print(f"  float units of the integer simulation: {twin.float_units}")
        if i == 0:
            with torch.no_grad():
                one = torch.cat([sim(xe[j:j + 1]) for j in range(len(xe))]).numpy()
            noise_floor = compare(one, s_out, step)

    print(f"\nfloat32 noise floor (int8 simulation at batch size 1 vs 25): {noise_floor}", flush=True)


if __name__ == "__main__":
    main()
