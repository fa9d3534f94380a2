"""Detection: split_head (exact, recovers head quantization, clear errors), COCO mAP, the example loaders."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

import qsurgery
from qsurgery import CalibrationError, ConfigError
from qsurgery.detection import CocoImages, coco_eval, coco_map, letterbox, nms
from qsurgery.passes import find_heads, split_head

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NA, NC = 3, 2
F = 5 + NC


class TinyYolo(nn.Module):
    """Two detection levels, fused YOLO heads (anchors x (box 4 | obj 1 | classes 2)); the objectness and
    class channels are scaled up so their ranges dwarf the box channels' (as in real YOLO heads)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.LeakyReLU(0.1))
        self.lateral = nn.Conv2d(16, 8, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head1 = nn.Conv2d(16, NA * F, 1)
        self.head2 = nn.Conv2d(16, NA * F, 1)
        with torch.no_grad():
            for head in (self.head1, self.head2):
                for a in range(NA):
                    head.weight[a * F + 4:a * F + F] *= 40
                    head.bias[a * F + 4] = -30

    def forward(self, x):
        s = self.stem(x)
        d = self.down(s)
        p2 = torch.cat([self.up(self.lateral(d)), s], 1)
        return [self.head1(d), self.head2(p2)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyYolo().eval()
    graph = qsurgery.capture(model, torch.randn(1, 3, 32, 32))
    calib = [torch.rand(8, 3, 32, 32) for _ in range(3)]
    return model, graph, calib


def test_find_heads_and_exact_split_both_merges(tiny):
    model, graph, calib = tiny
    heads = find_heads(graph, calib)
    assert [h["conv"] for h in heads] == ["head1", "head2"]
    assert all(h["bits_lost"] > 2 for h in heads)
    x = torch.rand(4, 3, 32, 32)
    ref = model(x)
    for merge in ("outputs", "float_concat"):
        r = split_head(graph, groups="yolo", merge=merge, calib_data=calib)
        assert r.exact and r.float_error < 1e-6  # same weights, fp32 summation-order noise only
        out = r.graph(x)
        if merge == "outputs":
            assert len(out) == 6
            assert r.output_names == [f"head{i}.{g}" for i in (1, 2) for g in ("box", "obj", "cls")]
            assert [o.shape[1] for o in out[:3]] == [12, 3, 6]
            out = r.merge_outputs(out)
        assert isinstance(out, list) and len(out) == 2
        for a, b in zip(ref, out):
            torch.testing.assert_close(a, b)
        assert r.cost_after["macs"] == r.cost_before["macs"]
    assert "head1" in dict(graph.named_modules()) and isinstance(graph.head1, nn.Conv2d)  # input untouched


def test_split_recovers_head_quantization(tiny):
    """With objectness/class ranges 40x the box ranges, int8 box outputs gain from their own scale."""
    model, graph, calib = tiny
    x = torch.rand(8, 3, 32, 32)
    ref = model(x)

    def box_sqnr(outs):
        db = []
        for r, o in zip(ref, outs):
            idx = [a * F + i for a in range(NA) for i in range(4)]
            err = (r[:, idx] - o[:, idx]).pow(2).mean()
            db.append(10 * torch.log10(r[:, idx].pow(2).mean() / err).item())
        return min(db)

    sim, _ = qsurgery.quantize(graph, calib, qsurgery.QuantConfig.int8(), progress=False)
    before = box_sqnr(sim(x))
    for groups in ("yolo", "auto"):
        r = split_head(graph, groups=groups, calib_data=calib)
        sim2, plan = qsurgery.quantize(r.graph, calib, qsurgery.QuantConfig.int8(), progress=False)
        after = box_sqnr(r.merge_outputs(sim2(x)))
        assert after > before + 10, (groups, before, after)
        assert any(n.startswith("head1.") for n in plan.names())


def test_float_concat_is_not_requantized(tiny):
    _, graph, calib = tiny
    r = split_head(graph, groups="yolo", merge="float_concat", calib_data=calib)
    sim, plan = qsurgery.quantize(r.graph, calib, qsurgery.QuantConfig.int8(), progress=False)
    assert not any("merge" in n for n in plan.names())
    assert {"head1.box", "head1.obj", "head1.cls"} <= set(plan.names())


def test_score_floor_spends_the_int8_range_on_scores_that_matter(tiny, tmp_path):
    """One anchor's objectness sits near 0, another's near -45 (background): with a floor at -8 the objectness
    group's int8 steps shrink and sigmoid scores get closer to float, while the float graph and the box group
    stay as they were."""
    import copy

    model, _, calib = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        for head in (model.head1, model.head2):
            head.bias[4], head.bias[F + 4] = -2.0, -45.0
    graph = qsurgery.capture(model, calib[0][:1])
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    scores = [a * F + 4 for a in range(NA)]  # objectness
    err, plans = {}, {}
    for floor in (None, -8.0):
        r = split_head(graph, groups="yolo", calib_data=calib, score_floor=floor)
        assert r.exact
        for a, b in zip(ref, r.merge_outputs(r.graph(x))):
            torch.testing.assert_close(a, b)  # float unchanged
        heads_only = qsurgery.QuantConfig.int8().override("*", dtype="float").override("head*", dtype="int")
        sim, plans[floor] = qsurgery.quantize(r.graph, calib, heads_only, progress=False)
        with torch.no_grad():
            out = r.merge_outputs(sim(x))
        err[floor] = max(float((torch.sigmoid(o[:, scores]) - torch.sigmoid(f[:, scores])).abs().max())
                         for f, o in zip(ref, out))
    obj, plain_obj = plans[-8.0]["head1.obj"], plans[None]["head1.obj"]
    assert plain_obj.clip[0] < -40 and obj.clip[0] == -8.0 and obj.clip[1] == plain_obj.clip[1]
    assert any("range limited" in n for n in obj.notes)
    assert plans[-8.0]["head1.box"].clip == plans[None]["head1.box"].clip
    assert err[-8.0] < err[None] / 2, err
    rep = qsurgery.export_onnx(sim, tmp_path / "floor.onnx", calib[0][:2], qdq=True, verify_inputs=[calib[0][:2]],
                               output_names=r.output_names)
    assert rep.max_error_steps is not None and rep.max_error_steps <= 1  # the file saturates where the sim does
    with pytest.raises(ConfigError, match="YOLO layout"):
        split_head(graph, groups="auto", calib_data=calib, score_floor=-8)
    with pytest.raises(ConfigError, match="below 0"):
        split_head(graph, groups="yolo", score_floor=2)


def test_auto_groups_separate_wide_channels(tiny):
    _, graph, calib = tiny
    r = split_head(graph, ["head1"], groups="auto", calib_data=calib)
    (change,) = r.changes
    groups = r.graph.get_submodule("head1").groups
    box = {a * F + i for a in range(NA) for i in range(4)}
    assert any(set(g) <= box for g in groups)  # the box channels get a group of their own
    assert change["auto_bits_lost"][0] > change["auto_bits_lost"][-1]


def test_explicit_groups_and_export_keeps_split(tiny, tmp_path):
    _, graph, calib = tiny
    r = split_head(graph, ["head2"], groups=[list(range(0, 10)), list(range(10, 21))], calib_data=calib)
    assert r.output_names == ["head1", "head2.g0", "head2.g1"]
    sim, _ = qsurgery.quantize(r.graph, calib, qsurgery.QuantConfig.int8(), progress=False)
    rep = qsurgery.export_onnx(sim, tmp_path / "m.onnx", calib[0][:2], qdq=True, verify_inputs=[calib[0][:2]],
                               output_names=r.output_names)
    import onnx

    m = onnx.load(rep.path)
    assert [o.name for o in m.graph.output] == ["head1", "head2.g0", "head2.g1"]
    from qsurgery.export import _output_steps

    plan = sim.plan  # differences are counted in each output's own step, not in the first output's
    assert _output_steps(sim) == [plan[n].scale for n in ("head1", "head2.g0", "head2.g1")]
    assert plan["head2.g0"].scale != plan["head2.g1"].scale
    assert rep.max_error_steps is not None and rep.max_error_steps <= 1


def test_split_head_bad_input(tiny):
    _, graph, calib = tiny
    with pytest.raises(CalibrationError, match="calib_data"):
        split_head(graph, groups="auto")
    with pytest.raises(CalibrationError, match=r"captured for \(N, 3, 32, 32\)"):  # checked like quantize's
        split_head(graph, groups="auto", calib_data=[torch.rand(2, 3, 48, 48)])
    with pytest.raises(ConfigError, match="exactly once"):
        split_head(graph, ["head1"], groups=[list(range(10)), list(range(9, 21))])
    with pytest.raises(ConfigError, match="exactly once"):
        split_head(graph, ["head1"], groups=[list(range(10)), list(range(11, 21))])
    with pytest.raises(ConfigError, match="not a head conv.*requantize"):
        split_head(graph, ["lateral"], groups=[[0, 1], [2, 3, 4, 5, 6, 7]])
    with pytest.raises(ConfigError, match="not a module"):
        split_head(graph, ["head9"], groups="yolo")
    with pytest.raises(ConfigError, match="anchors"):
        split_head(graph, ["head1"], groups="yolo", anchors=4)
    with pytest.raises(ConfigError, match="merge"):
        split_head(graph, groups="yolo", merge="sum")


# --------------------------------------------------------------------------- COCO mAP


def write_coco(image_dir: Path, ann_path: Path, n: int, seed: int) -> None:
    """Black images of varied sizes with white rectangles in ``image_dir``; COCO json of their boxes (classes 1
    and 3) at ``ann_path``."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    image_dir.mkdir(parents=True)
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        img = Image.new("RGB", (w, h))
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        bw, bh = int(rng.integers(10, w - x0)), int(rng.integers(10, h - y0))
        ImageDraw.Draw(img).rectangle([x0, y0, x0 + bw - 1, y0 + bh - 1], fill=(255, 255, 255))
        img.save(image_dir / f"{i:03d}.png")
        images.append({"id": 100 + i, "file_name": f"{i:03d}.png", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": 100 + i, "category_id": 1 + 2 * (i % 2), "bbox": [x0, y0, bw, bh],
                     "area": bw * bh, "iscrowd": 0})
    ann = {"images": images, "annotations": anns,
           "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}
    ann_path.write_text(json.dumps(ann))


def _synthetic_coco(tmp_path: Path, n: int = 6, seed: int = 0):
    """Black images of varied sizes with white rectangles; COCO json of their boxes (classes 1 and 3)."""
    write_coco(tmp_path / "img", tmp_path / "ann.json", n, seed)
    return CocoImages(tmp_path / "img", tmp_path / "ann.json")


def test_coco_map_letterbox_round_trip(tmp_path):
    """A 'detector' that finds the white rectangle in the letterboxed input scores ~perfect mAP: the
    letterbox transform and its inverse are consistent, and class k maps to the k-th category id."""
    data = _synthetic_coco(tmp_path)
    labels = {m["id"]: (0 if a["category_id"] == 1 else 1) for m, a in zip(data.images, data.annotations)}
    order = iter([m["id"] for m in data.images])

    def decode(x):
        rows = []
        for img in x:
            mask = img.mean(0) > 0.9
            ys, xs = mask.nonzero(as_tuple=True)
            x1, x2, y1, y2 = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
            scores = [0.0, 0.0]
            scores[labels[next(order)]] = 0.9
            rows.append(torch.tensor([[(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, *scores]]))
        return rows

    for stretch in (False, True):
        order = iter([m["id"] for m in data.images])
        rep = coco_map(lambda x: x, data, decode, size=128, stretch=stretch, batch_size=4, progress=False)
        assert rep.map50 == pytest.approx(1.0) and rep.map > 0.7, (stretch, rep)


def test_coco_eval_matches_pycocotools(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = _synthetic_coco(tmp_path, n=12, seed=3)
    # add a crowd box and a second object per image to exercise ignore handling and matching
    rng = np.random.default_rng(5)
    ann = json.loads((tmp_path / "ann.json").read_text())
    for i, m in enumerate(ann["images"]):
        ann["annotations"].append({"id": 1000 + i, "image_id": m["id"], "category_id": 1, "bbox": [2, 2, 20, 15],
                                   "area": 300, "iscrowd": int(i % 4 == 0)})
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    data = CocoImages(tmp_path / "img", tmp_path / "ann.json")
    results = []
    for a in data.annotations:
        for _ in range(3):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 3, 4)
            results.append({"image_id": a["image_id"], "category_id": int(rng.choice([1, 3], p=[0.7, 0.3])),
                            "bbox": [x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3])],
                            "score": float(rng.random())})
    ours = coco_eval(results, data)
    gt = COCO(str(tmp_path / "ann.json"))
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ours.map == pytest.approx(ev.stats[0], abs=1e-9)
    assert ours.map50 == pytest.approx(ev.stats[1], abs=1e-9)


def test_letterbox_and_nms():
    img = Image.new("RGB", (100, 50))
    x, info = letterbox(img, 64)
    assert x.shape == (3, 64, 64) and info["gain"] == (0.64, 0.64) and info["pad"] == (0.0, 16.0)
    assert x[:, 0, 0].allclose(torch.full((3,), 114 / 255))
    p = torch.tensor([[10, 10, 4, 4, 0.9, 0.1], [10.5, 10, 4, 4, 0.8, 0.0], [30, 30, 4, 4, 0.0, 0.7]])
    d = nms(p, conf=0.05, iou=0.5)
    assert d.shape == (3, 6)  # the overlapping class-0 pair collapses; class 1 twice (one weak) stays
    assert sorted(d[:, 5].tolist()) == [0.0, 1.0, 1.0]
    with pytest.raises(qsurgery.DataError):
        nms(torch.zeros(3, 4))


def test_coco_images_bad_input(tmp_path):
    with pytest.raises(qsurgery.DataError, match="does not exist"):
        CocoImages(tmp_path / "nope")
    (tmp_path / "img").mkdir()
    (tmp_path / "a.json").write_text(json.dumps({"images": []}))
    with pytest.raises(qsurgery.DataError, match="COCO json"):
        CocoImages(tmp_path / "img", tmp_path / "a.json")


# --------------------------------------------------------------------------- example loaders

TINY_CFG = """
[net]
width=32
height=32
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky
[maxpool]
size=2
stride=2
[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
groups=8
activation=leaky
[shortcut]
from=-2
activation=linear
[maxpool]
size=3
stride=1
[convolutional]
filters=21
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1,2
anchors=4,4, 8,8, 12,12
classes=2
[route]
layers=-3
[upsample]
stride=2
[route]
layers=-1,-9
[convolutional]
filters=21
size=1
stride=1
activation=linear
[yolo]
mask=0,1,2
anchors=4,4, 8,8, 12,12
classes=2
"""


def test_darknet_loader_reads_cfg_and_weights(tmp_path):
    from examples.detectors import darknet

    (tmp_path / "t.cfg").write_text(TINY_CFG)
    model = darknet.load(tmp_path / "t.cfg")
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for n_, b in model.named_buffers()
                                                         if "running" in n_)
    values = np.arange(n, dtype=np.float32) / n + 0.5
    header = np.array([0, 2, 0], dtype=np.int32).tobytes() + np.array([0], dtype=np.int64).tobytes()
    (tmp_path / "t.weights").write_bytes(header + values.tobytes())
    model = darknet.load(tmp_path / "t.cfg", tmp_path / "t.weights")
    assert model.layers[0].bn.bias[0].item() == pytest.approx(0.5)  # BN beta comes first
    heads = model(torch.rand(2, 3, 32, 32))
    assert [h.shape for h in heads] == [(2, 21, 16, 16), (2, 21, 32, 32)]
    rows = darknet.decoder(model)(heads)
    assert len(rows) == 2 and rows[0].shape == (16 * 16 * 3 + 32 * 32 * 3, 4 + 2)
    graph = qsurgery.capture(model, torch.rand(1, 3, 32, 32))
    assert [h["conv"] for h in find_heads(graph)] == ["layers.5.conv", "layers.10.conv"]
    (tmp_path / "short.weights").write_bytes(header + values[:-5].tobytes())
    with pytest.raises(ValueError, match="ends early"):
        darknet.load(tmp_path / "t.cfg", tmp_path / "short.weights")


def test_yolov5n_definition_matches_its_state_dict_layout():
    from examples.detectors import yolov5

    model = yolov5.YOLOv5n()
    total = sum(p.numel() for p in model.parameters())
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert total - bn_channels == 1_867_405  # Ultralytics' published count, BN fused into conv biases
    heads = model.eval()(torch.rand(1, 3, 64, 64))
    assert [tuple(h.shape) for h in heads] == [(1, 255, 8, 8), (1, 255, 4, 4), (1, 255, 2, 2)]


def _recipe():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "recipes" / "yolo_head_split.py"
    spec = importlib.util.spec_from_file_location("yolo_head_split_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_detection_metric_scores_any_part_by_its_own_images(tmp_path):
    """DetectionMetric is the engine's evaluator contract for detectors: outputs of any subset of the images,
    with their positions as labels, score against those images' boxes only."""
    from qsurgery.detection import DetectionMetric

    data = _synthetic_coco(tmp_path, n=8)
    cls = [0 if a["category_id"] == 1 else 1 for a in data.annotations]

    def decode(x):  # finds the white rectangle; the class rides in the top-left pixel's red channel
        rows = []
        for img in x:
            mask = img[1:].mean(0) > 0.9
            ys, xs = mask.nonzero(as_tuple=True)
            x1, x2, y1, y2 = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
            scores = [0.0, 0.0]
            scores[int(img[0, 0, 0] > 0.5)] = 0.9
            rows.append(torch.tensor([[(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, *scores]]))
        return rows

    metric = DetectionMetric(data, decode, size=96, at50=True)
    x, positions = metric.images(batch_size=3)
    assert len(x) == len(positions) == 8 and metric.__name__ == "mAP@0.5"
    x = x.clone()
    x[:, 0, 0, 0] = torch.tensor(cls, dtype=torch.float32)
    assert metric(x, positions) == pytest.approx(100.0)
    part = torch.tensor([5, 1, 6])
    assert metric(x[part], part) == pytest.approx(100.0)  # scored against images 5, 1, 6 only
    wrong = x[part].clone()
    wrong[0, 0, 0, 0] = 1 - wrong[0, 0, 0, 0]  # one image's class wrong
    assert metric(wrong, part) < 100.0
    with pytest.raises(qsurgery.DataError, match="positions"):
        metric(x, None)


def tiny_detector():
    """``module:factory`` for the CLI test: TinyYolo with a decode (cx, cy, w, h, class scores per cell)."""
    from types import SimpleNamespace

    torch.manual_seed(0)

    def decode(outputs):
        rows = []
        for level in outputs:
            n, _c, h, w = level.shape
            p = level.reshape(n, NA, F, h, w).permute(0, 1, 3, 4, 2).reshape(n, -1, F).sigmoid()
            box = p[..., :4] * 32
            rows.append(torch.cat([box, p[..., 4:5] * p[..., 5:]], -1))
        return list(torch.cat(rows, 1))

    return SimpleNamespace(model=TinyYolo().eval(), decode=decode, size=32, stretch=True)


def test_cli_repairs_a_detector_on_a_coco_folder(tmp_path, capsys):
    from qsurgery.cli import main

    (tmp_path / "coco").mkdir()
    _synthetic_coco(tmp_path / "coco", n=12)
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "ann.json").rename(tmp_path / "coco" / "annotations" / "ann.json")
    out = tmp_path / "out"
    code = main(["repair", "--task", "detect", "--model", "test_detection:tiny_detector", "--data",
                 str(tmp_path / "coco"), "--calib", "4", "--batch-size", "4", "--target", "full-int8",
                 "--max-trials", "2", "--remedy", "split_head", "--out", str(out), "--quiet", "--uint8-weights"])
    text = capsys.readouterr().out
    assert code in (0, 1) and "mAP@0.5:0.95" in text and "onnx" in text
    assert (out / "report.md").is_file() and (out / "repaired_qdq.onnx").is_file()
    report = (out / "report.md").read_text()  # boxes have no top-1 to agree on: no NaN row, the distance named
    assert "nan" not in report and "| distance from float, report |" in report and "agreement" not in report
    (tmp_path / "plain").mkdir()
    assert main(["repair", "--task", "detect", "--model", "test_detection:tiny_detector", "--data",
                 str(tmp_path / "plain"), "--out", str(tmp_path / "o2")]) == 2
    assert "COCO-style" in capsys.readouterr().err
    assert main(["repair", "--task", "detect", "--model", "test_detection:nope", "--data",
                 str(tmp_path / "coco"), "--calib", "4", "--out", str(tmp_path / "o2")]) == 2
    assert "cannot load --model" in capsys.readouterr().err


class DecoupledHead(nn.Module):
    """YOLOX/YOLOv8-style head: separate box (4 channels, small range) and class (2 channels, ~40x wider)
    branches, concatenated into one output per level."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.box = nn.Conv2d(8, 4, 1)
        self.cls = nn.Conv2d(8, 2, 1)
        with torch.no_grad():
            self.cls.weight *= 40

    def forward(self, x):
        f = self.stem(x)
        return [torch.cat([self.box(f), self.cls(f)], 1)]


def test_decoupled_head_concat_moves_to_the_host_exactly_and_repairs():
    from qsurgery.passes import output_concats, split_output_concats

    torch.manual_seed(0)
    model = DecoupledHead().eval()
    x = torch.rand(32, 3, 16, 16)
    graph = qsurgery.capture(model, x[:1])
    assert [c["channels"] for c in output_concats(graph)] == [[4, 2]]
    result = split_output_concats(graph)
    assert result.exact and result.float_error < 1e-6 and len(result.output_names) == 2
    with torch.no_grad():
        assert torch.equal(result.merge_outputs(result.graph(x))[0], model(x)[0])

    def box_error(outputs, _positions=None):
        return float((outputs[0][:, :4] - ref[0][:, :4]).pow(2).mean() / ref[0][:, :4].pow(2).mean())

    calib = [x[:16]]
    with torch.no_grad():
        ref = model(x)
        plain, _ = qsurgery.quantize(graph, calib, progress=False)
        split, _ = qsurgery.quantize(result.graph, calib, progress=False)
        assert box_error(result.merge_outputs(split(x))) < 0.25 * box_error(plain(x))
    with pytest.raises(ConfigError, match="no model output is a channel concat"):
        split_output_concats(qsurgery.capture(TinyYolo().eval(), torch.rand(1, 3, 32, 32)))
    # the engine offers it as the split_head remedy and keeps it on a full-int8 target
    r = qsurgery.repair(model, calib, (x, torch.arange(len(x))), target="full-int8", remedies=["split_head"],
                        budget=qsurgery.Budget(0.0, lambda out, pos: 100 * (1 - float(
                            (out[0][:, :4] - ref[0][pos][:, :4]).pow(2).mean() / ref[0][pos][:, :4].pow(2).mean()))),
                        progress=False, max_trials=2)
    assert r.steps == [{"remedy": "split_head", "params": {"outputs": "uncat"}}]


def test_recipe_repairs_a_decoupled_head_detector_on_a_coco_folder(tmp_path):
    repair_detector = _recipe().repair_detector
    data_dir = tmp_path / "coco"
    data_dir.mkdir()
    _synthetic_coco(data_dir, n=24)
    (data_dir / "annotations").mkdir()
    (data_dir / "ann.json").rename(data_dir / "annotations" / "ann.json")
    torch.manual_seed(0)
    model = DecoupledHead().eval()

    def decode(outputs):  # one level, stride 2: (cx, cy, w, h) from the box channels, scores from the classes
        p = outputs[0]
        n, _c, h, w = p.shape
        rows = p.permute(0, 2, 3, 1).reshape(n, h * w, 6)
        return list(torch.cat([rows[..., :4].abs() * 8, rows[..., 4:].sigmoid()], -1))

    result = repair_detector(model, decode, data_dir / "img", size=16, stretch=True, n_calib=8, n_select=8,
                             out=tmp_path / "out")
    # calibration, selection and report images are disjoint; every layer stays int8; the files a user needs
    assert result.selection["images"] == 8 and result.report.images == 8
    assert all(layer.weight is None or layer.weight.is_int for layer in result.plan)
    assert (tmp_path / "out" / "model_qdq.onnx").is_file() and (tmp_path / "out" / "report.md").is_file()
    assert qsurgery.load(tmp_path / "out" / "result").plan.names() == result.plan.names()


def test_detection_distance_weighs_boxes_by_their_float_score(tmp_path):
    from qsurgery.detection import DetectionMetric

    data = _synthetic_coco(tmp_path, n=4)

    def decode(out):  # rows: (cx, cy, w, h, score)
        return list(out)

    metric = DetectionMetric(data, decode, size=32)
    ref = torch.zeros(4, 10, 5)
    ref[:, :, :4] = 10.0
    ref[:, 0, 4] = 0.9  # one confident row per image, the rest background
    assert metric.distance(ref, ref.clone()) == 0
    moved_bg, moved_fg = ref.clone(), ref.clone()
    moved_bg[:, 1:, :4] += 5.0  # background boxes move: they carry no score
    moved_fg[:, 0, :4] += 5.0
    assert metric.distance(ref, moved_bg) == 0 < metric.distance(ref, moved_fg)
