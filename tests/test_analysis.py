import json

import pytest
import torch
from test_quantize import small_model
from torch import nn

import qsurgery
from qsurgery import ConfigError, DataError, QSurgeryError, QuantConfig
from qsurgery.analysis import compare_layers, prediction_flips, sensitivity
from qsurgery.cli import main


def kl(out, ref):
    lp, lq = ref.log_softmax(1), out.log_softmax(1)
    return float((lp.exp() * (lp - lq)).sum(1).mean())


@pytest.fixture
def setup():
    m = small_model()
    x = torch.randn(4, 3, 12, 12)
    graph = qsurgery.capture(m, x)
    calib = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    evals = [(torch.randn(6, 3, 12, 12), torch.randint(0, 5, (6,))) for _ in range(2)]
    return graph, calib, evals


@pytest.mark.parametrize("mode", ["quantize_one", "float_one"])
def test_fast_sensitivity_equals_the_naive_loop(setup, mode):
    graph, calib, evals = setup
    report = sensitivity(graph, calib, evals, metric="kl", mode=mode, progress=False)
    with torch.no_grad():
        ref = torch.cat([graph(x) for x, _ in evals])
        sim_all, plan = qsurgery.quantize(graph, calib, progress=False)
        base = kl(torch.cat([sim_all(x) for x, _ in evals]), ref)
    assert sorted(report.layers()) == sorted(plan.names())
    for name in plan.names():
        if mode == "quantize_one":
            cfg = QuantConfig.int8().override("*", dtype="float").override(name, dtype="int")
        else:
            cfg = QuantConfig.int8().override(name, dtype="float")
        sim, _ = qsurgery.quantize(graph, calib, cfg, progress=False)
        with torch.no_grad():
            value = kl(torch.cat([sim(x) for x, _ in evals]), ref)
        expected = value if mode == "quantize_one" else base - value
        assert report[name].delta == pytest.approx(expected, rel=1e-3, abs=1e-7), name
    deltas = [r.delta for r in report.rows]
    assert deltas == sorted(deltas, reverse=True)


def test_sensitivity_finds_the_broken_layer(setup):
    graph, calib, evals = setup
    cfg = QuantConfig.int8().override("conv2", weight_bits=2)  # a layer broken on purpose
    for metric in ("kl", "agreement", "sqnr", "top1"):
        report = sensitivity(graph, calib, evals, metric=metric, config=cfg, progress=False)
        if metric in ("kl", "sqnr"):
            assert report.top(1)[0].layer == "conv2", metric
    md = report.to_markdown(3)
    assert "| 1 |" in md and "conv2" in sensitivity(graph, calib, evals, config=cfg, progress=False).to_markdown(1)
    assert json.loads(report.to_json())["mode"] == "quantize_one"


def test_sensitivity_reports_cost_and_plots(setup, tmp_path):
    graph, calib, evals = setup
    report = sensitivity(graph, calib, evals, layers=["conv2", "fc"], progress=False)
    assert report.layers() and set(report.layers()) == {"conv2", "fc"}
    assert report.forward_cost["layer_forwards_per_batch"] < report.forward_cost["naive_forwards_per_batch"]
    assert report.plot(tmp_path / "s.png").stat().st_size > 1000
    custom = sensitivity(graph, calib, evals, metric=lambda out, batch: float(out.max()), progress=False)
    assert custom.metric == "<lambda>"


def test_sensitivity_bad_input(setup):
    graph, calib, evals = setup
    with pytest.raises(DataError, match="needs labels"):
        sensitivity(graph, calib, [x for x, _ in evals], metric="top1", progress=False)
    with pytest.raises(ConfigError, match="not quantized layers"):
        sensitivity(graph, calib, evals, layers=["conv7"], progress=False)
    with pytest.raises(ConfigError, match="unknown metric"):
        sensitivity(graph, calib, evals, metric="f1", progress=False)
    with pytest.raises(QSurgeryError, match="non-finite"):
        sensitivity(graph, calib, evals, metric=lambda o, b: float("nan"), progress=False)
    with torch.no_grad():
        graph.get_submodule("fc").bias[0] = float("inf")
    sim, _ = qsurgery.quantize(qsurgery.capture(small_model(), torch.randn(1, 3, 12, 12)), calib, progress=False)
    with torch.no_grad():
        sim.graph_module.get_submodule("fc").bias[0] = float("inf")
    with pytest.raises(QSurgeryError, match="float model's output is not finite"):
        sensitivity(graph, None, evals, simulated=sim, progress=False)


class Spread(nn.Module):
    """conv whose output channels live on very different scales, then a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.conv.weight[0] *= 200.0

    def forward(self, x):
        return self.head(self.conv(x)).mean((2, 3))


class HeadSpread(nn.Module):
    """The channels of the model's output differ 200x: a head (its conv reaches the output through layout ops
    only), where split_head applies."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.head.weight[0] *= 200.0

    def forward(self, x):
        return self.head(x).flatten(1)


def test_split_head_is_named_only_for_a_layer_whose_output_is_the_models():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    six = QuantConfig.int8().override("*", act_bits=6)  # coarse enough that the spread costs SQNR
    graph = qsurgery.capture(HeadSpread().eval(), x)
    report = compare_layers(graph, qsurgery.quantize(graph, x, six, progress=False)[0], x)
    assert any("channel ranges differ" in d and "split_head" in d for d in report["head"].diagnosis)
    inner = qsurgery.capture(Spread().eval(), x)  # the same spread one layer before the output
    report = compare_layers(inner, qsurgery.quantize(inner, x, six, progress=False)[0], x)
    spread = [d for d in report["conv"].diagnosis if "channel ranges differ" in d]
    assert spread and "split_head" not in spread[0]


def test_compare_layers_diagnoses_spread_clipping_and_rounding(tmp_path):
    torch.manual_seed(0)
    model = Spread().eval()
    x = torch.randn(8, 3, 6, 6)
    graph = qsurgery.capture(model, x)
    sim, plan = qsurgery.quantize(graph, x, progress=False)
    report = compare_layers(graph, sim, x)
    assert [r.layer for r in report.rows] == plan.names()
    assert any("channel ranges differ" in d for d in report["conv"].diagnosis)
    assert not any("split_head" in d for d in report["conv"].diagnosis)  # an inner layer: not a head's fix
    assert report.rows[0].sqnr_db > report["head"].sqnr_db - 100
    wide = compare_layers(graph, sim, x * 5)  # inputs far outside what calibration saw
    assert any("calibration does not cover" in d for d in wide["input"].diagnosis)
    sim4, _ = qsurgery.quantize(graph, x, QuantConfig.int8().override("head", act_bits=3), progress=False)
    low = compare_layers(graph, sim4, x)
    assert any("more bits" in d for d in low["head"].diagnosis)
    assert "conv" in report.to_markdown() and report.plot(tmp_path / "sqnr.png").exists()
    assert sim.quantized_names() == plan.names()  # the comparison leaves the simulation as it was


def test_prediction_flips_counts_and_confusion(tmp_path):
    f = torch.tensor([[9.0, 0, 0], [0, 9, 0], [0, 0, 9], [9, 0, 0]])
    q = torch.tensor([[9.0, 0, 0], [0, 0, 9], [9, 0, 0], [9, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2])
    report = prediction_flips(f, q, labels)
    assert (report.total, report.changed, report.right_to_wrong, report.wrong_to_right) == (4, 2, 1, 1)
    classes, matrix = report.confusion([0, 1, 2])
    assert matrix.tolist() == [[2, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert report.float_accuracy == 0.5 and report.quant_accuracy == 0.5  # same accuracy, two flips
    assert report.plot(tmp_path / "flips.png").exists()
    assert report.flipped == [(1, 1, 2, 1), (2, 2, 0, 0)]  # image, float class, int8 class, label
    with pytest.raises(DataError):
        prediction_flips(f, q[:2])


def test_report_lists_the_flipped_images_with_thumbnails(tmp_path):
    from qsurgery.analysis.report import write_report

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    graph = qsurgery.capture(Spread().eval(), x)
    sim, plan = qsurgery.quantize(graph, x, progress=False)
    q1 = sensitivity(graph, x, x, mode="quantize_one", metric="kl", simulated=sim, progress=False)
    f = torch.tensor([[9.0, 0, 0], [0, 9, 0], [0, 0, 9], [9, 0, 0]])
    q = torch.tensor([[9.0, 0, 0], [0, 0, 9], [9, 0, 0], [9, 0, 0]])
    flips = prediction_flips(f, q, torch.tensor([0, 1, 0, 2]))
    md = write_report(tmp_path, title="t", facts=[], plan=plan, flips=flips, quantize_one=q1, float_one=None,
                      layers=None, depthwise=set(), images=x, max_flips=1).read_text()
    assert "| 1 | 1 | 2 | 1 | right -> wrong | ![](flips/00001.png) |" in md
    assert "... 1 more" in md and sorted(p.name for p in (tmp_path / "flips").iterdir()) == ["00001.png"]
    assert '<img src="flips/00001.png"' in (tmp_path / "report.html").read_text()
    md = write_report(tmp_path / "named", title="t", facts=[], plan=plan, flips=flips, quantize_one=q1,
                      float_one=None, layers=None, depthwise=set(), verdict="Verdict: one line first",
                      class_names=["cat", "dog", "eel"]).read_text()
    assert md.splitlines()[1:3] == ["", "Verdict: one line first"]
    assert "| 1 | 1 dog | 2 eel | 1 dog | right -> wrong |" in md
    assert "| 2 | 2 eel | 0 cat | 0 cat | wrong -> right |" in md


def test_cli_analyze_writes_report(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["analyze", "--model", "resnet18", "--input-size", "32", "--calib", "4", "--eval", "4",
                 "--batch-size", "4", "--sens-images", "4", "--quiet", "--out", str(out), "--distill-steps", "3",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    md = (out / "report.md").read_text()
    assert "distilled from the model's BatchNorm statistics" in md and list((tmp_path / "cache").glob("*.pt"))
    for section in ("Prediction flips", "Suspects and the fix to try first", "only this layer int8",
                    "all int8 but this layer", "Layer by layer"):
        assert section in md
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    assert {p.name for p in out.glob("*.png")} >= {"flips.png", "sensitivity_quantize_one.png", "sqnr_by_depth.png"}
    said = capsys.readouterr()
    assert "worst layers alone" in said.out
    assert "Data-free calibration is a rough guide" in md and "rough guide" in said.err  # with the measured gap


def test_cli_analyze_with_data_reports_calibration_coverage(tmp_path, capsys):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "report"
    code = main(["analyze", "--model", "resnet18", "--input-size", "32", "--data", str(tmp_path / "imgs"),
                 "--calib", "6", "--batch-size", "3", "--sens-images", "3", "--quiet", "--out", str(out)])
    assert code == 0
    md = (out / "report.md").read_text()
    assert "calibration" in md and any(v in md for v in ("enough", "more images needed", "looks unlike"))
    assert md.splitlines()[2].startswith("Verdict: int8 keeps ") and "points)" in md.splitlines()[2]
    assert "calibration:" in capsys.readouterr().out


def test_compare_layers_blames_coarse_weights():
    torch.manual_seed(0)
    model = Spread().eval()
    x = torch.randn(8, 3, 6, 6)
    graph = qsurgery.capture(model, x)
    sim, _ = qsurgery.quantize(graph, x, QuantConfig.int8().override("head", weight_bits=2), progress=False)
    report = compare_layers(graph, sim, x)
    assert report["head"].weight_sqnr_db < 20 < report["conv"].weight_sqnr_db
    assert any("weight rounding" in d for d in report["head"].diagnosis)


def test_flip_classes_are_named_only_where_the_names_are_known():
    from qsurgery.cli import _class_names

    class Folder:
        classes = ["cat", "dog"]

    class Flat:
        pass

    subset = torch.utils.data.Subset(Folder(), [0])
    assert _class_names(subset, 2) == (["cat", "dog"], None)
    assert _class_names(Folder(), 1000) == (None, None)  # folder labels, but the outputs are another numbering
    names, where = _class_names(Flat(), 1000)
    assert names[0] == "tench" and "ImageNet-1k" in where and _class_names(Flat(), 10) == (None, None)
