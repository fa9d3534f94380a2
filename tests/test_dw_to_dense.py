import pytest
import torch
from torch import nn

import qsurgery
from qsurgery import CalibrationError, ConfigError
from qsurgery.passes import dw_to_dense, find_separable


class Separable(nn.Module):
    def __init__(self, k=3, stride=1, dilation=1, bn=True, bias=False, act=False, out=6):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, k, stride, padding=dilation * (k // 2), dilation=dilation, groups=8, bias=bias)
        self.bn1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()
        self.pw = nn.Conv2d(8, out, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(out) if bn else nn.Identity()
        self.head = nn.Linear(out, 4)
        torch.manual_seed(1)
        for m in (self.bn1, self.bn2):
            if isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-1, 1)

    def forward(self, x):
        y = self.bn2(self.pw(self.act(self.bn1(self.dw(self.stem(x))))))
        return self.head(y.mean((2, 3)))


VARIANTS = [dict(), dict(stride=2), dict(k=5), dict(dilation=2), dict(bn=False, bias=True), dict(bias=True, out=12)]


@pytest.mark.parametrize("kw", VARIANTS, ids=[str(v) for v in VARIANTS])
def test_exact_mode_is_equivalent_on_plain_models(kw):
    model = Separable(**kw).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = qsurgery.capture(model, x)
    code = graph.code
    result = dw_to_dense(graph, ["dw"], mode="exact")
    assert result.exact and result.changes[0]["how"] == "exact"
    with torch.no_grad():
        assert torch.allclose(result.graph(x), graph(x), atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in result.graph.modules())
    unit = result.changes[0]
    assert result.cost_after["macs"] - result.cost_before["macs"] == unit["macs_after"] - unit["macs_before"]
    assert graph.code == code  # the input graph is untouched


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xception41", "legacy_xception", "ghostnet_100"])
def test_exact_mode_zoo(name):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = qsurgery.capture(model, x)
    linear = [u.block for u in find_separable(graph) if u.linear]
    assert linear
    result = dw_to_dense(graph, linear, mode="exact")
    with torch.no_grad():
        ref, got = graph(x), result.graph(x)
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-3), name
    assert len(result.changes) == len(linear)


def test_reconstruct_recovers_a_unit_whose_activation_is_inactive():
    model = Separable(act=True).eval()
    with torch.no_grad():  # make everything before the ReLU positive: ReLU is the identity there
        model.stem.weight.abs_()
        model.stem.bias.fill_(0.1)
        model.dw.weight.abs_()
        model.bn1.weight.abs_()
        model.bn1.running_mean.fill_(-1.0)
        model.bn1.bias.abs_()
    x = torch.randn(2, 3, 16, 16).abs()
    graph = qsurgery.capture(model, x)
    with pytest.raises(ConfigError, match="reconstruct"):
        dw_to_dense(graph, ["dw"], mode="exact")
    with pytest.raises(CalibrationError, match="needs calib_data"):
        dw_to_dense(graph, ["dw"])
    calib = [torch.randn(4, 3, 16, 16).abs() for _ in range(3)]
    result = dw_to_dense(graph, ["dw"], calib_data=calib)
    assert not result.exact and result.changes[0]["how"] == "reconstructed"
    assert result.float_error < 1e-3
    assert result.changes[0]["nonlinear_share"] == 0.0 and result.changes[0]["live_channels"] == 8


class FunctionalRelu6Unit(nn.Module):
    """dw -> F.relu6 -> pw, with channel 0 pushed above 6 everywhere (a constant, dead channel)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 5, 1)
        with torch.no_grad():
            self.dw.weight.mul_(8)
            self.dw.weight[0].zero_()
            self.dw.bias[0] = 9.0

    def forward(self, x):
        return self.pw(torch.nn.functional.relu6(self.dw(x)))


def test_dry_run_measures_how_far_the_activation_is_from_the_identity():
    model = FunctionalRelu6Unit().eval()
    calib = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    graph = qsurgery.capture(model, calib[0])
    dry = dw_to_dense(graph, calib_data=calib)
    unit = dry.changes[0]
    with torch.no_grad():
        z = torch.cat([model.dw(x) for x in calib]).transpose(0, 1).reshape(4, -1)[1:]  # live channels
    assert unit["live_channels"] == 3 and unit["channels"] == 4
    assert unit["nonlinear_share"] == pytest.approx(float(((z < 0) | (z > 6)).float().mean()), abs=1e-6)
    assert 0 < unit["nonlinear_share"] < 1
    assert "nonlinear_share" not in dw_to_dense(graph).changes[0]  # no data: nothing measured
    fitted = dw_to_dense(graph, ["dw"], calib_data=calib)
    assert any("can only approximate" in n for n in fitted.notes)


def test_reconstruct_beats_ignoring_the_activation():
    model = Separable(act=True).eval()
    x = torch.randn(4, 3, 16, 16)
    graph = qsurgery.capture(model, x)
    calib = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    fitted = dw_to_dense(graph, ["dw"], calib_data=calib)
    linear = Separable(act=False).eval()
    linear.load_state_dict(model.state_dict())
    naive = dw_to_dense(qsurgery.capture(linear, x), ["dw"], mode="exact")  # composition as if no ReLU
    with torch.no_grad():
        ref = graph(x)
        err_fit = (fitted.graph(x) - ref).norm() / ref.norm()
        err_naive = (naive.graph(x) - ref).norm() / ref.norm()
    assert err_fit < err_naive
    tuned = dw_to_dense(graph, ["dw"], calib_data=calib, finetune_steps=3)
    assert "distilled" in " ".join(tuned.notes)


def test_bad_requests_and_dry_run():
    import timm

    model = Separable(act=True).eval()
    x = torch.randn(2, 3, 16, 16)
    graph = qsurgery.capture(model, x)
    dry = dw_to_dense(graph)
    assert dry.changes[0]["candidate"] == "dw" and dry.changes[0]["dense_macs"] > dry.changes[0]["macs"]
    with pytest.raises(ConfigError, match="not a depthwise conv"):
        dw_to_dense(graph, ["stem"])
    with pytest.raises(ConfigError, match="no such block"):
        dw_to_dense(graph, ["dw2"])
    tiny = qsurgery.capture(Separable(act=True, k=5).eval(), torch.randn(1, 3, 4, 4))
    with pytest.raises(CalibrationError, match="cannot determine 201 unknowns"):
        dw_to_dense(tiny, ["dw"], calib_data=[torch.randn(1, 3, 4, 4)])  # 16 positions, 8*25+1 unknowns
    with pytest.warns(UserWarning, match="stronger regularisation"):
        dw_to_dense(graph, ["dw"], calib_data=[torch.randn(1, 3, 16, 16)])
    lite = qsurgery.capture(timm.create_model("tf_efficientnet_lite0").eval(), torch.randn(1, 3, 64, 64))
    result = dw_to_dense(lite, ["blocks.0.0"], calib_data=[torch.randn(2, 3, 64, 64)])
    _, plan = qsurgery.quantize(result.graph, torch.randn(2, 3, 64, 64), progress=False)
    assert "blocks.0.0.conv_dense" in plan.names() and "blocks.0.0.conv_dw" not in plan.names()
