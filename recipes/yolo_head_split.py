"""Recipe: repair a YOLO-style detector's int8 accuracy by splitting its head convs per channel group.

capture -> int8 simulation -> find the head convs (and how many bits their channels lose to one shared
scale) -> ``split_head`` -> int8 simulation again -> mAP of float / int8 / int8+split -> QDQ ONNX export,
verified against the simulation and scored again in onnxruntime. The split is kept where it scores at least
as well as plain int8 on the calibration images (the script reports mAP on the other images).

Fused heads (YOLOv3/v5, Yolo-Fastest: one conv = anchors x (box | obj | classes)) are split by channel
group. Decoupled heads (YOLOX, YOLOv8) already have one conv per task, each with its own scale; what
breaks them is the concat that joins box, objectness and classes into one tensor and requantizes it with
one scale. For those the recipe keeps that concat float (not requantized) instead of splitting.

As a script, on the two detectors whose loaders ship in ``examples/detectors``::

    python recipes/yolo_head_split.py --detector yolo-fastest --weights ../shared/data/yolo-fastest \\
        --data ../shared/data/coco128 --out out/yolo-fastest
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

import qsurgery
from qsurgery.graph import find_units, is_float_tensor_node
from qsurgery.passes import PassResult, find_heads, split_head
from qsurgery.quant.config import OBSERVERS


def decoupled_head_concats(graph: fx.GraphModule, heads: list[str]) -> list[str]:
    """Quantized units that concatenate several head convs' outputs (decoupled heads): keep them float."""
    head_nodes = {n.name for n in graph.graph.nodes if n.op == "call_module" and n.target in heads}
    names = []
    for unit in find_units(graph):
        node = next(n for n in graph.graph.nodes if n.name == unit.anchor)
        if unit.kind == "cat" and is_float_tensor_node(node):
            fed = [a for a in node.args[0] if isinstance(a, fx.Node)] if node.args else []
            if sum(_upstream_head(a, head_nodes) for a in fed) >= 2:
                names.append(unit.name)
    return names


def _upstream_head(node: fx.Node, head_nodes: set[str]) -> bool:
    """Whether ``node`` is a head conv's output, possibly through layout ops and activations."""
    while node.name not in head_nodes:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.op not in ("call_function", "call_method", "call_module") or len(args) != 1:
            return False
        node = args[0]
    return True


def yolo_head_split(model: torch.nn.Module, example: torch.Tensor, calib: Any,
                    evaluate: Callable[[Callable], float], *, groups: Any = "yolo", merge: str = "outputs",
                    score_floor: float | None = None, config: qsurgery.QuantConfig | None = None,
                    out: str | Path | None = None,
                    verify_inputs: list[torch.Tensor] | None = None, log: Callable[[str], None] = print,
                    select: Callable[[Callable], float] | None = None, uint8_weights: bool = False
                    ) -> dict[str, Any]:
    """Run the recipe. ``evaluate(fn)`` scores a function batch -> model outputs (in the original output
    structure), e.g. COCO mAP. The split is kept (and exported) only if it scores at least as well as plain
    int8 by ``select`` (default: ``evaluate``); give a ``select`` on other images than ``evaluate`` (e.g. the
    calibration images) so the decision does not look at the images you report on. Returns the figures, the
    split PassResult (None if not kept) and the simulated models."""
    config = config or qsurgery.QuantConfig.int8()
    t0 = time.perf_counter()
    graph = qsurgery.capture(model, example)
    figures: dict[str, Any] = {"float": evaluate(graph)}
    log(f"float: {figures['float']:.4f}")
    sim, _ = qsurgery.quantize(graph, calib, config, progress=False)
    figures["int8"] = evaluate(sim)
    log(f"int8: {figures['int8']:.4f}")
    candidates = find_heads(graph, calib)
    figures["heads"] = candidates
    for c in candidates:
        log(f"head {c['conv']}: {c['channels']} channels, {c['bits_lost']:.2f} bits lost to one shared scale")
    concats = decoupled_head_concats(graph, [c["conv"] for c in candidates])
    result: PassResult | None = None
    if concats:
        log(f"decoupled head: keeping the concat(s) {concats} float instead of splitting")
        split_config = config
        for name in concats:
            split_config = split_config.override(name, dtype="float")
        split_graph, merge_fn = graph, None
    else:
        result = split_head(graph, groups=groups, merge=merge, calib_data=calib, score_floor=score_floor)
        log(result.summary())
        split_config, split_graph, merge_fn = config, result.graph, result.merge_outputs
    sim_split, plan = qsurgery.quantize(split_graph, calib, split_config, progress=False)

    def merged(x):
        y = sim_split(x)
        return merge_fn(y) if merge_fn else y

    figures["int8_split"] = evaluate(merged)
    log(f"int8 + split: {figures['int8_split']:.4f}")
    if select is None:
        figures["split_kept"] = figures["int8_split"] >= figures["int8"]
    else:
        figures["select_int8"], figures["select_int8_split"] = select(sim), select(merged)
        log(f"selection data: int8 {figures['select_int8']:.4f}, int8 + split {figures['select_int8_split']:.4f}")
        figures["split_kept"] = figures["select_int8_split"] >= figures["select_int8"]
    if not figures["split_kept"]:
        log("the split did not help on the selection data: exporting the unsplit int8 model")
        sim_split, plan, result, merge_fn = sim, sim.plan, None, None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plan.to_json(out / "plan.json")
        name = "model_int8_split.onnx" if figures["split_kept"] else "model_int8.onnx"
        report = qsurgery.export_onnx(sim_split, out / name, example, qdq=True,
                                      verify_inputs=verify_inputs, uint8_weights=uint8_weights,
                                      output_names=result.output_names if result else None)
        log(report.summary())  # size, Q/DQ pairs, both onnxruntime comparisons, the noise floor, fixes
        figures["onnx"] = str(report.path)
        figures["onnx_int8_split"] = evaluate(_onnx_runner(report.path, merge_fn))
        log(f"exported model, QDQ ONNX in onnxruntime: {figures['onnx_int8_split']:.4f}")
    figures["seconds"] = time.perf_counter() - t0
    log(f"recipe wall time {figures['seconds']:.0f} s")
    return {"figures": figures, "split": result, "sim": sim, "sim_split": sim_split}


def _onnx_runner(path: Path, merge_fn: Callable | None) -> Callable:
    """The exported file as a batch -> outputs function (onnxruntime, Q/DQ arithmetic as written)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor):
        ys = [torch.from_numpy(y) for y in session.run(None, {name: x.cpu().numpy()})]
        return merge_fn(ys) if merge_fn else (ys if len(ys) > 1 else ys[0])

    return run


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.detectors import load_detector
    from qsurgery.detection import CocoImages, coco_map

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", choices=["yolo-fastest", "yolov5n"], default="yolo-fastest")
    ap.add_argument("--weights", help="weights file or folder (default: ../shared/data/<detector>)")
    ap.add_argument("--data", default="../shared/data/coco128", help="COCO folder: train2017/ + annotations/")
    ap.add_argument("--out", default=None, help="folder for the QDQ ONNX and the plan")
    ap.add_argument("--groups", default="yolo", help="yolo | yolo-xywh | auto")
    ap.add_argument("--merge", default="outputs", choices=["outputs", "float_concat"])
    ap.add_argument("--score-floor", type=float, default=None,
                    help="logit where the score groups' int8 range starts (yolo groupings; e.g. -8)")
    ap.add_argument("--observer", default="minmax", choices=OBSERVERS,
                    help="activation range observer of the int8 simulation")
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--uint8-weights", action="store_true",
                    help="store int8 weights as uint8 + 128 (exact in onnxruntime on x86 CPUs without VNNI)")
    args = ap.parse_args()

    det = load_detector(args.detector, args.weights)
    data = CocoImages(Path(args.data) / "train2017")
    calib_images = data.subset(range(args.n_calib))
    calib = calib_images.calibration(det.size, 8, stretch=det.stretch)
    held_out = data.subset(range(args.n_calib, len(data)))

    def evaluate(fn, images=held_out):
        return coco_map(fn, images, det.decode, size=det.size, stretch=det.stretch, progress=False).map

    res = yolo_head_split(det.model, torch.zeros(1, 3, det.size, det.size), calib, evaluate, groups=args.groups,
                          merge=args.merge, score_floor=args.score_floor, out=args.out, verify_inputs=calib[:2],
                          config=qsurgery.QuantConfig.int8(observer=args.observer),
                          select=lambda fn: evaluate(fn, calib_images),
                          uint8_weights=args.uint8_weights)
    f = res["figures"]
    print(json.dumps({k: v for k, v in f.items() if k != "heads"}, indent=1))


if __name__ == "__main__":
    main()
