"""Shared set-up of the EfficientNet-Lite0 benchmarks: real weights, a seeded disjoint calibration/evaluation
split of an image folder, the images as tensors, calibration batches and the captured graph."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import qsurgery
from qsurgery.data import ImageFolder, model_transform, split, stack
from qsurgery.models import efficientnet_lite0


def load_lite0(data: str, n_calib: int, batch_size: int, eval_limit: int | None = None, *,
               seed: int = 0) -> SimpleNamespace:
    """``model``, ``graph``, ``xc`` (calibration images), ``calib`` (their batches), ``xe``/``ye`` (evaluation
    images and labels: the rest of the folder, or its first ``eval_limit``); ``seed``: the split's shuffle."""
    model = efficientnet_lite0()
    dataset = ImageFolder(data, model_transform(model))
    calib_set, eval_set = split(dataset, n_calib, seed=seed)
    if eval_limit is not None:
        eval_set = torch.utils.data.Subset(eval_set, list(range(eval_limit)))
    xc, _ = stack(calib_set)
    xe, ye = stack(eval_set)
    calib = [xc[i:i + batch_size] for i in range(0, len(xc), batch_size)]
    return SimpleNamespace(model=model, graph=qsurgery.capture(model, xc[:1]), xc=xc, xe=xe, ye=ye, calib=calib)
