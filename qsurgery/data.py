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

__all__ = ["ImageFolder", "model_transform", "sample_images", "split", "loader", "stack", "distill_images"]

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
        self.classes: list[str] | None = None  # class sub-folder names, in label order
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
            self.classes = classes
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


def _pixel_bounds(model: nn.Module, pixel_range: str | tuple | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel ``(lo, hi)`` as ``(1, C, 1, 1)`` tensors, or None for unbounded pixels."""
    if pixel_range is None:
        return None
    if isinstance(pixel_range, str):
        if pixel_range != "auto":
            raise DataError(f"pixel_range must be 'auto', None or (lo, hi), got {pixel_range!r}")
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if "mean" not in cfg or "std" not in cfg:
            return None
        mean = torch.tensor(cfg["mean"], dtype=torch.float32)
        std = torch.tensor(cfg["std"], dtype=torch.float32)
        lo, hi = -mean / std, (1 - mean) / std
    else:
        try:
            lo, hi = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in pixel_range)
        except (TypeError, ValueError) as exc:
            raise DataError(f"pixel_range must be 'auto', None or (lo, hi), got {pixel_range!r}") from exc
        if not bool((hi > lo).all()):
            raise DataError(f"pixel_range needs lo < hi, got {pixel_range!r}")
    return lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)


def distill_images(model: nn.Module, n: int, *, size: int | tuple[int, int] = 224, steps: int = 40,
                   batch_size: int = 32, lr: float = 0.25, smoothness: float = 0.05, seed: int = 0,
                   pixel_range: str | tuple | None = "auto", cache_dir: str | Path | None = None,
                   progress: bool = True) -> torch.Tensor:
    """``n`` calibration images generated from the model itself, no data needed (ZeroQ-style).

    Random inputs are optimised so that the batch statistics entering every BatchNorm layer match its running
    mean and standard deviation, with a total-variation prior for natural-image smoothness (``smoothness``).
    Pixels stay inside the range real images have after normalisation (``pixel_range``: ``(lo, hi)``, scalars
    or per channel; ``"auto"`` derives it from a timm model's ``pretrained_cfg`` mean/std, ``None`` leaves
    pixels unbounded): unbounded optimisation drives pixels to +-8 where real ones stay in +-1, which
    stretches the input range the quantizer sees. Returns an ``(n, 3, H, W)`` tensor in the model's input
    space. Seeded and deterministic; with ``cache_dir`` the result is stored under a key of the model's
    weights and the arguments, and reused.
    """
    import hashlib

    from tqdm.auto import tqdm

    from .graph import BATCHNORM_MODULES, device_of

    if n < 1:
        raise DataError(f"n must be at least 1, got {n}")
    bns = [m for m in model.modules() if isinstance(m, BATCHNORM_MODULES) and m.track_running_stats
           and m.running_mean is not None]
    if not bns:
        raise DataError(f"{type(model).__name__} has no BatchNorm layers with running statistics: data-free "
                        f"calibration images are generated from them. Calibrate on real images instead "
                        f"(a few dozen from the target domain).")
    h, w = (size, size) if isinstance(size, int) else size
    bounds = _pixel_bounds(model, pixel_range)
    cache_file = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        for t in model.state_dict().values():
            digest.update(t.detach().cpu().float().numpy().tobytes()[:4096])
        key = None if bounds is None else [t.flatten().tolist() for t in bounds]
        digest.update(repr((n, h, w, steps, batch_size, lr, smoothness, seed, key)).encode())
        cache_file = Path(cache_dir).expanduser() / f"distilled-{digest.hexdigest()[:16]}.pt"
        if cache_file.is_file():
            return torch.load(cache_file, weights_only=True)
    device = device_of(model)
    was_training = model.training
    model.eval()
    stats: list[tuple[torch.Tensor, torch.Tensor, nn.Module]] = []

    def hook(module, inputs, _out):
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        stats.append((x.mean(dims), x.var(dims, unbiased=False).add(module.eps).sqrt(), module))

    handles = [m.register_forward_hook(hook) for m in bns]
    gen = torch.Generator().manual_seed(seed)
    out = []
    grad_flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        lo, hi = (t.to(device) for t in bounds) if bounds is not None else (None, None)

        def image(z: torch.Tensor) -> torch.Tensor:  # the optimised variable -> pixels inside the bounds
            return z if lo is None else lo + (hi - lo) * torch.sigmoid(z)

        batches = range(0, n, batch_size)
        bar = tqdm(total=len(batches) * steps, desc="distilling images", unit="step", disable=not progress,
                   leave=False)
        for start in batches:
            b = min(batch_size, n - start)
            z = torch.randn(b, 3, h, w, generator=gen).to(device).requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
            for _ in range(steps):
                stats.clear()
                opt.zero_grad()
                x = image(z)
                model(x)
                loss = sum((mu - m.running_mean).norm() + (sd - (m.running_var + m.eps).sqrt()).norm()
                           for mu, sd, m in stats) / len(stats)
                tv = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., 1:] - x[..., :-1]).pow(2).mean()
                (loss + smoothness * tv).backward()
                opt.step()
                sched.step()
                bar.update(1)
            with torch.no_grad():
                out.append(image(z).detach().cpu())
        bar.close()
    finally:
        for hd in handles:
            hd.remove()
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    images = torch.cat(out)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(images, tmp)
        tmp.replace(cache_file)
    return images
