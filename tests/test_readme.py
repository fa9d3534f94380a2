"""Every Python snippet of README.md runs as written, in order, in one namespace (the README's snippets go on
from the names the step-by-step section defines).

What a user brings is made here: a labelled folder of images at ``path/to/images``, a COCO folder at
``coco/val2017``, detector files behind ``load_detector``. The models are small so the run takes about a
minute: EfficientNet-Lite0's architecture with a quarter of its channels and random weights, and a two-level
YOLO-style detector. Everything else (qsurgery's functions and their defaults) is what the README calls.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _small_lite0(pretrained: bool = True):
    """EfficientNet-Lite0's modules and names (``blocks.0.0``, ``conv_head``, ``classifier``) at a quarter of
    its width and a third of its depth, 10 classes, random weights, 96 x 96 inputs."""
    from timm.models.efficientnet import _gen_efficientnet_lite

    torch.manual_seed(0)
    model = _gen_efficientnet_lite("tf_efficientnet_lite0", channel_multiplier=0.25, depth_multiplier=0.34,
                                   num_classes=10).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 96, 96)}  # model_transform: 96 x 96 images
    return model


def _image_folder(root: Path, n: int = 132) -> None:
    """A flat folder of photos-like images (smooth colour fields) with labels.csv, 10 classes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = ["file,class_index"]
    for i in range(n):
        base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((96, 80), Image.Resampling.BICUBIC)
        img.save(root / f"{i:03d}.jpg")
        rows.append(f"{i:03d}.jpg,{i % 10}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def _coco_folder(root: Path, n: int = 100) -> None:
    """``root/val2017`` images with white rectangles, their boxes in ``root/annotations/instances.json``."""
    from test_detection import write_coco

    write_coco(root / "val2017", root / "annotations" / "instances.json", n, seed=1)


def _small_detector(name: str, weights=None):
    """What ``examples.detectors.load_detector`` returns, for the test's small YOLO-style detector."""
    from test_detection import tiny_detector

    return tiny_detector()


def test_readme_lists_its_snippets():
    snippets = _snippets()
    assert len(snippets) >= 12, len(snippets)  # the regex finds the README's python blocks
    assert any("qsurgery.repair(" in s for s in snippets)


@pytest.mark.slow
def test_every_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    import examples.detectors
    import qsurgery.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # distill_images(cache_dir="~/.cache/qsurgery")
    monkeypatch.setattr(qsurgery.models, "efficientnet_lite0", _small_lite0)
    monkeypatch.setattr(examples.detectors, "load_detector", _small_detector)
    _image_folder(tmp_path / "path" / "to" / "images")
    _coco_folder(tmp_path / "coco")
    namespace: dict = {"__name__": "readme"}
    try:
        for i, code in enumerate(_snippets()):
            start = time.perf_counter()
            try:
                exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
            except Exception as exc:  # say which snippet, with its first line
                raise AssertionError(f"README snippet {i + 1} ({code.splitlines()[0]!r}) failed: {exc!r}") from exc
            print(f"README snippet {i + 1}: {time.perf_counter() - start:.1f} s")
    finally:
        if "executor" in namespace:
            namespace["executor"].close()
    # what the snippets promise they wrote
    for name in ("repaired/graph.pt", "model_int8.onnx", "model_int8_ort.onnx", "det_int8.onnx", "sensitivity.png"):
        assert (tmp_path / name).is_file(), name
