"""Compact loaders for two COCO detectors (no darknet or ultralytics dependency), with their decoding.

``darknet.load(cfg, weights)`` reads a darknet cfg + weights file (Yolo-Fastest, YOLOv3/v4-tiny style);
``yolov5.load(state_dict_path)`` rebuilds YOLOv5n and loads its state_dict. Both models return the raw head
maps (one per detection level) so that every quantization variant shares one ``decode``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass
class Detector:
    """A loaded detector with what evaluating it needs: decoding, input size, and resize style."""

    name: str
    model: nn.Module
    decode: Callable
    size: int
    stretch: bool  # plain resize (darknet) instead of letterbox (YOLOv5)


def load_detector(name: str, weights: str | Path | None = None) -> Detector:
    """``yolo-fastest`` (darknet cfg + weights; ``weights`` = the folder or the .weights file, the .cfg beside
    it) or ``yolov5n`` (``weights`` = the state_dict file or its folder)."""
    from . import darknet, yolov5

    if name == "yolo-fastest":
        path = Path(weights) if weights else SHARED / "yolo-fastest"
        weights_file = next(path.glob("*.weights")) if path.is_dir() else path
        cfg = weights_file.with_suffix(".cfg")
        model = darknet.load(cfg, weights_file)
        return Detector(name, model, darknet.decoder(model), model.width, True)
    if name == "yolov5n":
        path = Path(weights) if weights else SHARED / "yolov5n"
        sd = next(path.glob("*.pt")) if path.is_dir() else path
        model = yolov5.load(sd)
        return Detector(name, model, yolov5.decoder(model), 640, False)
    raise ValueError(f"unknown detector {name!r}: yolo-fastest or yolov5n")


def yolo_fastest() -> Detector:
    """Yolo-Fastest-1.1-XL from ``../shared/data/yolo-fastest`` (for ``qsurgery repair --task detect --model
    examples.detectors:yolo_fastest``)."""
    return load_detector("yolo-fastest")


def yolov5n() -> Detector:
    """YOLOv5n from ``../shared/data/yolov5n``."""
    return load_detector("yolov5n")
