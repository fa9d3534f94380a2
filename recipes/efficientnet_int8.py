"""Recipe: the cheapest int8 EfficientNet / MobileNet for a device, within an accuracy budget.

Copy this file and edit the choices at the top: the device target, the budget, which remedies the engine may
use (in the order it prefers when their expected gains tie), and the price a step that costs must pay.
Everything else is the engine: calibrate, measure on selection images, try remedies, keep what measurably
helps, report on images it never decided on, save, export a verified QDQ ONNX.

    python recipes/efficientnet_int8.py --data path/to/labelled/images --out out/lite0
    python recipes/efficientnet_int8.py              # built-in sample photos, agreement with float
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import qsurgery
from qsurgery.data import ImageFolder, model_transform, sample_images, split, stack
from qsurgery.models import efficientnet_lite0

TARGET = "per-tensor-int8"            # the device: see qsurgery.TARGETS, or qsurgery.Target(...) for your own
BUDGET = 1.0                          # points of top-1 (or of agreement with float, without labels)
REMEDIES = ["equalize", "bias_correction", "observer", "learned_rounding", "precision"]  # what may be used
# also: "dw_to_dense" (a dense conv in place of a depthwise-separable unit; each trial refits the steps above,
# minutes), "prune_channels" (with qsurgery.Budget(..., max_cost=1.0): pays for what the cap refuses)
PRICE = 1.0                           # a wider or float layer must take this many % off the KL per % of cost


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="labelled image folder (class sub-folders or labels.csv)")
    ap.add_argument("--calib", type=int, default=64, help="calibration images")
    ap.add_argument("--out", type=Path, default=Path("out/efficientnet_int8"))
    args = ap.parse_args()

    model = efficientnet_lite0()                       # your model here: any nn.Module
    transform = model_transform(model)
    if args.data:
        calib_set, eval_set = split(ImageFolder(args.data, transform), args.calib)
        metric = "top1"
    else:
        calib_set, eval_set = sample_images(args.calib, transform, seed=1), sample_images(96, transform, seed=2)
        metric = "agreement"
    calib, _ = stack(calib_set)
    images, labels = stack(eval_set)
    evaluation = (images, labels) if metric == "top1" else images

    target = qsurgery.get_target(TARGET)
    allowed = [r for r in REMEDIES if qsurgery.REMEDIES[r].forbidden_on(target) is None]
    result = qsurgery.repair(model, [calib[i:i + 32] for i in range(0, len(calib), 32)], evaluation,
                             budget=qsurgery.Budget(BUDGET, metric), target=target, remedies=allowed,
                             min_gain_per_cost=PRICE, out_dir=args.out)
    print(result.headline())
    report = result.export_onnx(args.out / "model_qdq.onnx", calib[:1], verify_inputs=[images[:16]])
    print(report.summary())
    print(f"record and model: {args.out}/ (repair.md, result/)")
    return 0 if result.reached else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
