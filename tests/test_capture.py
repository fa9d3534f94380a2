import copy

import pytest
import torch
from torch import nn
from zoo import ZOO, build

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
    x = torch.randn(2, 3, 64, 64)
    graph = capture(model, x)
    other = torch.randn(2, 3, 64, 64)  # a different input of the captured shape
    with torch.no_grad():
        ref, got = model(other), graph(other)
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # qualified names survive: every conv/linear the graph calls is the module of that name in the model
    modules = dict(model.named_modules())
    for node in graph.graph.nodes:
        if node.op == "call_module" and isinstance(graph.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            assert node.target in modules
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
