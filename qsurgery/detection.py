"""Detection evaluation: COCO-format images and boxes, letterbox preprocessing, NMS, and COCO mAP.

The mAP is our own implementation of the COCO protocol (IoU 0.50:0.95, 101-point interpolated precision,
100 detections per image and class, crowd boxes ignored), checked against pycocotools in the tests, so the
library needs no extra dependency to score a detector.

A detector is anything callable on a batch of images; ``decode`` turns its outputs into, per image, rows of
``(cx, cy, w, h, score_class_0, ..., score_class_K-1)`` in input pixels. Every float/int8/split variant of a
model is scored through the same preprocessing, decoding and NMS.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import DataError
from .evaluate import take

__all__ = ["CocoImages", "letterbox", "nms", "coco_map", "coco_eval", "DetectionReport", "DetectionMetric"]


class CocoImages:
    """Images of a folder with their COCO-json boxes. ``categories`` are the COCO category ids in sorted
    order, so class index ``k`` of an 80-class detector is ``categories[k]`` (the usual COCO-80 order)."""

    def __init__(self, images: str | Path, annotations: str | Path | None = None, *, limit: int | None = None):
        self.root = Path(images)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        if annotations is None:
            found = sorted((self.root.parent / "annotations").glob("*.json"))
            if not found:
                raise DataError(f"no annotations given and none found in {self.root.parent / 'annotations'}")
            annotations = found[0]
        self.annotation_file = Path(annotations)
        if not self.annotation_file.is_file():
            raise DataError(f"annotation file {self.annotation_file} does not exist")
        data = json.loads(self.annotation_file.read_text())
        if not {"images", "annotations", "categories"} <= set(data):
            raise DataError(f"{self.annotation_file} is not COCO json (needs images, annotations, categories)")
        self.categories = sorted(c["id"] for c in data["categories"])
        self.category_names = {c["id"]: c["name"] for c in data["categories"]}
        images_meta = sorted(data["images"], key=lambda m: m["file_name"])
        images_meta = [m for m in images_meta if (self.root / m["file_name"]).is_file()]
        if limit is not None:
            images_meta = images_meta[:limit]
        if not images_meta:
            raise DataError(f"none of the images listed in {self.annotation_file} is in {self.root}")
        self.images = images_meta
        ids = {m["id"] for m in images_meta}
        self.annotations = [a for a in data["annotations"] if a["image_id"] in ids]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> CocoImages:
        """The same data set restricted to ``indices`` (annotations follow)."""
        sub = object.__new__(CocoImages)
        sub.__dict__.update(self.__dict__)
        sub.images = [self.images[i] for i in indices]
        ids = {m["id"] for m in sub.images}
        sub.annotations = [a for a in self.annotations if a["image_id"] in ids]
        return sub

    def image(self, i: int) -> Image.Image:
        return Image.open(self.root / self.images[i]["file_name"]).convert("RGB")

    def batches(self, size: int, batch_size: int = 8, *, stretch: bool = False, progress: bool = False,
                desc: str = "images") -> Iterator[tuple[torch.Tensor, list[dict]]]:
        """Preprocessed batches ``(images, infos)``: RGB in [0, 1], ``size`` x ``size`` (letterboxed, or plainly
        resized with ``stretch``); each info holds the image id, original size and the letterbox transform."""
        order = range(0, len(self), batch_size)
        for start in tqdm(order, desc=desc, unit="batch", disable=not progress, leave=False):
            xs, infos = [], []
            for i in range(start, min(start + batch_size, len(self))):
                x, info = letterbox(self.image(i), size, stretch=stretch)
                info["image_id"] = self.images[i]["id"]
                xs.append(x)
                infos.append(info)
            yield torch.stack(xs), infos

    def calibration(self, size: int, batch_size: int = 8, *, stretch: bool = False) -> list[torch.Tensor]:
        """All images as preprocessed tensor batches (what ``qsurgery.quantize`` calibrates on)."""
        return [x for x, _ in self.batches(size, batch_size, stretch=stretch)]


def letterbox(image: Image.Image, size: int, *, stretch: bool = False, fill: int = 114
              ) -> tuple[torch.Tensor, dict]:
    """Resize to ``size`` x ``size`` keeping the aspect ratio and pad with grey (YOLOv5's letterbox), or
    resize plainly with ``stretch`` (darknet). Returns the CHW tensor in [0, 1] and how to map boxes back."""
    w0, h0 = image.size
    if stretch:
        img = image.resize((size, size), Image.BILINEAR)
        gain, pad = (size / w0, size / h0), (0.0, 0.0)
        canvas = img
    else:
        r = min(size / w0, size / h0)
        w, h = max(1, round(w0 * r)), max(1, round(h0 * r))
        img = image.resize((w, h), Image.BILINEAR) if (w, h) != (w0, h0) else image
        canvas = Image.new("RGB", (size, size), (fill, fill, fill))
        left, top = (size - w) // 2, (size - h) // 2
        canvas.paste(img, (left, top))
        gain, pad = (r, r), (float(left), float(top))
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return x, {"orig_size": (w0, h0), "gain": gain, "pad": pad}


def nms(predictions: torch.Tensor, *, conf: float = 0.001, iou: float = 0.6, max_det: int = 300,
        max_candidates: int = 30000) -> torch.Tensor:
    """Multi-label NMS of one image's ``(N, 4 + K)`` rows (cx, cy, w, h, class scores) -> ``(M, 6)`` rows
    ``(x1, y1, x2, y2, score, class)``, as YOLOv5 evaluates (every class above ``conf`` is a candidate)."""
    from torchvision.ops import batched_nms

    if predictions.dim() != 2 or predictions.shape[1] < 5:
        raise DataError(f"decoded predictions must be (N, 4 + classes) rows, got shape {tuple(predictions.shape)}")
    p = predictions.float()
    box = torch.cat([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1)
    i, j = (p[:, 4:] > conf).nonzero(as_tuple=True)
    scores = p[i, 4 + j]
    if scores.numel() > max_candidates:
        keep = scores.topk(max_candidates).indices
        i, j, scores = i[keep], j[keep], scores[keep]
    boxes = box[i]
    keep = batched_nms(boxes, scores, j, iou)[:max_det]
    return torch.cat([boxes[keep], scores[keep, None], j[keep, None].float()], 1)


@dataclass
class DetectionReport:
    """COCO box mAP@0.5:0.95 and mAP@0.5 (fractions), per-class AP@0.5:0.95, and what was scored."""

    map: float
    map50: float
    per_class: dict[int, float] = field(default_factory=dict)
    n_images: int = 0
    n_detections: int = 0

    def __str__(self) -> str:
        return (f"mAP@0.5:0.95 {100 * self.map:.1f}  mAP@0.5 {100 * self.map50:.1f}  ({self.n_images} images, "
                f"{self.n_detections} detections)")


def detect(model: Callable, data: CocoImages, decode: Callable[[Any], torch.Tensor], *, size: int,
           stretch: bool = False, conf: float = 0.001, iou: float = 0.6, max_det: int = 300, batch_size: int = 8,
           progress: bool = True, desc: str = "detecting") -> list[dict]:
    """Run ``model`` over ``data`` and return COCO-style result dicts (image_id, category_id, bbox, score)."""
    results: list[dict] = []
    device = _device(model)
    with torch.no_grad():
        for x, infos in data.batches(size, batch_size, stretch=stretch, progress=progress, desc=desc):
            decoded = decode(model(x.to(device)))
            if len(decoded) != len(infos):
                raise DataError(f"decode returned {len(decoded)} images for a batch of {len(infos)}")
            for pred, info in zip(decoded, infos):
                results += _results(pred, info, data.categories, conf, iou, max_det)
    return results


def _results(pred: torch.Tensor, info: dict, categories: list[int], conf: float, iou: float, max_det: int
             ) -> list[dict]:
    """One image's decoded rows -> NMS -> COCO result dicts, boxes mapped back to the original image."""
    det = nms(pred.cpu(), conf=conf, iou=iou, max_det=max_det)
    if det.numel() == 0:
        return []
    (gx, gy), (px, py), (w0, h0) = info["gain"], info["pad"], info["orig_size"]
    xyxy = det[:, :4].clone()
    xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - px) / gx).clamp(0, w0)
    xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - py) / gy).clamp(0, h0)
    out = []
    for (x1, y1, x2, y2), s, c in zip(xyxy.tolist(), det[:, 4].tolist(), det[:, 5].long().tolist()):
        if c >= len(categories):
            raise DataError(f"the detector predicts class {c}, the data set has {len(categories)} categories")
        out.append({"image_id": info["image_id"], "category_id": categories[c], "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": s})
    return out


class DetectionMetric:
    """COCO box mAP, in points, of a detector's raw outputs: the evaluator contract for detectors, so the
    recipe engine repairs them to an mAP budget (``Budget(max_drop=1.0, metric=DetectionMetric(...))``).

    ``images()`` gives the preprocessed images and their positions in ``data``; those positions are the
    "labels" the engine hands back with the outputs of any subset (selection or report part), so the metric
    scores each part against its own images' boxes. ``at50``: mAP@0.5 instead of mAP@0.5:0.95."""

    def __init__(self, data: CocoImages, decode: Callable[[Any], Any], *, size: int, stretch: bool = False,
                 at50: bool = False, conf: float = 0.001, iou: float = 0.6, max_det: int = 300):
        if not isinstance(data, CocoImages):
            raise DataError(f"DetectionMetric needs CocoImages (images with COCO boxes), got {type(data).__name__}")
        if not data.annotations:
            raise DataError(f"the {len(data)} image(s) of {data.root} have no boxes in {data.annotation_file}: "
                            "mAP cannot be measured")
        self.data, self.decode, self.size, self.stretch = data, decode, size, stretch
        self.at50, self.conf, self.iou, self.max_det = at50, conf, iou, max_det
        self.__name__ = "mAP@0.5" if at50 else "mAP@0.5:0.95"
        self._infos: list[dict] | None = None

    def images(self, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image preprocessed for the detector, and its position in ``data`` (the engine's labels)."""
        xs, infos = [], []
        for x, info in self.data.batches(self.size, batch_size, stretch=self.stretch):
            xs.append(x)
            infos += info
        self._infos = infos
        return torch.cat(xs), torch.arange(len(self.data))

    def __call__(self, outputs: Any, labels: torch.Tensor | None) -> float:
        report = self.report(outputs, labels)
        return 100 * (report.map50 if self.at50 else report.map)

    def distance(self, reference: Any, outputs: Any) -> float:
        """How far ``outputs`` are from the float ``reference`` outputs, as a detector sees them: the relative
        squared error of the decoded class scores plus that of the boxes, each box weighted by its float
        score (so background cells, whose raw logits dominate the raw maps, do not). The engine's soft signal
        for detectors: it sees a change long before mAP on a few dozen images does."""
        n = len(reference[0] if isinstance(reference, (list, tuple)) else reference)
        num_s = den_s = num_b = den_b = 0.0
        for start in range(0, n, 16):
            part = slice(start, start + 16)
            ref_rows, out_rows = self.decode(take(reference, part)), self.decode(take(outputs, part))
            for r, o in zip(ref_rows, out_rows):
                r, o = r.float(), o.float()
                if r.shape != o.shape:
                    raise DataError(f"decode gave {tuple(r.shape)} rows for the float outputs and {tuple(o.shape)} "
                                    "for the quantized ones: the distance needs every row (before thresholds)")
                w = r[:, 4:].amax(1)
                num_s += float((o[:, 4:] - r[:, 4:]).pow(2).sum())
                den_s += float(r[:, 4:].pow(2).sum())
                num_b += float((w * (o[:, :4] - r[:, :4]).pow(2).sum(1)).sum())
                den_b += float((w * r[:, :4].pow(2).sum(1)).sum())
        return num_s / max(den_s, 1e-12) + num_b / max(den_b, 1e-12)

    def report(self, outputs: Any, labels: torch.Tensor | None) -> DetectionReport:
        """Both mAPs (fractions) and per-class AP of ``outputs`` for the images at positions ``labels``."""
        if labels is None:
            raise DataError("DetectionMetric needs the images' positions as labels: pass metric.images() as the "
                            "evaluation data")
        if self._infos is None:
            self.images()
        idx = [int(i) for i in labels]
        if any(not 0 <= i < len(self.data) for i in idx):
            raise DataError(f"image positions must lie in 0..{len(self.data) - 1}")
        results: list[dict] = []
        for start in range(0, len(idx), 16):
            part = take(outputs, slice(start, start + 16))
            decoded = self.decode(part)
            for pred, i in zip(decoded, idx[start:start + 16]):
                results += _results(pred, self._infos[i], self.data.categories, self.conf, self.iou, self.max_det)
        return coco_eval(results, self.data.subset(idx))


def coco_map(model: Callable, data: CocoImages, decode: Callable[[Any], torch.Tensor], *, size: int,
             stretch: bool = False, conf: float = 0.001, iou: float = 0.6, max_det: int = 300, batch_size: int = 8,
             progress: bool = True, desc: str = "detecting") -> DetectionReport:
    """Box mAP of a detector on COCO-format data: preprocess (letterbox or ``stretch``), run, ``decode``,
    NMS, map boxes back to the original images, and score with the COCO protocol."""
    results = detect(model, data, decode, size=size, stretch=stretch, conf=conf, iou=iou, max_det=max_det,
                     batch_size=batch_size, progress=progress, desc=desc)
    return coco_eval(results, data)


def _iou_xywh(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of (D, 4) detections with (G, 4) ground truths, xywh; crowd boxes use the detection's area."""
    dx2, dy2 = d[:, 0] + d[:, 2], d[:, 1] + d[:, 3]
    gx2, gy2 = g[:, 0] + g[:, 2], g[:, 1] + g[:, 3]
    iw = (np.minimum(dx2[:, None], gx2[None]) - np.maximum(d[:, 0, None], g[None, :, 0])).clip(0)
    ih = (np.minimum(dy2[:, None], gy2[None]) - np.maximum(d[:, 1, None], g[None, :, 1])).clip(0)
    inter = iw * ih
    da, ga = d[:, 2] * d[:, 3], g[:, 2] * g[:, 3]
    union = np.where(crowd[None], da[:, None], da[:, None] + ga[None] - inter)
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def coco_eval(results: list[dict], data: CocoImages, *, max_dets: int = 100) -> DetectionReport:
    """COCO bbox evaluation (area 'all') of result dicts against ``data``'s annotations."""
    thresholds = np.linspace(0.5, 0.95, 10)
    recall_points = np.linspace(0, 1, 101)
    gts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    dts: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for a in data.annotations:
        gts[a["image_id"], a["category_id"]].append(a)
    for r in results:
        dts[r["image_id"], r["category_id"]].append(r)
    image_ids = [m["id"] for m in data.images]
    precision = -np.ones((len(thresholds), len(recall_points), len(data.categories)))
    for k, cat in enumerate(data.categories):
        scores, matched, ignored, n_gt = [], [], [], 0
        for img in image_ids:
            g = gts.get((img, cat), [])
            d = sorted(dts.get((img, cat), []), key=lambda r: -r["score"])[:max_dets]
            g_ignore = np.array([bool(a.get("iscrowd", 0)) or bool(a.get("ignore", 0)) for a in g], dtype=bool)
            order = np.argsort(g_ignore, kind="stable")
            g = [g[i] for i in order]
            g_ignore = g_ignore[order]
            n_gt += int((~g_ignore).sum())
            if not d:
                continue
            dm = np.zeros((len(thresholds), len(d)), dtype=bool)
            di = np.zeros((len(thresholds), len(d)), dtype=bool)
            if g:
                ious = _iou_xywh(np.array([r["bbox"] for r in d], dtype=np.float64),
                                 np.array([a["bbox"] for a in g], dtype=np.float64),
                                 np.array([bool(a.get("iscrowd", 0)) for a in g]))
                for t, thr in enumerate(thresholds):
                    gm = np.zeros(len(g), dtype=bool)
                    for di_, _ in enumerate(d):
                        best, m = min(thr, 1 - 1e-10), -1
                        for gi in range(len(g)):
                            if gm[gi] and not bool(g[gi].get("iscrowd", 0)):
                                continue
                            if m > -1 and not g_ignore[m] and g_ignore[gi]:
                                break
                            if ious[di_, gi] < best:
                                continue
                            best, m = ious[di_, gi], gi
                        if m == -1:
                            continue
                        dm[t, di_], di[t, di_] = True, g_ignore[m]
                        gm[m] = True
            scores.append(np.array([r["score"] for r in d]))
            matched.append(dm)
            ignored.append(di)
        if n_gt == 0:
            continue
        if not scores:
            precision[:, :, k] = 0
            continue
        s = np.concatenate(scores)
        order = np.argsort(-s, kind="mergesort")
        dm = np.concatenate(matched, 1)[:, order]
        di = np.concatenate(ignored, 1)[:, order]
        tps = np.cumsum(dm & ~di, 1).astype(float)
        fps = np.cumsum(~dm & ~di, 1).astype(float)
        for t in range(len(thresholds)):
            tp, fp = tps[t], fps[t]
            rc = tp / n_gt
            pr = tp / np.maximum(tp + fp, np.spacing(1))
            pr = np.maximum.accumulate(pr[::-1])[::-1] if len(pr) else pr
            q = np.zeros(len(recall_points))
            idx = np.searchsorted(rc, recall_points, side="left")
            valid = idx < len(pr)
            q[valid] = pr[idx[valid]]
            precision[t, :, k] = q
    has = precision[0, 0] > -1
    if not has.any():
        raise DataError("no ground-truth boxes to evaluate against")
    ap = precision[:, :, has].mean()
    ap50 = precision[0, :, has].mean()
    per_class = {cat: float(precision[:, :, k].mean()) for k, cat in enumerate(data.categories) if has[k]}
    return DetectionReport(float(ap), float(ap50), per_class, len(image_ids), len(results))


def _device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        from .graph import device_of

        return device_of(model)
    return torch.device("cpu")
