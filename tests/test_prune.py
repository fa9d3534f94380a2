"""Structured channel pruning: coupled groups, physical removal, predicted MACs, recovery, refusals."""

import warnings

import pytest
import timm
import torch
from torch import nn
from zoo import SIZE, ZOO, build

import qsurgery
from qsurgery import CalibrationError, ConfigError
from qsurgery.passes import channel_groups, distill, graph_cost, prune_channels, pruning_sensitivity


def conv_bn(ci, co, k=3, s=1):
    return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU())


class CSPDetector(nn.Module):
    """YOLO-style: CSP blocks (chunk + residual + concat), an upsampling concat neck, two fused heads."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.cv1 = conv_bn(16, 32, 1)
        self.m = conv_bn(16, 16)
        self.cv2 = conv_bn(48, 32, 1)
        self.down = conv_bn(32, 64, 3, 2)
        self.lateral = conv_bn(64, 32, 1)
        self.fuse = conv_bn(64, 32, 1)
        self.head1 = nn.Conv2d(64, 21, 1)
        self.head2 = nn.Conv2d(32, 21, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = self.cv1(x).chunk(2, 1)
        y = self.cv2(torch.cat([a, b, self.m(b) + b], 1))
        d = self.down(y)
        up = nn.functional.interpolate(self.lateral(d), scale_factor=2.0, mode="nearest")
        p = self.fuse(torch.cat([up, y], 1))
        return [self.head1(d), self.head2(p)]


def _check(graph, result, x):
    out_before, out_after = graph(x), result.graph(x)
    if isinstance(out_before, torch.Tensor):
        out_before, out_after = [out_before], [out_after]
    assert [o.shape for o in out_before] == [o.shape for o in out_after]
    step = result.changes[-1]
    assert result.cost_after["macs"] == step["macs"] == step["predicted_macs"]
    assert result.cost_after["params"] < result.cost_before["params"]
    assert not result.exact


@pytest.mark.slow
@pytest.mark.parametrize("source,name", ZOO, ids=[f"{s}-{n}" for s, n in ZOO])
def test_zoo_prune_30_percent(source, name):
    """30 % channel pruning on every architecture of the zoo: same output shapes, MACs predicted exactly, or a
    clear refusal where no channel can be removed consistently (a ViT's residual stream ties every channel)."""
    model = build(source, name)
    side = SIZE.get(name, 64)
    x = torch.randn(2, 3, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-parameterization notices
        graph = qsurgery.capture(model, x[:1])
    if name == "deit_tiny_patch16_224":
        with pytest.raises(ConfigError, match="no prunable channel group"):
            prune_channels(graph, amount=0.3)
        return
    result = prune_channels(graph, amount=0.3)
    _check(graph, result, x)
    ratio = result.macs_ratio
    if "regnet" in name:  # their grouped convs tie whole stages: less to prune, and the result says why
        assert 0.6 < ratio < 0.95 and any("grouped conv" in n for n in result.notes)
    else:
        assert 0.3 < ratio < 0.8, ratio


def test_concat_heavy_detector_keeps_heads_and_offsets():
    torch.manual_seed(0)
    model = CSPDetector().eval()
    x = torch.randn(2, 3, 32, 32)
    graph = qsurgery.capture(model, x[:1])
    cg = channel_groups(graph)
    assert not cg.unknown_ops
    result = prune_channels(graph, amount=0.3, exclude=["lateral"])
    _check(graph, result, x)
    g = result.graph
    assert g.head1.out_channels == 21 and g.head2.out_channels == 21  # outputs keep their channels
    assert g.get_submodule("lateral.0").out_channels == 32  # excluded
    # cv1's two halves are chunked apart: each half pruned alike, and cv2 reads 3 blocks of the b-half width
    half = g.get_submodule("cv1.0").out_channels // 2
    assert g.get_submodule("cv2.0").in_channels == 2 * half + g.get_submodule("m.0").out_channels
    assert g.get_submodule("m.0").out_channels == half  # residual with b couples them


def test_dead_channels_are_the_ones_removed_and_nothing_changes():
    torch.manual_seed(0)
    model = CSPDetector().eval()
    with torch.no_grad():  # make a quarter of down's channels dead: zero filters and zero BN shift
        bn = model.down[1]
        model.down[0].weight[:16] = 0
        bn.bias[:16] = 0
        bn.weight[:16] = 1e-8
        bn.running_mean[:16] = 0
    x = torch.randn(2, 3, 32, 32)
    graph = qsurgery.capture(model, x[:1])
    result = prune_channels(graph, amount=0.25, exclude=["stem", "cv1", "m", "cv2", "lateral", "fuse"])
    assert result.graph.get_submodule("down.0").out_channels == 48
    for a, b in zip(graph(x), result.graph(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_target_macs_iterative_steps_and_kd_recovery():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    graph = qsurgery.capture(model, x[:1])
    r = prune_channels(graph, target_macs=0.6, steps=2)
    assert len(r.changes) == 2
    assert 0.5 < r.macs_ratio <= 0.62
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    plain = prune_channels(graph, amount=0.3)
    kd = prune_channels(graph, amount=0.3, calib_data=calib, recover="kd", recover_steps=30, lr=1e-3,
                        allocation="uniform")
    with torch.no_grad():
        ref = graph(x)
        err = [float((g(x) - ref).pow(2).mean()) for g in (plain.graph, kd.graph)]
    assert err[1] < 0.7 * err[0], err
    taylor = prune_channels(graph, amount=0.3, criterion="taylor", calib_data=calib, allocation="uniform")
    gamma = prune_channels(graph, amount=0.3, criterion="bn_gamma")
    assert taylor.cost_after["macs"] == gamma.cost_after["macs"] == plain.cost_after["macs"]


class Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv_bn(3, 8), conv_bn(8, 8), conv_bn(8, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.b(torch.roll(self.a(x), 1, dims=1))  # a channel shift: coupling unknown to the analysis
        return self.fc(self.c(x).mean((2, 3)))


def test_prune_refusals():
    graph = qsurgery.capture(Rolled().eval(), torch.randn(1, 3, 8, 8))
    r = prune_channels(graph, amount=0.5)
    assert any("roll" in n for n in r.notes)
    assert r.graph.get_submodule("a.0").out_channels == 8  # not pruned through the unknown op
    assert r.graph.get_submodule("b.0").out_channels == 4
    assert r.graph(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(ConfigError, match="zero channels|amount"):
        prune_channels(graph, amount=1.0)
    with pytest.raises(ConfigError, match="not modules"):
        prune_channels(graph, exclude=["nope"])
    with pytest.raises(CalibrationError, match="calib_data"):
        prune_channels(graph, criterion="taylor")
    with pytest.raises(CalibrationError, match=r"captured for \(N, 3, 8, 8\)"):  # checked like quantize's
        prune_channels(graph, criterion="taylor", calib_data=[torch.randn(2, 3, 10, 10)])
    with pytest.raises(CalibrationError, match="calib_data"):
        prune_channels(graph, recover="kd")


def _masked(graph, cg, removed):
    """The unpruned graph with the removed channels forced to zero at every conv/linear/BN that carries them
    (zero activations stay zero through ReLU/SiLU): what the pruned graph must compute exactly."""
    import copy

    from qsurgery.passes.prune import _kept

    g = copy.deepcopy(graph)
    with torch.no_grad():
        for name, mp in cg.out_maps.items():
            keep = set(_kept(mp, removed))
            drop = [i for i in range(len(mp)) if i not in keep]
            if not drop:
                continue
            m = g.get_submodule(name)
            m.weight[drop] = 0
            if getattr(m, "bias", None) is not None:
                m.bias[drop] = 0
    return g


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18", "csp"])
def test_pruned_graph_equals_the_masked_original(arch):
    from qsurgery.passes.prune import _elements, _scores, _select

    torch.manual_seed(0)
    model = CSPDetector().eval() if arch == "csp" else timm.create_model(arch, pretrained=False).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 32, 32)
    graph = qsurgery.capture(model, x[:1])
    cg = channel_groups(graph)
    removed = _elements(cg, _select(cg, _scores(graph, cg, "l1", None), 0.3))
    pruned = prune_channels(graph, amount=0.3).graph
    masked = _masked(graph, cg, removed)
    a, b = masked(x), pruned(x)
    for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


def test_bias_compensation_keeps_the_mean_of_removed_channels():
    torch.manual_seed(0)
    model = CSPDetector().eval()
    with torch.no_grad():  # channels with a large constant part: BN shift, then SiLU
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(1.0, 3.0)
    x = torch.rand(4, 3, 32, 32)
    calib = [torch.rand(8, 3, 32, 32) for _ in range(2)]
    graph = qsurgery.capture(model, x[:1])
    plain = prune_channels(graph, amount=0.3)
    comp = prune_channels(graph, amount=0.3, calib_data=calib, allocation="uniform")
    assert comp.cost_after["macs"] == plain.cost_after["macs"]  # (compensation adds conv biases)
    with torch.no_grad():
        ref = graph(x)
        err = [sum(float((o - r).pow(2).mean()) for o, r in zip(g(x), ref)) for g in (plain.graph, comp.graph)]
    assert err[1] < 0.5 * err[0], err


class HalfDead(nn.Module):
    """``b`` has 16 near-dead channels (tiny BN scale, no shift); ``a``'s channels all matter."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = conv_bn(3, 16), conv_bn(16, 16), conv_bn(16, 32)
        self.fc = nn.Linear(32, 10)
        with torch.no_grad():
            self.b[1].weight[16:] = 1e-3
            self.b[1].bias[16:] = 0.0
            self.fc.weight.mul_(20.0)  # confident logits, so that removing a live channel shows in the KL

    def forward(self, x):
        return self.fc(self.b(self.a(self.stem(x))).mean((2, 3)))


def test_sensitivity_allocation_spends_the_budget_where_the_output_moves_least():
    torch.manual_seed(0)
    graph = qsurgery.capture(HalfDead().eval(), torch.randn(1, 3, 16, 16))
    calib = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    uniform = prune_channels(graph, amount=0.25, calib_data=calib, allocation="uniform")
    sens = prune_channels(graph, amount=0.25, calib_data=calib, progress=False)  # auto: calib_data -> sensitivity
    assert sens.changes[0]["allocation"] == "sensitivity"
    assert sens.cost_after["macs"] <= uniform.cost_after["macs"]
    removed = {row["modules"][0]: row["removed"] for row in sens.changes[0]["clusters"]}
    assert removed["b.0"] >= 16 and removed.get("a.0", 0) < 4  # uniform: 8 of b, 4 of a
    x = torch.randn(32, 3, 16, 16)
    with torch.no_grad():
        ref = graph(x).log_softmax(1)
        kl = [float(torch.nn.functional.kl_div(g(x).log_softmax(1), ref, log_target=True, reduction="batchmean"))
              for g in (uniform.graph, sens.graph)]
    assert kl[1] < 0.5 * kl[0], kl
    measured = pruning_sensitivity(graph, calib, progress=False)  # once, for several budgets
    assert "b.0" in measured.to_markdown()
    again = prune_channels(graph, amount=0.25, calib_data=calib, sensitivity=measured)
    assert again.cost_after == sens.cost_after
    smaller = prune_channels(graph, target_macs=0.5, calib_data=calib, sensitivity=measured)
    assert smaller.cost_after["macs"] <= 0.5 * graph_cost(graph)["macs"] < again.cost_after["macs"]
    with pytest.raises(ConfigError, match="another graph"):
        prune_channels(smaller.graph, amount=0.25, calib_data=calib, sensitivity=measured)
    with pytest.raises(CalibrationError, match="calib_data"):
        prune_channels(graph, amount=0.25, allocation="sensitivity")
    with pytest.raises(ConfigError, match="allocation"):
        prune_channels(graph, amount=0.25, allocation="global")


def test_distill_trains_a_copy_and_only_the_named_modules():
    torch.manual_seed(0)
    graph = qsurgery.capture(HalfDead().eval(), torch.randn(1, 3, 16, 16))
    student = prune_channels(graph, amount=0.5).graph
    before = {k: v.clone() for k, v in student.state_dict().items()}
    calib = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    tuned = distill(student, graph, calib, steps=40, lr=1e-2, trainable=["fc"])
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # the student is untouched
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"fc.weight", "fc.bias"}
    x = calib[0]
    with torch.no_grad():
        ref = graph(x).log_softmax(1)
        kl = [float(torch.nn.functional.kl_div(g(x).log_softmax(1), ref, log_target=True, reduction="batchmean"))
              for g in (student, tuned)]
    assert kl[1] < 0.5 * kl[0], kl
    with pytest.raises(CalibrationError, match="not in the student"):
        distill(student, graph, calib, steps=1, trainable=["nope"])
    with pytest.raises(CalibrationError, match="calib_data"):
        distill(student, graph, None, steps=1)


def test_per_layer_amounts_prune_only_the_named_clusters():
    torch.manual_seed(0)
    graph = qsurgery.capture(HalfDead().eval(), torch.randn(1, 3, 16, 16))
    calib = [torch.randn(16, 3, 16, 16) for _ in range(2)]
    result = prune_channels(graph, amount={"b": 0.5, "stem.*": 0.25}, calib_data=calib)  # no sensitivity run
    pruned = dict(result.graph.named_modules())
    assert pruned["b.0"].out_channels == 16 and pruned["stem.0"].out_channels == 12
    assert pruned["a.0"].out_channels == 16 and pruned["fc"].in_features == 16
    assert "clusters" not in result.changes[0]
    _check(graph, result, torch.randn(2, 3, 16, 16))
    with pytest.raises(ConfigError, match="'head'.*no module of this graph matches"):
        prune_channels(graph, amount={"head": 0.5})
    with pytest.raises(ConfigError, match="shares in"):
        prune_channels(graph, amount={"b": 1.0})
    with pytest.raises(ConfigError, match="already say where"):
        prune_channels(graph, amount={"b": 0.5}, calib_data=calib, allocation="sensitivity")
