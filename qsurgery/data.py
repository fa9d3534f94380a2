"""Image data: a folder dataset (class sub-folders or a flat folder with labels.csv), the preprocessing a
timm model expects, built-in sample photos that need no download, and deterministic calib/eval splits.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import DataError

__all__ = ["ImageFolder", "model_transform", "sample_images", "split", "loader", "stack"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
NO_LABEL = -1


def model_transform(model: nn.Module | None = None, *, input_size: int | None = None) -> Callable:
    """The evaluation preprocessing timm resolves for ``model`` (resize, center crop, normalise)."""
    from timm.data import create_transform, resolve_data_config

    if model is not None:
        cfg = resolve_data_config({}, model=model)
    else:  # ImageNet defaults
        cfg = resolve_data_config({}, pretrained_cfg={"input_size": (3, 224, 224), "crop_pct": 0.875,
                                                      "interpolation": "bicubic"})
    if input_size is not None:
        cfg["input_size"] = (3, input_size, input_size)
    return create_transform(**cfg, is_training=False)


class ImageFolder(Dataset):
    """Images with labels from class sub-folders (sorted names -> 0..K-1) or a flat folder with ``labels.csv``
    (``file,class_index``; extra columns ignored). A flat folder without ``labels.csv`` yields label -1.

    Items are ``(transform(image), label)``; ``transform`` defaults to the timm preprocessing of ``model``.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, *, model: nn.Module | None = None,
                 limit: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        self.transform = transform or model_transform(model)
        self.samples = self._scan()
        if limit is not None:
            self.samples = self.samples[:limit]
        if not self.samples:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {self.root}")

    @property
    def labeled(self) -> bool:
        return all(label != NO_LABEL for _, label in self.samples)

    def _scan(self) -> list[tuple[Path, int]]:
        labels_csv = self.root / "labels.csv"
        if labels_csv.is_file():
            return self._read_csv(labels_csv)
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if classes:
            return [(p, i) for i, c in enumerate(classes) for p in sorted((self.root / c).rglob("*"))
                    if p.suffix.lower() in IMAGE_EXTENSIONS]
        return [(p, NO_LABEL) for p in sorted(self.root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]

    def _read_csv(self, path: Path) -> list[tuple[Path, int]]:
        samples = []
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "class_index"} <= set(reader.fieldnames):
                raise DataError(f"{path} must have the columns file,class_index (has {reader.fieldnames})")
            for line, row in enumerate(reader, start=2):
                try:
                    label = int(row["class_index"])
                except (TypeError, ValueError):
                    raise DataError(f"{path}:{line}: class_index {row['class_index']!r} is not an integer") from None
                file = self.root / row["file"]
                if not file.is_file():
                    raise DataError(f"{path}:{line}: image {row['file']} does not exist")
                samples.append((file, label))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        return self.transform(image), label


class _Crops(Dataset):
    def __init__(self, images: list[Image.Image], n: int, transform: Callable, seed: int):
        rng = random.Random(seed)
        self.items = []
        for i in range(n):
            img = images[i % len(images)]
            w, h = img.size
            side = int(min(w, h) * rng.uniform(0.45, 1.0))
            x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
            self.items.append((img, (x0, y0, x0 + side, y0 + side), rng.random() < 0.5))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, box, flip = self.items[index]
        crop = img.crop(box)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.transform(crop), NO_LABEL


def sample_images(n: int, transform: Callable, *, seed: int = 0) -> Dataset:
    """``n`` unlabeled images that need no download: random square crops (and flips) of the sample photos
    matplotlib ships. Good enough to calibrate and to measure float-vs-int8 agreement, not accuracy.
    """
    from matplotlib import cbook

    photos = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        try:
            with cbook.get_sample_data(name) as f:
                photos.append(Image.open(f).convert("RGB"))
        except (OSError, FileNotFoundError):
            continue
    if not photos:
        raise DataError("matplotlib's sample photos are missing; pass an image folder instead")
    return _Crops(photos, n, transform, seed)


def split(dataset: Dataset, n_calib: int, n_eval: int | None = None, *, seed: int = 0) -> tuple[Subset, Subset]:
    """Disjoint calibration and evaluation subsets, drawn by a seeded shuffle (reproducible)."""
    n = len(dataset)
    if n_calib <= 0 or n_calib >= n:
        raise DataError(f"need 0 < n_calib < {n} (the dataset size), got {n_calib}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    calib = order[:n_calib]
    rest = order[n_calib:]
    if n_eval is not None:
        rest = rest[:n_eval]
    return Subset(dataset, sorted(calib)), Subset(dataset, sorted(rest))


def loader(dataset: Dataset, batch_size: int = 32, *, workers: int = 0) -> DataLoader:
    """A deterministic (unshuffled) DataLoader of ``(images, labels)`` batches."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def stack(dataset: Dataset | Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a (small) dataset as one image tensor and one label tensor."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)
