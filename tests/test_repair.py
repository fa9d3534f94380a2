"""The recipe engine: decisions on the selection images only, remedies the target allows, costs, resume,
save/load, the CLI, and clear errors before any expensive work."""

import json
import sys

import pytest
import torch
from test_techniques import DepthwiseNet, images
from torch import nn

import qsurgery
from qsurgery import Budget, RepairError, repair
from qsurgery.errors import ConfigError


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = DepthwiseNet().eval()
    calib = [images(32) for _ in range(2)]
    x = images(160)
    with torch.no_grad():
        y = m(x).argmax(1)
    return m, calib, x, y


FAST = ["equalize", "bias_correction", "observer"]


def _keeping_every_trial(monkeypatch):
    """The engine's module with its judge replaced so that every trial is kept (tests of what a kept step does)."""
    engine = sys.modules["qsurgery.repair"]  # the module (qsurgery.repair is the function)
    monkeypatch.setattr(engine, "_judge", lambda current, after, budget, min_gain, price: (True, "kept (test)"))
    return engine


def test_stops_at_once_when_the_plain_model_keeps_the_budget(net):
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(100.0, "top1"), target="generic", progress=False)
    assert r.reached and r.trials == [] and r.steps == [] and r.relative_cost == pytest.approx(1.0)


def test_repairs_a_strict_target_without_leaving_int8(net, tmp_path):
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int8", remedies=FAST,
               progress=False)
    assert r.trials and r.steps and r.steps[0]["remedy"] == "equalize"
    assert r.selection["kl_repaired"] < 0.5 * r.selection["kl_baseline"]
    assert r.report.repaired_kl < r.report.baseline_kl
    assert r.default_mac_share == 1.0 and r.cost.non_int8_layers == []  # every layer int8
    assert r.selection["images"] + r.report.images == len(x)  # disjoint parts, nothing dropped
    assert r.report.one_image == pytest.approx(100 / r.report.images)
    kept = [t for t in r.trials if t.accepted]
    assert all(t.kl_after < t.kl_before for t in kept)
    assert "| # | remedy |" in r.to_markdown() and "report" in r.headline()
    assert "At the plain model's cost" not in r.to_markdown()  # nothing cost anything
    assert r.plot(tmp_path / "strict.png").stat().st_size > 1000  # the metric per trial in the second panel


def test_decisions_never_see_the_report_images(net, monkeypatch):
    """Change every report image's label: the steps taken stay the same, only the reported figures move."""
    m, calib, x, y = net
    a = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int8", remedies=FAST,
               progress=False, seed=1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    report_idx = perm[int(round(0.5 * len(x))):]
    y2 = y.clone()
    y2[report_idx] = (y2[report_idx] + 1) % 10
    b = repair(m, calib, (x, y2), budget=Budget(0.0, "top1"), target="per-tensor-int8", remedies=FAST,
               progress=False, seed=1)
    assert a.steps == b.steps and [t.kl_after for t in a.trials] == [t.kl_after for t in b.trials]
    assert a.report.repaired_metric != b.report.repaired_metric


def test_widens_layers_only_where_the_target_allows_and_prices_them(net):
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int16", remedies=["precision"],
               max_trials=3, progress=False)
    widened = [t for t in r.trials if t.proposal["remedy"] == "precision"]
    assert widened and all(t.proposal["params"]["format"] in ("a16w8", "int16") for t in widened)
    assert all(t.cost > 1.0 for t in widened)  # every widening costs on the target
    with pytest.raises(RepairError, match="not allowed on target full-int8"):
        repair(m, calib, (x, y), target="full-int8", remedies=["precision"], progress=False)


def test_cost_cap_is_never_exceeded(net):
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1", max_cost=1.0), target="per-tensor-int16",
               max_trials=4, remedies=["precision", "observer"], progress=False)
    assert r.relative_cost <= 1.0 and all(t.proposal["remedy"] != "precision" for t in r.trials)


def _same_trials(a, b) -> bool:
    def key(r):
        return [(t.proposal, t.metric_after, t.kl_after, t.cost, t.accepted, t.reason) for t in r.trials]

    return key(a) == key(b) and a.steps == b.steps and a.report == b.report and a.plan.to_json() == b.plan.to_json()


def test_trials_measured_several_at_once_are_the_trials_one_at_a_time(net):
    """With several workers the engine measures the next proposals at once; the first one kept makes the rest
    stale, and they are not counted: the trials, the steps and the result are those of one at a time."""
    from qsurgery.executor import InProcess

    m, calib, x, y = net
    kwargs = dict(budget=Budget(0.0, "top1"), target="per-tensor-int16", remedies=FAST + ["precision"],
                  max_trials=8, progress=False)
    one = repair(m, calib, (x, y), **kwargs)
    wide = InProcess()
    wide.workers = 3  # windows of three proposals, each trial on a packed copy of the state
    three = repair(m, calib, (x, y), executor=wide, **kwargs)
    assert sum(t.accepted for t in one.trials) >= 2 and not all(t.accepted for t in one.trials)
    assert _same_trials(one, three)


def test_a_layer_widened_after_learned_rounding_is_rounded_again_on_its_new_grid(net, monkeypatch):
    """Learned rounding puts 4-bit weights on their grid; widened to int8, a layer gets its float weights back
    and is rounded again on the 8-bit grid (not the coarse values copied into a finer format)."""

    from qsurgery.graph import WEIGHT_SCALES


    m, calib, x, y = net
    _keeping_every_trial(monkeypatch)
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="w4a8",
               remedies=["learned_rounding", "precision"], max_trials=3, progress=False)
    widened = [s["params"]["layer"] for s in r.steps if s["remedy"] == "precision"]
    assert r.steps[0]["remedy"] == "learned_rounding" and widened
    assert all(r.plan[name].weight is not None for name in widened)  # weightless units are int8 either way
    pins = r.graph.meta[WEIGHT_SCALES]
    for name in widened:
        layer = r.plan[name]
        if layer.weight is not None and layer.module in pins:
            assert layer.weight.bits == 8 and pins[layer.module][0]["bits"] == 8
            assert not any("re-rounded" in n for n in layer.notes)


def test_a_layer_kept_float_after_learned_rounding_gets_its_float_weights_back(net, monkeypatch):
    """Widened to float (or 16 bits) after learned rounding, a layer holds its float weights again and no pinned
    grid: nothing is rounded again, and the export sees a float layer."""

    from qsurgery.graph import WEIGHT_SCALES
    from qsurgery.passes.common import folded_copy

    m, calib, x, y = net
    _keeping_every_trial(monkeypatch)
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="generic",
               remedies=["learned_rounding", "precision"], max_trials=4, progress=False)
    assert r.steps[0]["remedy"] == "learned_rounding"
    widened = [r.plan[s["params"]["layer"]] for s in r.steps if s["remedy"] == "precision"]
    float_modules = dict(folded_copy(qsurgery.capture(m, x[:1])).named_modules())
    repaired = dict(r.graph.named_modules())
    convs = [layer for layer in widened if layer.module is not None and hasattr(repaired[layer.module], "weight")]
    assert convs
    for layer in convs:
        assert torch.equal(repaired[layer.module].weight, float_modules[layer.module].weight), layer.name
        assert layer.module not in r.graph.meta[WEIGHT_SCALES]
    rounded = [n for n in r.graph.meta[WEIGHT_SCALES] if n not in {layer.module for layer in convs}]
    assert rounded  # the other layers keep their learned rounding


def test_a_layer_widened_after_bias_correction_gets_its_float_bias_back(net, monkeypatch):
    """Bias correction moves a layer's bias by its 4-bit grid's mean shift; widened to int8, the layer gets its
    float bias back (the old correction would now be an error of its own)."""

    from qsurgery.passes.common import folded_copy

    m, calib, x, y = net
    _keeping_every_trial(monkeypatch)
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="w4a8",
               remedies=["bias_correction", "precision"], max_trials=3, progress=False)
    assert r.steps[0]["remedy"] == "bias_correction"
    widened = [s["params"]["layer"] for s in r.steps if s["remedy"] == "precision"]
    float_modules = dict(folded_copy(qsurgery.capture(m, x[:1])).named_modules())
    repaired = dict(r.graph.named_modules())
    changed = 0
    for layer in r.plan:
        if layer.weight is None or repaired[layer.module].bias is None:
            continue
        same = torch.equal(repaired[layer.module].bias, float_modules[layer.module].bias)
        assert same == (layer.name in widened), layer.name
        changed += not same
    assert widened and changed


def test_a_layer_widened_only_in_its_activations_keeps_its_bias_correction(net, monkeypatch):
    """a16w8 keeps a layer's 8-bit weight grid, so the bias correction fitted to it still holds and stays."""

    from qsurgery.passes.common import folded_copy

    m, calib, x, y = net
    _keeping_every_trial(monkeypatch)
    a16 = qsurgery.Target("a16-only", "per-tensor int8 with 16-bit activations per layer",
                          formats=("int8", "a16w8"), per_channel=False, mac_cost={"int8": 1.0, "a16w8": 2.0})
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target=a16,
               remedies=["bias_correction", "precision"], max_trials=4, progress=False)
    corrected = dict(repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target=a16, remedies=["bias_correction"],
                            max_trials=1, progress=False).graph.named_modules())
    float_modules = dict(folded_copy(qsurgery.capture(m, x[:1])).named_modules())
    widened = [r.plan[s["params"]["layer"]] for s in r.steps if s["remedy"] == "precision"]
    weighted = [layer for layer in widened if layer.weight is not None]
    assert weighted
    for layer in weighted:
        bias = r.graph.get_submodule(layer.module).bias
        assert torch.equal(bias, corrected[layer.module].bias)
        assert not torch.equal(bias, float_modules[layer.module].bias)


def test_resumes_from_its_trial_log_and_refuses_other_arguments(net, tmp_path):
    m, calib, x, y = net
    kwargs = dict(budget=Budget(0.0, "top1"), target="per-tensor-int8", remedies=FAST, progress=False)
    a = repair(m, calib, (x, y), out_dir=tmp_path, **kwargs)
    log = (tmp_path / "trials.jsonl").read_text().splitlines()
    assert len(log) == len(a.trials)
    # an interrupted run: only the first trial was written
    (tmp_path / "trials.jsonl").write_text(log[0] + "\n")
    b = repair(m, calib, (x, y), out_dir=tmp_path, **kwargs)
    assert b.steps == a.steps and b.trials[0].cached and not b.trials[-1].cached
    assert [t.kl_after for t in b.trials] == pytest.approx([t.kl_after for t in a.trials])
    with torch.no_grad():
        assert torch.equal(a.sim(x[:8]), b.sim(x[:8]))
    with pytest.raises(RepairError, match="budget differ"):
        repair(m, calib, (x, y), out_dir=tmp_path, **{**kwargs, "budget": Budget(0.5, "top1")})


def test_saved_result_reloads_to_the_same_outputs(net, tmp_path):
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int8", remedies=FAST,
               progress=False)
    folder = r.save(tmp_path / "saved")
    graph = qsurgery.load(folder / "graph.pt")
    config = torch.load(folder / "config.pt", weights_only=False)
    sim, plan = qsurgery.quantize(graph, calib, config, progress=False)
    with torch.no_grad():
        assert torch.equal(sim(x[:16]), r.sim(x[:16]))
    assert plan.names() == r.plan.names()
    record = json.loads((folder / "repair.json").read_text())
    assert record["steps"] == r.steps and len(record["trials"]) == len(r.trials)


def test_bad_input_is_refused_before_any_work(net, tmp_path):
    m, calib, x, y = net
    with pytest.raises(RepairError, match="needs labeled"):
        repair(m, calib, x, budget=Budget(1.0, "top1"), progress=False)
    with pytest.raises(RepairError, match="unknown remedy 'magic'"):
        repair(m, calib, (x, y), remedies=["magic"], progress=False)
    with pytest.raises(ConfigError, match="unknown target"):
        repair(m, calib, (x, y), target="tpu9000", progress=False)
    with pytest.raises(RepairError, match="max_drop"):
        Budget(-1.0)
    with pytest.raises(RepairError, match="metric"):
        Budget(1.0, "accuracy")
    with pytest.raises(RepairError, match="selection"):
        repair(m, calib, (x, y), selection=1.0, progress=False)
    with pytest.raises(RepairError, match="min_gain_per_cost must be a number >= 0"):
        repair(m, calib, (x, y), min_gain_per_cost=-1, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RepairError, match="not a folder"):
        repair(m, calib, (x, y), out_dir=tmp_path / "file", progress=False)
    with pytest.raises(qsurgery.CaptureError):
        class Untraceable(nn.Module):
            def forward(self, x):
                return x * 2 if x.sum() > 0 else x

        repair(Untraceable(), calib, (x, y), progress=False)


def test_small_evaluation_sets_warn_with_their_resolution(net):
    m, calib, x, y = net
    r = repair(m, calib, (x[:40], y[:40]), budget=Budget(1.0, "top1"), max_trials=0, progress=False)
    assert any("one image moves top1 by 5.00 points" in w for w in r.warnings)
    # 80 selection images (1.25 points an image) certify 1.5 only if no image changes; 2.0 with one changed
    tight = repair(m, calib, (x, y), budget=Budget(1.5, "top1"), max_trials=0, progress=False)
    assert any("certify a 1.5-point budget at 84 % only if the repaired model changes no image" in w
               for w in tight.warnings)
    loose = repair(m, calib, (x, y), budget=Budget(2.0, "top1"), max_trials=0, progress=False)
    assert not any("only if" in w for w in loose.warnings)


def test_agreement_budget_needs_no_labels(net):
    m, calib, x, _ = net
    r = repair(m, calib, x, budget=Budget(0.0, "agreement"), target="per-tensor-int8", remedies=["equalize"],
               progress=False)
    assert r.report.float_metric == 100.0 and r.trials


def test_cli_repair_writes_report_model_and_verified_onnx(tmp_path, capsys):
    from qsurgery.cli import main

    code = main(["repair", "--model", "resnet18", "--input-size", "32", "--calib", "4", "--eval", "16",
                 "--batch-size", "8", "--quiet", "--out", str(tmp_path / "out"), "--remedy", "equalize",
                 "--budget", "100", "--target", "per-tensor-int8"])
    out = capsys.readouterr().out
    assert code == 0, out
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"report.md", "report.html", "repair.png", "run.json", "result", "repaired_qdq.onnx"} <= names
    assert "result" in out and "onnx" in out and "the file computes the simulated arithmetic" in out


def test_cli_repair_interrupted_says_what_is_kept_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    import importlib

    from qsurgery.cli import main

    engine = importlib.import_module("qsurgery.repair")  # the module (qsurgery.repair is also the function)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "repair", interrupted)
    out = tmp_path / "out"
    code = main(["repair", "--model", "resnet18", "--input-size", "32", "--calib", "4", "--eval", "16",
                 "--batch-size", "8", "--quiet", "--out", str(out), "--remedy", "equalize"])
    err = capsys.readouterr().err
    assert code == 130
    assert f"interrupted; what was measured is kept in {out}/, and the same command continues from it" in err
    assert "Traceback" not in err


def test_cli_repair_checks_arguments_first(tmp_path, capsys):
    from qsurgery.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["repair", "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["repair", "--remedy", "magic", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "unknown --remedy 'magic'" in capsys.readouterr().err
    assert main(["repair", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2


def test_one_changed_image_does_not_certify_a_budget():
    """200 selection images where repaired int8 gained one image on float and lost none: the plain standard error
    (0.50 point) would certify a 0.5-point budget at 84 %; the adjusted one does not, and the report interval of a
    model that changed no image is not [0, 0]."""
    engine = sys.modules["qsurgery.repair"]
    same = torch.ones(200)
    gained = same.clone()
    gained[0] = 0.0  # float wrong on one image that int8 gets right: a - b = -1 there
    plain = engine._paired_se(gained, same)
    adjusted = engine._paired_binary_se(gained, same)
    assert plain == pytest.approx(0.5, abs=0.01)
    assert Budget(0.5).z * plain <= 0.5 < Budget(0.5).z * adjusted
    lo, hi = engine._paired_interval(same, same)
    assert lo < 0 < hi and hi == pytest.approx(1.96 * 100 / 202, rel=1e-6)
    # many changes: the adjustment is small
    many = torch.tensor([1.0, 0.0] * 100)
    assert engine._paired_binary_se(many, 1 - many) == pytest.approx(engine._paired_se(many, 1 - many), rel=0.02)


def test_budget_is_judged_with_the_selection_images_uncertainty(net):
    """A top-1 drop of ~0 measured on few images is not taken as proof: the bound adds z standard errors."""
    m, calib, x, _ = net
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(0))  # float top-1 ~10 %
    point = repair(m, calib, (x, y), budget=Budget(1.0, "top1", confidence=0.5), max_trials=0, progress=False)
    sure = repair(m, calib, (x, y), budget=Budget(1.0, "top1"), max_trials=0, progress=False)
    drop = point.selection["float"] - point.selection["repaired"]
    assert point.selection["drop_bound"] == pytest.approx(max(drop, 0.0))
    assert sure.selection["drop_bound"] > drop + 1.0  # many flips: a wide interval
    assert not sure.reached
    assert Budget(1.0, confidence=0.5).z == 0.0
    with pytest.raises(RepairError, match="confidence"):
        Budget(1.0, confidence=1.0)


def test_saved_repair_folder_loads_as_a_working_model(net, tmp_path):
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int8", remedies=FAST,
               progress=False, max_trials=3)
    loaded = qsurgery.load(r.save(tmp_path / "saved"))  # no calibration data: the plan's ranges
    with torch.no_grad():
        assert torch.equal(loaded(x[:16]), r.sim(x[:16]))
    assert loaded.record["steps"] == r.steps
    with pytest.raises(qsurgery.QSurgeryError, match="not a saved repair"):
        qsurgery.load(tmp_path)


def test_repairs_a_detector_head_to_a_callable_metric_and_keeps_its_outputs(tmp_path):
    """A fused-head detector on a full-int8 target: the engine splits the head (its score channels dwarf the
    box channels), judges on the metric it is given (positions of the images as labels, as DetectionMetric
    does), keeps the original output structure through the merge, and exports and reloads the split model."""
    from test_detection import TinyYolo

    torch.manual_seed(0)
    model = TinyYolo().eval()
    calib = [torch.rand(8, 3, 32, 32) for _ in range(3)]
    x = torch.rand(48, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)

    def box_fidelity(outputs, positions):  # points: how close the box channels stay to float's
        errs = []
        for out, r in zip(outputs, ref):
            r = r[positions]
            box = [c for a in range(3) for c in range(a * 7, a * 7 + 4)]
            errs.append(float((out[:, box] - r[:, box]).pow(2).mean() / r[:, box].pow(2).mean()))
        return 100 * (1 - sum(errs) / len(errs))

    r = repair(model, calib, (x, torch.arange(len(x))), budget=Budget(0.1, box_fidelity), target="full-int8",
               remedies=["split_head", "observer"], progress=False, max_trials=4)
    assert r.steps and r.steps[0]["remedy"] == "split_head"
    assert r.report.repaired_metric > r.report.baseline_metric
    assert r.merge_outputs is not None and len(r.output_names) > 2
    # mAP-like metrics are no mean over images: their uncertainty comes from halves of the images
    assert r.report.drop_interval is not None and r.report.drop_interval[0] < r.report.drop_interval[1]
    assert r.selection["drop_bound"] > r.selection["float"] - r.selection["repaired"]
    tight = repair(model, calib, (x, torch.arange(len(x))), budget=Budget(0.001, box_fidelity), target="full-int8",
                   remedies=["observer"], progress=False, max_trials=0)
    assert any("cannot certify a 0.001-point budget" in w for w in tight.warnings)
    with torch.no_grad():
        merged = r.merge_outputs(r.sim(x[:4]))
    assert isinstance(merged, list) and [t.shape for t in merged] == [t[:4].shape for t in ref]
    rep = r.export_onnx(tmp_path / "det.onnx", x[:1], verify_inputs=[x[:8]], uint8_weights=True)
    assert rep.max_error_steps is not None and rep.max_error_steps <= 1.0
    loaded = qsurgery.load(r.save(tmp_path / "saved"))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x[:4]), merged))
    # where 16-bit layers are allowed, the precision ranking runs on the split model's merged outputs
    r16 = repair(model, calib, (x, torch.arange(len(x))), budget=Budget(0.0, box_fidelity), target="int8-int16",
                 remedies=["split_head", "precision"], progress=False, max_trials=3)
    assert r16.steps[0]["remedy"] == "split_head" and any(t.proposal["remedy"] == "precision" for t in r16.trials)


def test_high_bias_absorption_is_tried_when_named_after_equalization_and_keeps_the_model_exact(net, monkeypatch):
    m, calib, x, y = net
    assert not qsurgery.REMEDIES["absorb_high_bias"].default
    _keeping_every_trial(monkeypatch)
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int8",
               remedies=["absorb_high_bias", "equalize"], progress=False, max_trials=3)
    assert [t.proposal["remedy"] for t in r.trials] == ["equalize", "absorb_high_bias"]  # after it, once
    with torch.no_grad():  # both exact: the repaired graph still computes the float model
        assert torch.allclose(r.graph(x), m(x), rtol=1e-4, atol=1e-4)
    plain = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int8", remedies=["observer"],
                   progress=False, max_trials=2)
    assert all(t.proposal["remedy"] != "absorb_high_bias" for t in plain.trials)


def test_distillation_is_tried_only_when_named(net):
    m, calib, x, y = net
    assert not qsurgery.REMEDIES["distillation"].default
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="w4a8", remedies=["observer"],
               progress=False, max_trials=2)
    assert all(t.proposal["remedy"] != "distillation" for t in r.trials)
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="w4a8", remedies=["distillation"],
               progress=False, max_trials=2)
    assert [t.proposal["remedy"] for t in r.trials] == ["distillation"]


def test_weight_scales_are_chosen_before_the_steps_fitted_to_them(net, monkeypatch):
    """On a 4-bit grid the MSE weight scales come before bias correction and learned rounding, and once those
    are kept, the scales they were fitted to are no longer offered for change."""

    m, calib, x, y = net
    _keeping_every_trial(monkeypatch)
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="w4a8",
               remedies=["bias_correction", "observer"], max_trials=6, progress=False)
    tried = [(t.proposal["remedy"], t.proposal["params"]) for t in r.trials]
    assert tried[0] == ("observer", {"weight_observer": "mse"}) and tried[1][0] == "bias_correction"
    assert ("observer", {"weight_observer": "mse"}) not in tried[1:]


def test_a_callable_metric_vetoes_any_fall_of_a_step_its_distance_would_keep():
    """Detectors: the distance from float decides, but a step that lowers the selection mAP at all is not kept,
    even within its noise (a kept step is never worse on the images that decide); one that raises it by two
    standard errors is kept even where the distance rises; a rise within the noise does not excuse a distance
    that did not fall."""
    from qsurgery.repair import _judge, _Measure

    nan = float("nan")  # boxes have no top-1 agreement

    def judge(metric: float, dist: float) -> bool:
        return _judge(_Measure(30.0, 0.010, nan, 1.0, drop_se=1.0), _Measure(metric, dist, nan, 1.0, drop_se=1.0),
                      Budget(1.0, lambda out, positions: 0.0), 0.02)[0]

    assert not judge(29.9, 0.005)  # distance halved, mAP down 0.1 (well within two standard errors, 2.0)
    assert judge(30.0, 0.005) and judge(30.4, 0.0097)
    assert judge(32.5, 0.020)
    assert not judge(31.0, 0.0099)


def test_exact_rewrites_come_before_the_steps_fitted_to_the_weights(net):
    """On a target where bias correction's prior is above equalization's (per-channel weights), equalization is
    still tried first: bias correction and learned rounding fit the weights that equalization would rescale."""

    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="generic",
               remedies=["bias_correction", "equalize", "learned_rounding"], max_trials=3, progress=False)
    tried = [t.proposal["remedy"] for t in r.trials]
    assert tried[0] == "equalize" and set(tried[1:]) == {"bias_correction", "learned_rounding"}


def test_precision_ranks_layers_on_float_weights_after_fitted_steps(net, monkeypatch):
    """After bias correction the graph's biases are fitted to the narrow grid: the precision ranking keeps a
    layer float on the float model's weights and biases (the reference), not on the fitted ones."""

    m, calib, x, y = net
    engine = _keeping_every_trial(monkeypatch)
    seen = []
    rank = engine._rank_layers

    def spy(ctx, state):
        seen.append((state.graph, state.reference))
        return rank(ctx, state)

    monkeypatch.setattr(engine, "_rank_layers", spy)
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="w4a8",
               remedies=["bias_correction", "precision"], max_trials=2, progress=False)
    assert r.steps[0]["remedy"] == "bias_correction" and seen
    graph, reference = seen[-1]
    assert reference is not None and graph is reference


def test_a_dense_conv_tried_after_fitted_steps_replays_them_on_the_new_model(net, monkeypatch):
    """dw_to_dense after bias correction: the dense conv goes into the float model and bias correction is done
    again on it, so the trial is the model bias_correction(dw_to_dense(model)) built by hand; priced before."""

    from qsurgery.passes import bias_correction, dw_to_dense

    m, calib, x, y = net
    _keeping_every_trial(monkeypatch)
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int8",
               remedies=["bias_correction", "dw_to_dense"], max_trials=2, progress=False)
    assert [s["remedy"] for s in r.steps] == ["dw_to_dense", "bias_correction"]
    dense = r.trials[1]
    assert dense.proposal["remedy"] == "dw_to_dense" and dense.cost > 1.0  # more MACs than the separable pair
    assert not any(getattr(mod, "groups", 1) > 1 for mod in r.graph.modules())
    graph = qsurgery.capture(m, calib[0][:1])
    config = qsurgery.get_target("per-tensor-int8").config()
    by_hand = bias_correction(dw_to_dense(graph, [r.steps[0]["params"]["block"]], calib_data=calib).graph, calib,
                              config).graph
    sim, _ = qsurgery.quantize(by_hand, calib, config, progress=False)
    with torch.no_grad():
        assert torch.equal(sim(x[:16]), r.sim(x[:16]))


def test_pruning_pays_for_a_widening_the_cost_cap_refuses(net):
    """With a cost cap, a widening over the cap is tried together with pruning that pays for it; nothing kept
    breaks the cap."""
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1", max_cost=1.0), target="per-tensor-int16",
               remedies=["precision", "prune_channels"], max_trials=3, progress=False)
    paid = [t for t in r.trials if t.proposal["remedy"] == "prune_channels"]
    assert paid and all(t.proposal["params"]["then"]["remedy"] == "precision" for t in paid)
    assert all(0.5 < t.proposal["params"]["target_macs"] < 1 for t in paid)
    assert all(t.cost <= 1.0 for t in paid)  # the pruning paid for the wider layer
    assert r.relative_cost <= 1.0
    kept = [s["remedy"] for s in r.steps]
    assert "precision" not in kept or kept.index("prune_channels") < kept.index("precision")


def test_a_layer_widened_in_a_rounded_block_rounds_its_block_again(monkeypatch):
    """On w4a8 learned rounding fits each block as one; widening one of its layers to int8 rounds the block's
    other layers again with it (they had made up for its 4-bit grid), and leaves the other blocks alone."""
    import functools

    from test_techniques import _BlockNet

    from qsurgery.graph import WEIGHT_SCALES

    torch.manual_seed(0)
    m = _BlockNet().eval()
    calib, x = [images(16), images(16)], images(64)
    with torch.no_grad():
        y = m(x).argmax(1)
    engine = _keeping_every_trial(monkeypatch)
    monkeypatch.setattr(engine, "_ranking", lambda ctx, state: {"blocks.0.dw": 1.0})
    rounding = sys.modules["qsurgery.passes.learned_rounding"]
    monkeypatch.setattr(rounding, "learned_rounding", functools.partial(rounding.learned_rounding, iters=30))
    kwargs = dict(budget=Budget(0.0, "top1"), target="w4a8", remedies=["learned_rounding", "precision"],
                  progress=False)
    rounded = repair(m, calib, (x, y), max_trials=1, **kwargs)
    widened = repair(m, calib, (x, y), max_trials=2, **kwargs)
    assert rounded.steps == [{"remedy": "learned_rounding", "params": {"blocks": True}}]
    assert widened.steps[1] == {"remedy": "precision", "params": {"layer": "blocks.0.dw", "format": "int8"}}
    pins = widened.graph.meta[WEIGHT_SCALES]
    assert pins["blocks.0.dw"][0]["bits"] == 8 and pins["blocks.0.pw"][0]["bits"] == 4

    def weight(r, name):
        return r.graph.get_submodule(name).weight

    assert not torch.equal(weight(rounded, "blocks.0.pw"), weight(widened, "blocks.0.pw")) or \
        not torch.equal(weight(rounded, "blocks.0.pwl"), weight(widened, "blocks.0.pwl"))
    for name in ("blocks.1.pw", "blocks.1.dw", "blocks.1.pwl"):
        assert torch.equal(weight(rounded, name), weight(widened, name))


def test_a_remedy_that_cannot_apply_to_this_model_is_a_rejected_trial_not_a_crash(net, monkeypatch):
    """A proposal whose pass refuses the model (a unit too large for the calibration images, say) is recorded
    as not kept, with the pass's reason, and the search goes on."""
    from qsurgery.errors import CalibrationError
    from qsurgery.repair import REMEDIES, Proposal, Remedy

    def refuse(ctx, state, p):
        raise CalibrationError("3136 calibration positions cannot determine 10369 unknowns")

    remedy = Remedy("refuses", ("test",), False, "nothing", False, "always refuses",
                    lambda ctx, state: [Proposal("refuses", {}, "test", 10.0)], refuse)
    monkeypatch.setitem(REMEDIES, "refuses", remedy)
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="per-tensor-int8",
               remedies=["refuses", "equalize"], max_trials=3, progress=False)
    first = r.trials[0]
    assert first.proposal["remedy"] == "refuses" and not first.accepted
    assert first.reason.startswith("could not be applied: 3136 calibration positions")
    assert any(t.proposal["remedy"] == "equalize" for t in r.trials[1:])


def test_a_change_that_costs_must_fall_beyond_the_selection_images_noise():
    """A 5 % KL fall is kept when it is free, or when every image shares it; a costed one that a few images
    carry (within z standard errors of the per-image falls) is dropped, and the trial log says why."""
    from qsurgery.repair import _judge, _Measure

    gen = torch.Generator().manual_seed(0)
    before = (torch.rand(200, generator=gen) + 0.5).tolist()
    even = [0.95 * v for v in before]  # every image 5 % closer to float
    lumpy = list(before)  # the same mean fall, carried by random images going up and down
    noise = torch.randn(200, generator=gen)  # per-image standard error 0.07 against a mean fall of 0.05
    lumpy = [v + float(n) for v, n in zip(lumpy, noise - noise.mean())]
    shift = (sum(before) - sum(even)) / 200
    lumpy = [v - shift for v in lumpy]
    current = _Measure(80.0, sum(before) / 200, 90.0, 1.0, kl_each=before)

    def measure(each, cost):
        return _Measure(80.0, sum(each) / 200, 90.0, cost, kl_each=each)

    budget = Budget(1.0)
    assert _judge(current, measure(even, 1.04), budget, 0.02)[0]
    kept, why = _judge(current, measure(lumpy, 1.04), budget, 0.02)
    assert not kept and "not worth its cost" in why
    assert _judge(current, measure(lumpy, 1.0), budget, 0.02)[0]  # free: the 2 % fall is enough
    assert _judge(current, measure(lumpy, 1.04), Budget(1.0, confidence=0.5), 0.02)[0]  # z = 0: no noise test


def test_a_change_that_costs_must_pay_its_price_in_distance():
    """A 5 % KL fall every image shares is kept for 4 % more cost and refused for 10 % (the default price: 1 % of
    KL per 1 % of cost); price 0 lets any resolved fall pay; a free change never pays a price. The same on a
    callable metric's distance."""
    from qsurgery.repair import _judge, _Measure

    before = [1.0 + 0.001 * i for i in range(200)]
    even = [0.95 * v for v in before]
    current = _Measure(80.0, sum(before) / 200, 90.0, 1.0, kl_each=before)

    def measure(cost):
        return _Measure(80.0, sum(even) / 200, 90.0, cost, kl_each=even)

    assert _judge(current, measure(1.04), Budget(1.0), 0.02)[0]
    kept, why = _judge(current, measure(1.10), Budget(1.0), 0.02)
    assert not kept and "5.0 % fall for 10.0 % more cost" in why
    assert _judge(current, measure(1.10), Budget(1.0), 0.02, 0.0)[0]
    assert not _judge(current, measure(1.04), Budget(1.0), 0.02, 2.0)[0]
    assert _judge(current, measure(1.0), Budget(1.0), 0.02, 100.0)[0]

    def mean_map(outputs, labels):
        return 0.0

    nan = float("nan")
    det = Budget(1.0, metric=mean_map)
    here = _Measure(30.0, 0.010, nan, 1.0, drop_se=1.0)
    assert _judge(here, _Measure(30.0, 0.0095, nan, 1.04, drop_se=1.0), det, 0.02)[0]
    kept, why = _judge(here, _Measure(30.0, 0.0095, nan, 1.10, drop_se=1.0), det, 0.02)
    assert not kept and "lower the distance by 1 % per 1 % of cost" in why
    assert _judge(here, _Measure(33.0, 0.0105, nan, 1.10, drop_se=1.0), det, 0.02)[0]  # the metric rose 2 se


def test_the_path_says_where_the_cost_went_and_which_cheaper_model_was_passed(net, monkeypatch, tmp_path):
    _keeping_every_trial(monkeypatch)
    m, calib, x, y = net
    r = repair(m, calib, (x, y), budget=Budget(0.0, "top1"), target="generic",
               remedies=["bias_correction", "precision"], max_trials=3, progress=False)
    rows = r.path()
    assert [row["step"] for row in rows] == ["plain", "bias_correction"] + [
        f"precision(layer={s['params']['layer']}, format={s['params']['format']})" for s in r.steps[1:]]
    assert rows[0]["cost"] == 1.0 and rows[1]["cost"] == pytest.approx(1.0)  # bias correction is free
    assert rows[-1]["cost"] == pytest.approx(r.relative_cost) and r.relative_cost > 1.0
    assert rows[-1]["kl"] == pytest.approx(r.selection["kl_repaired"])
    md = r.to_markdown()
    assert "## Where the cost went" in md and f"{rows[1]['kl']:.3g}" in md and "max_cost=1.0" in md
    capped = repair(m, calib, (x, y), budget=Budget(0.0, "top1", max_cost=1.0), target="generic",
                    remedies=["bias_correction", "precision"], max_trials=3, progress=False)
    assert "At the plain model's cost" not in capped.to_markdown()  # nothing was spent beyond it
    assert r.plot(tmp_path / "repair.png").stat().st_size > 1000
