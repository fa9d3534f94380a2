"""Cross-layer equalization, bias correction, learned rounding and quantization-aware distillation: exactness,
the defects they fix, formats, determinism, the export carrying them, and bad input."""

from dataclasses import replace

import pytest
import torch
from torch import nn

import qsurgery
from qsurgery import QuantConfig
from qsurgery.errors import CalibrationError, ConfigError
from qsurgery.graph import WEIGHT_SCALES, ChannelClip
from qsurgery.passes import absorb_high_bias, bias_correction, distill_quantized, equalize, find_pairs, learned_rounding


class DepthwiseNet(nn.Module):
    """conv -> BN -> act -> depthwise -> BN -> act -> 1x1 -> BN -> pool -> linear, with a known defect: half of
    the depthwise channels come out of BN ``spread`` times larger and the 1x1 conv reads them ``spread`` times
    weaker (the same function with ReLU; after BN folding one per-tensor scale cannot serve both halves)."""

    def __init__(self, act: type = nn.ReLU, spread: float = 30.0):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), act()
        self.dw, self.b2, self.a2 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), act()
        self.pw, self.b3 = nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(24, 10)
        with torch.no_grad():
            for bn in (self.b1, self.b2, self.b3):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
                bn.bias.uniform_(-0.1, 0.3)
            self.b2.weight[::2] *= spread
            self.b2.bias[::2] *= spread
            self.pw.weight[:, ::2] /= spread
            self.fc.weight *= 5
            # centre the logits on typical inputs, so that predictions vary from image to image
            self.eval()
            self.fc.bias -= self.forward(images(64)).mean(0)

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.dw(x)))
        x = self.b3(self.pw(x))
        return self.fc(self.pool(x).flatten(1))


def images(n: int) -> torch.Tensor:
    """Noise images whose colour balance differs from image to image (so pooled features differ)."""
    return torch.randn(n, 3, 16, 16) + 1.5 * torch.randn(n, 3, 1, 1)


def _setup(act=nn.ReLU):
    torch.manual_seed(0)
    m = DepthwiseNet(act).eval()
    x = images(1)
    graph = qsurgery.capture(m, x)
    calib = [images(32) for _ in range(2)]
    test = images(64)
    return m, graph, calib, test


def _err(graph, transformed, calib, test, config):
    """Relative output error of ``transformed`` quantized by ``config``, against float ``graph``."""
    sim, _ = qsurgery.quantize(transformed, calib, config, progress=False)
    with torch.no_grad():
        ref = graph(test)
        return float((sim(test) - ref).pow(2).mean() / ref.pow(2).mean())


def _params(g):
    return {k: v.clone() for k, v in g.state_dict().items()}


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.Identity, nn.LeakyReLU])
def test_equalize_is_exact_in_float_and_balances_channel_ranges(act):
    _, graph, calib, test = _setup(act)
    before = _params(graph)
    result = equalize(graph, check_data=calib)
    assert result.exact and result.float_error < 1e-5
    with torch.no_grad():
        assert torch.allclose(graph(test), result.graph(test), rtol=1e-4, atol=1e-5)
    pairs = {(c["first"], c["second"]) for c in result.changes}
    assert pairs == {("c1", "dw"), ("dw", "pw"), ("pw", "fc")}  # through pool + flatten into the classifier
    def spread(g):
        w = g.get_submodule("dw").weight.detach().abs().reshape(16, -1).amax(1)
        return float(w.max() / w.min())

    folded = qsurgery.quantize(graph, calib, QuantConfig.int8(), progress=False)[0].weights("dw")[0]
    before_spread = float(folded.abs().reshape(16, -1).amax(1).max() / folded.abs().reshape(16, -1).amax(1).min())
    assert spread(result.graph) < before_spread / 20
    assert all(torch.equal(v, graph.state_dict()[k]) for k, v in before.items())  # input untouched
    clips = [m for m in result.graph.modules() if isinstance(m, ChannelClip)]
    assert len(clips) == (2 if act is nn.ReLU6 else 0)


def test_equalize_recovers_per_tensor_and_pow2_weights():
    _, graph, calib, test = _setup()
    eq = equalize(graph).graph
    for config in (QuantConfig.int8(per_channel=False), QuantConfig.pow2_int8()):
        assert _err(graph, eq, calib, test, config) < 0.5 * _err(graph, graph, calib, test, config)


def test_equalize_skip_relu6_and_reasons():
    _, graph, _, _ = _setup(nn.ReLU6)
    pairs, skipped = find_pairs(graph, relu6="skip")
    assert [(p.first, p.second) for p in pairs] == [("pw", "fc")]
    assert "clips" in skipped["c1"] and "clips" in skipped["dw"]
    with pytest.raises(ConfigError, match="relu6"):
        equalize(graph, relu6="sometimes")


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "mobilenetv2_050", "resnet18", "mobilenetv3_small_050"])
def test_equalize_is_exact_on_real_architectures(name):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    graph = qsurgery.capture(model, x[:1])
    result = equalize(graph, check_data=[x])
    assert result.float_error < 1e-4, name
    if name != "resnet18":
        assert result.changes, name  # every depthwise family has pairs
    absorbed = absorb_high_bias(result.graph, [x], check_data=[torch.randn(2, 3, 64, 64) * 2])
    assert absorbed.float_error < 1e-4, name  # exact on inputs other than those that set the floors


class HighFloorNet(nn.Module):
    """conv -> BN -> act -> 1x1 conv -> BN -> act -> 3x3 conv -> pool -> linear, with a known defect: half of
    the first activation's channels never fall below ~4.5 (BN bias 5.5, small spread) while the others stay
    under ~1.5, so the activation's grid spends most of its steps on values that never occur."""

    def __init__(self, act: type = nn.ReLU):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), act()
        self.pw, self.b2, self.a2 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), act()
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)
        with torch.no_grad():
            self.b1.bias[::2], self.b1.weight[::2] = 5.5, 0.25
            self.b1.bias[1::2], self.b1.weight[1::2] = 0.0, 0.3

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.pw(x)))
        return self.fc(self.pool(self.c3(x)).flatten(1))


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.LeakyReLU])
def test_high_bias_absorption_is_exact_and_narrows_the_activation_grid(act):
    torch.manual_seed(0)
    model = HighFloorNet(act).eval()
    calib, test = [images(32) for _ in range(2)], images(64)
    graph = qsurgery.capture(model, calib[0][:1])
    before = _params(graph)
    result = absorb_high_bias(graph, calib, check_data=[test])
    assert result.exact and result.float_error < 1e-5  # exact on images it never measured the floors on
    assert all(torch.equal(v, graph.state_dict()[k]) for k, v in before.items())  # input untouched
    skipped = result.graph.meta["qsurgery_absorb_skipped"]
    assert "c3 pads its input" in skipped["pw"]  # a 3x3 conv's zero border would break the equality
    if act is nn.LeakyReLU:
        assert not result.changes and "leaky" in skipped["c1"]
        return
    assert [(c["first"], c["second"]) for c in result.changes] == [("c1", "pw")]
    assert result.changes[0]["channels"] >= 8 and result.changes[0]["largest_floor"] > 3
    def c1_scale(g):
        return float(qsurgery.quantize(g, calib, QuantConfig.int8(), progress=False)[0].quantizer("c1").scale)

    assert c1_scale(result.graph) < 0.5 * c1_scale(graph)  # the grid of c1's output: [0, ~6.5] -> [0, ~2]
    config = QuantConfig.int8()
    for name in ("input", "pw", "c3", "pool", "fc"):  # c1's own error, the rest float
        config = config.override(name, dtype="float")
    assert _err(graph, result.graph, calib, test, config) < 0.75 * _err(graph, graph, calib, test, config)
    eq = absorb_high_bias(equalize(graph).graph, calib, check_data=[test])  # after equalization too
    assert eq.float_error < 1e-5 and eq.changes
    twice = absorb_high_bias(result.graph, calib, check_data=[test])  # on its own output: still exact
    assert twice.float_error < 1e-5


def test_bias_correction_removes_the_mean_shift():
    _, graph, calib, test = _setup()
    config = QuantConfig.int8(per_channel=False)
    result = bias_correction(graph, calib, config)
    assert result.changes and not result.exact
    sim0, _ = qsurgery.quantize(graph, calib, config, progress=False)
    sim1, _ = qsurgery.quantize(result.graph, calib, config, progress=False)
    with torch.no_grad():
        ref = graph(test)
        shift0 = (sim0(test) - ref).mean(0).abs().mean()
        shift1 = (sim1(test) - ref).mean(0).abs().mean()
    assert shift1 < 0.5 * shift0
    assert _err(graph, result.graph, calib, test, config) < _err(graph, graph, calib, test, config)


def _w4():
    cfg = QuantConfig.int8()
    return replace(cfg, weight=replace(cfg.weight, bits=4), name="w4a8")


def test_learned_rounding_beats_nearest_and_keeps_its_integers():
    _, graph, calib, test = _setup()
    config = _w4()
    result = learned_rounding(graph, calib, config, iters=150, progress=False)
    assert result.changes and result.float_error < 1.0
    assert _err(graph, result.graph, calib, test, config) < _err(graph, graph, calib, test, config)
    sim, plan = qsurgery.quantize(result.graph, calib, config, progress=False)
    pins = result.graph.meta[WEIGHT_SCALES]
    for change in result.changes:
        name = change["layer"]
        snapped = result.graph.get_submodule(plan[name].module).weight
        _float, quantized = sim.weights(name)
        assert torch.equal(quantized, snapped), name  # the simulation holds exactly the chosen integers
        assert torch.equal(pins[plan[name].module][1], plan[name].weight_scale)
        assert any("learned rounding" in note for note in plan[name].notes)


class _ClippedAndOpen(nn.Module):
    """Two convs of the input: one whose outputs all fall below the ReLU6 that reads it, one read as it is."""

    def __init__(self):
        super().__init__()
        self.clipped, self.act, self.open = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.clipped.bias.fill_(-100.0)

    def forward(self, x):
        return self.act(self.clipped(x)) + self.open(x)


def test_learned_rounding_measures_the_error_after_the_clip_that_follows():
    """Errors a following ReLU6 clips away do not count: the clipped conv's error is zero, the open one's not."""
    torch.manual_seed(0)
    calib = [images(16)]
    graph = qsurgery.capture(_ClippedAndOpen().eval(), calib[0][:1])
    r = learned_rounding(graph, calib, _w4(), iters=20, progress=False)
    _, plan = qsurgery.quantize(r.graph, calib, _w4(), progress=False)
    errors = {plan[c["layer"]].module: c["error_before"] for c in r.changes}
    assert errors["clipped"] == 0.0 and errors["open"] > 0.0
    r = learned_rounding(graph, calib, _w4(), iters=20, through_clip=False, progress=False)
    assert all(c["error_before"] > 0.0 for c in r.changes)  # measured before the clip, every error counts


class _Bottleneck(nn.Module):
    """expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> project 1x1, plus the input: one block to round."""

    def __init__(self, c: int):
        super().__init__()
        self.pw, self.a1 = nn.Conv2d(c, 4 * c, 1), nn.ReLU6()
        self.dw, self.a2 = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c), nn.ReLU6()
        self.pwl = nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        return x + self.pwl(self.a2(self.dw(self.a1(self.pw(x)))))


class _BlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()
        self.blocks = nn.Sequential(_Bottleneck(8), _Bottleneck(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.act(self.stem(x))).mean((2, 3)))


def test_learned_rounding_of_blocks_fits_each_block_as_one_and_keeps_its_integers():
    """``blocks=True``: the three layers of each bottleneck are fitted together to the block's output (one error
    per block, lower than nearest's), the stem and classifier alone; the simulation holds the chosen integers."""
    torch.manual_seed(0)
    calib = [images(16), images(16)]
    graph = qsurgery.capture(_BlockNet().eval(), calib[0][:1])
    config, test = _w4(), images(64)
    r = learned_rounding(graph, calib, config, iters=40, blocks=True, block_images=8, progress=False)
    _, plan = qsurgery.quantize(r.graph, calib, config, progress=False)
    by_module = {plan[c["layer"]].module: c for c in r.changes}
    for b in ("blocks.0", "blocks.1"):
        fitted = [by_module[f"{b}.{m}"] for m in ("pw", "dw", "pwl")]
        assert {c["block"] for c in fitted} == {b} and len({c["error_after"] for c in fitted}) == 1
        assert fitted[0]["error_after"] < fitted[0]["error_before"]
    assert "block" not in by_module["stem"] and "block" not in by_module["fc"]
    assert _err(graph, r.graph, calib, test, config) < _err(graph, graph, calib, test, config)
    sim, plan = qsurgery.quantize(r.graph, calib, config, progress=False)
    for change in r.changes:
        name = change["layer"]
        assert torch.equal(sim.weights(name)[1], r.graph.get_submodule(plan[name].module).weight), name
    again = learned_rounding(graph, calib, config, iters=40, blocks=True, block_images=8, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(r.graph.state_dict().values(), again.graph.state_dict().values()))
    with pytest.raises(ConfigError, match="block_images"):
        learned_rounding(graph, calib, config, blocks=True, block_images=0, progress=False)


class _Fork(nn.Module):
    """A module with two convs whose outputs leave it separately: no one block output to match."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.a(x), self.b(x)


class _ForkNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fork = _Fork()

    def forward(self, x):
        a, b = self.fork(x)
        return a * b


def test_learned_rounding_of_blocks_says_which_modules_it_rounds_layer_by_layer():
    calib = [images(8)]
    graph = qsurgery.capture(_ForkNet().eval(), calib[0][:1])
    r = learned_rounding(graph, calib, _w4(), iters=5, blocks=True, progress=False)
    assert any("not as a block: fork: its nodes give 2 outputs" in n for n in r.notes)
    assert len(r.changes) == 2 and not any("block" in c for c in r.changes)


def test_learned_rounding_is_deterministic_and_serves_every_weight_grid():
    _, graph, calib, _ = _setup()
    a = learned_rounding(graph, calib, _w4(), iters=40, seed=3, progress=False)
    b = learned_rounding(graph, calib, _w4(), iters=40, seed=3, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.graph.state_dict().values(), b.graph.state_dict().values()))
    for config in (QuantConfig.int8(per_channel=False), QuantConfig.pow2_int8()):
        r = learned_rounding(graph, calib, config, iters=40, progress=False)
        sim, plan = qsurgery.quantize(r.graph, calib, config, progress=False)
        for change in r.changes:
            name = change["layer"]
            assert torch.equal(sim.weights(name)[1], r.graph.get_submodule(plan[name].module).weight)


def test_learned_rounding_says_which_layers_it_cannot_fit():
    _, graph, calib, _ = _setup()
    few = [torch.randn(4, 3, 16, 16)]  # 4 rows for the classifier's 24 weights per output
    r = learned_rounding(graph, few, _w4(), iters=5, progress=False)
    assert any("fc" in n and "too few" in n for n in r.notes)
    with pytest.raises(ConfigError, match="no quantized layer"):
        learned_rounding(graph, calib, _w4(), layers=["nope"], progress=False)
    with pytest.raises(ConfigError, match="pool and block_images must be >= 1"):
        learned_rounding(graph, calib, _w4(), pool=0, progress=False)
    with pytest.raises(CalibrationError):
        learned_rounding(graph, [], _w4(), progress=False)
    with pytest.raises(CalibrationError, match="NaN"):
        bias_correction(graph, [torch.full((2, 3, 16, 16), float("nan"))])


def test_techniques_survive_save_load_and_export(tmp_path):
    _, graph, calib, test = _setup()
    config = QuantConfig.int8(per_channel=False)
    g = learned_rounding(bias_correction(equalize(graph).graph, calib, config).graph, calib, config, iters=30,
                         progress=False).graph
    path = qsurgery.save(g, tmp_path / "g.pt")
    again = qsurgery.load(path)
    sim_a, plan_a = qsurgery.quantize(g, calib, config, progress=False)
    sim_b, plan_b = qsurgery.quantize(again, calib, config, progress=False)
    assert plan_a.names() == plan_b.names()
    with torch.no_grad():
        assert torch.equal(sim_a(test), sim_b(test))
    report = qsurgery.export_onnx(sim_b, tmp_path / "q.onnx", test[:1], verify_inputs=[test[:8]])
    assert report.max_error_steps is not None and report.max_error_steps <= 1.0
    assert report.top1_agreement == 1.0


def test_distillation_trains_the_quantized_model_towards_float_and_keeps_its_grids():
    _, graph, calib, test = _setup()
    config = _w4()
    before = _params(graph)
    result = distill_quantized(graph, calib, config, steps=60, lr=3e-4, batch_size=16, progress=False)
    assert all(torch.equal(v, graph.state_dict()[k]) for k, v in before.items())  # the input is not modified
    assert not result.exact and result.float_error < 0.8 and result.changes
    assert _err(graph, result.graph, calib, test, config) < _err(graph, graph, calib, test, config)
    sim, plan = qsurgery.quantize(result.graph, calib, config, progress=False)
    pins = result.graph.meta[WEIGHT_SCALES]
    for layer in plan:
        if layer.weight is not None:
            assert torch.equal(pins[layer.module][1], layer.weight_scale)  # the grid it was trained on
    again = distill_quantized(graph, calib, config, steps=60, lr=3e-4, batch_size=16, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(result.graph.state_dict().values(),
                                                  again.graph.state_dict().values()))


def test_distillation_bad_input():
    _, graph, calib, _ = _setup()
    with pytest.raises(ConfigError, match="steps"):
        distill_quantized(graph, calib, _w4(), steps=0, progress=False)
    with pytest.raises(CalibrationError, match="at least 2"):
        distill_quantized(graph, [images(1)], _w4(), progress=False)
    with pytest.raises(CalibrationError):
        distill_quantized(graph, [], _w4(), progress=False)
    # a learning rate that cannot help leaves the weights as they were, and says so
    r = distill_quantized(graph, calib, _w4(), steps=2, lr=1e3, progress=False)
    assert r.float_error == 1.0 and any("did not lower" in n for n in r.notes)


def test_simulated_models_and_plans_save_and_load(tmp_path):
    _, graph, calib, test = _setup()
    sim, plan = qsurgery.quantize(graph, calib, QuantConfig.int8(per_channel=False), progress=False)
    again = qsurgery.load(qsurgery.save(sim, tmp_path / "sim.pt"))
    with torch.no_grad():
        assert torch.equal(again(test), sim(test))
    assert again.plan.names() == plan.names()
    assert qsurgery.load(qsurgery.save(plan, tmp_path / "plan.json")).to_dict() == plan.to_dict()
    report = qsurgery.export_onnx(again, tmp_path / "q.onnx", test[:1], verify_inputs=[test[:8]])
    assert report.qdq_pairs == len(plan) and report.max_error_steps <= 1.0
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(qsurgery.QSurgeryError, match="cannot be read"):
        qsurgery.load(tmp_path / "junk.pt")
