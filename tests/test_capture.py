import copy
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import SIZE, ZOO, build

import qsurgery
from qsurgery import CaptureError, capture


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("source,name", ZOO, ids=[f"{s}-{n}" for s, n in ZOO])
def test_zoo_capture_is_equivalent_and_quantizes(source, name):
    model = build(source, name)
    before = _state(model)
    side = SIZE.get(name, 64)
    x = torch.randn(2, 3, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-parameterization notices: their own test
        graph = capture(model, x)
    other = torch.randn(2, 3, side, side)  # a different input of the captured shape
    with torch.no_grad():
        ref, got = model(other), graph(other)
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # qualified names survive: every conv/linear the graph calls is the module of that name in the model
    modules = dict(model.named_modules())
    for node in graph.graph.nodes:
        if node.op == "call_module" and isinstance(graph.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            if node.target not in modules:  # a conv a collapsed multi-branch block made, under that block's name
                assert graph.meta["qsurgery_reparameterized"] and node.target.rpartition(".")[0] in modules
                continue
            assert torch.equal(graph.get_submodule(node.target).weight, modules[node.target].weight)
    # the simulation runs on every architecture; at 16 bits it must be close to float
    cfg = qsurgery.QuantConfig.int8().override("*", bits=16)
    sim, plan = qsurgery.quantize(graph, [x, other], cfg, progress=False)
    with torch.no_grad():
        q16 = sim(other)
    rel = ((q16 - got).norm() / got.norm()).item()
    assert rel < 2e-2, rel
    sim8, _ = qsurgery.quantize(graph, [x], progress=False)
    with torch.no_grad():
        assert torch.isfinite(sim8(other)).all()
    assert _same_state(before, model.state_dict())
    # ... and its QDQ file computes the simulated arithmetic in onnxruntime
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ONNX exporter's own notices
        report = qsurgery.export_onnx(sim8, Path(tmp) / "m.onnx", x[:1], verify_inputs=[other])
    assert report.matches_simulation, report.summary()


def test_multi_branch_blocks_are_collapsed_before_capture_and_it_says_so():
    import timm

    model = timm.create_model("mobileone_s0", pretrained=False).eval()
    before = _state(model)
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(UserWarning, match=r"collapsed \d+ multi-branch block\(s\) \(\d+ MobileOneBlock"):
        graph = capture(model, x)  # the check inside compares with the unchanged model: equivalent
    branches = capture(model, x, reparameterize=False)
    convs = [sum(isinstance(m, nn.Conv2d) for m in g.modules()) for g in (graph, branches)]
    assert convs[0] < convs[1] / 2
    assert graph.meta["qsurgery_reparameterized"]["MobileOneBlock"] > 0
    assert branches.meta["qsurgery_reparameterized"] == {}
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(graph(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert _same_state(before, model.state_dict())


def test_keywords_left_at_their_defaults_become_constants():
    """A forward such as timm's ``(x, attn_mask=None, is_causal=False)`` takes only the input the example gave,
    so the export does not turn ``is_causal`` into a tensor."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x, attn_mask=None, is_causal: bool = False):
            q, k, v = self.qkv(x).chunk(3, -1)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                                    is_causal=is_causal)

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    graph = capture(Attn().eval(), x)
    assert [n.name for n in graph.graph.nodes if n.op == "placeholder"] == ["x"]
    sim, _ = qsurgery.quantize(graph, [x], progress=False)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = qsurgery.export_onnx(sim, Path(tmp) / "a.onnx", x)
    assert report.matches_simulation, report.summary()


def test_tf_same_padding_becomes_static_pad_and_plain_conv():
    import timm
    from timm.layers.conv2d_same import Conv2dSame

    model = timm.create_model("tf_efficientnet_lite0").eval()
    graph = capture(model, torch.randn(1, 3, 96, 96))
    assert not any(isinstance(m, Conv2dSame) for m in graph.modules())
    pads = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.pad]
    assert pads, "stride-2 TF-same convs need an explicit pad"
    assert type(graph.get_submodule("blocks.0.0.conv_dw")) is nn.Conv2d
    assert type(graph.get_submodule("bn1")) is nn.BatchNorm2d  # BatchNormAct2d split ...
    assert "bn1.act" in {n.target for n in graph.graph.nodes if n.op == "call_module"}  # ... into BN + act
    assert graph.meta["qsurgery_input_shapes"] == [(1, 3, 96, 96)]
    assert any(isinstance(m, Conv2dSame) for m in model.modules())  # the user's model keeps its modules


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: untraceable
            return x * 2
        return x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), Gate())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.body(self.conv(x)))


class TopLevelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y + 1
        return y


def test_untraceable_module_is_named_with_the_way_out():
    model = WithGate().eval()
    before = _state(model)
    with pytest.raises(CaptureError) as err:
        capture(model, torch.randn(1, 3, 16, 16))
    text = str(err.value)
    assert "'body.1'" in text and "Gate" in text and "control flow" in text and "leaf_modules" in text
    assert _same_state(before, model.state_dict())
    graph = capture(model, torch.randn(1, 3, 16, 16), leaf_modules=["body.1"])
    x = torch.randn(1, 3, 16, 16)
    assert torch.allclose(graph(x), model(x))
    graph2 = capture(model, torch.randn(1, 3, 16, 16), leaf_modules=[Gate])
    assert torch.allclose(graph2(x), model(x))


def test_top_level_failure_and_unknown_leaf_name():
    with pytest.raises(CaptureError, match="top-level forward of TopLevelBranch"):
        capture(TopLevelBranch(), torch.randn(1, 3, 8, 8))
    with pytest.raises(CaptureError, match="close names.*body.1"):
        capture(WithGate(), torch.randn(1, 3, 8, 8), leaf_modules=["body.2"])


def test_wrong_example_shape_and_type():
    model = WithGate().eval()
    with pytest.raises(CaptureError, match=r"shape \(1, 1, 16, 16\).*3 input channels"):
        capture(model, torch.randn(1, 1, 16, 16))
    with pytest.raises(CaptureError, match="tensor or a tuple"):
        capture(model, [1, 2, 3])
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, torch.randn(1))


def test_capture_does_not_touch_training_mode_or_weights():
    model = WithGate().train()
    snapshot = copy.deepcopy(model.state_dict())
    capture(model, torch.randn(1, 3, 8, 8), leaf_modules=["body.1"])
    assert model.training
    assert _same_state(snapshot, model.state_dict())


def test_captured_graph_is_entirely_in_eval_mode():
    import timm

    graph = capture(timm.create_model("tf_efficientnet_lite0"), torch.randn(1, 3, 64, 64))
    assert not any(m.training for m in graph.modules())
