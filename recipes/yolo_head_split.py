"""Recipe: repair a YOLO-style detector for an int8 device to an mAP budget, on the recipe engine.

A file to copy and edit. The engine measures float and plain int8 mAP on selection images, then tries the
remedies below: it splits fused heads (YOLOv3/v5, Yolo-Fastest: one conv = anchors x (box | obj | classes))
per channel group, or moves the output concat of decoupled heads (YOLOX, YOLOv8: separate box and class
branches) to the host, so that each part gets its own int8 scale; then observers, equalization, bias
correction, learned rounding and, where the target allows, 16-bit layers. It keeps a change only when the
selection mAP rises, and reports on images it never decided on. The split parts are separate outputs of the
QDQ file, in int8; ``result.merge_outputs`` joins them on the host for your post-processing.

    python recipes/yolo_head_split.py --detector yolo-fastest --data ../shared/data/coco128 --out out/yolo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import qsurgery
from qsurgery.detection import CocoImages, DetectionMetric

# what to edit: the device, the budget, which remedies and how many trials
TARGET = "full-int8"  # every layer int8; "int8-int16" lets the engine widen layers, priced on the device
BUDGET = 1.0  # mAP@0.5:0.95 points below float
REMEDIES = ["split_head", "observer", "equalize", "bias_correction", "learned_rounding", "precision"]
MAX_TRIALS = 12


def repair_detector(model: torch.nn.Module, decode, images: str | Path, *, size: int, stretch: bool = False,
                    n_calib: int = 32, n_select: int = 32, target: str = TARGET, budget: float = BUDGET,
                    out: str | Path | None = None) -> qsurgery.RepairResult:
    """Repair ``model`` (raw head outputs, turned into boxes by ``decode``) on the COCO-style ``images`` folder:
    the first ``n_calib`` images calibrate, the next ``n_select`` decide, the rest report."""
    metric = DetectionMetric(CocoImages(images), decode, size=size, stretch=stretch)
    x, positions = metric.images()
    calib = [x[i:i + 8] for i in range(0, n_calib, 8)]
    select = slice(n_calib, n_calib + n_select)
    report = slice(n_calib + n_select, len(x))
    remedies = [r for r in REMEDIES if not qsurgery.REMEDIES[r].forbidden_on(qsurgery.get_target(target))]
    result = qsurgery.repair(model, calib, (x[select], positions[select]), report_data=(x[report], positions[report]),
                             budget=qsurgery.Budget(budget, metric), target=target, remedies=remedies,
                             max_trials=MAX_TRIALS, batch_size=8)
    if out is not None:
        out = Path(out)
        result.save(out / "result")
        (out / "report.md").write_text(result.to_markdown())
        print(result.export_onnx(out / "model_qdq.onnx", x[:1], verify_inputs=[x[:8]], uint8_weights=True).summary())
    return result


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.detectors import load_detector

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", choices=["yolo-fastest", "yolov5n"], default="yolo-fastest")
    ap.add_argument("--weights", help="weights file or folder (default: ../shared/data/<detector>)")
    ap.add_argument("--data", default="../shared/data/coco128", help="COCO folder: train2017/ + annotations/")
    ap.add_argument("--target", default=TARGET)
    ap.add_argument("--budget", type=float, default=BUDGET)
    ap.add_argument("--out", default=None, help="folder for the saved model, report and QDQ ONNX")
    args = ap.parse_args()
    det = load_detector(args.detector, args.weights)
    result = repair_detector(det.model, det.decode, Path(args.data) / "train2017", size=det.size,
                             stretch=det.stretch, target=args.target, budget=args.budget, out=args.out)
    print(result.headline())


if __name__ == "__main__":
    main()
