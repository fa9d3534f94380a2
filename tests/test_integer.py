"""The integer-exact simulation: what onnxruntime's integer kernels compute, bit for bit."""

import platform

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qsurgery
from qsurgery.export import export_onnx
from qsurgery.quant.integer import integer_model


class Block(nn.Module):
    """conv+ReLU6 -> depthwise+ReLU -> pointwise, residual add, global pool, linear: every integer kernel."""

    def __init__(self, act: type[nn.Module] = nn.ReLU6, classifier: bool = True):
        super().__init__()
        self.classifier = classifier
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), act())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x) if self.classifier else x


def _simulated(act=nn.ReLU6, config=None, classifier=True):
    torch.manual_seed(0)
    model = Block(act, classifier).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    graph = qsurgery.capture(model, torch.randn(1, 3, 32, 32))
    calib = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    sim, plan = qsurgery.quantize(graph, calib, config, progress=False)
    return sim, plan


def test_integer_units_and_closeness_to_the_float_simulation():
    sim, plan = _simulated()
    twin = integer_model(sim)
    assert set(twin.integer_units) == {"stem.0", "dw.0", "pw.0", "add", "pool"}
    assert set(twin.float_units) == {"fc"}
    x = torch.randn(32, 3, 32, 32)
    with torch.no_grad():
        a, b = sim(x), twin(x)
    step = plan["fc"].scale
    # both round the same exact values; they part only on the rare value near a rounding midpoint
    assert float((a - b).abs().max()) <= 8 * step
    assert float((a - b).abs().mean()) < 0.05 * step
    assert int((a.argmax(1) == b.argmax(1)).sum()) >= 31
    # the simulation is not changed
    with torch.no_grad():
        assert torch.equal(sim(x), a)


def test_integer_outputs_lie_on_the_quantization_grid():
    sim, plan = _simulated()
    twin = integer_model(sim)
    seen = {}
    gm = twin.graph_module
    hooks = [gm.get_submodule(f"qsurgery_int_{i}").register_forward_hook(
        lambda m, i, o, k=name: seen.__setitem__(k, o)) for i, name in enumerate(twin.integer_units)]
    with torch.no_grad():
        twin(torch.randn(4, 3, 32, 32))
    for h in hooks:
        h.remove()
    for name, value in seen.items():
        s, z = plan[name].scale, plan[name].zero_point
        q = value.double() / s + z
        assert torch.allclose(q, q.round(), atol=1e-4), name
        assert q.round().min() >= 0 and q.round().max() <= 255, name


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the twin follows onnxruntime's x86 kernels (ARM requantizes pooling in fixed point)")
def test_onnxruntime_integer_kernels_match_the_integer_simulation_exactly(tmp_path):
    sim, plan = _simulated(classifier=False)  # every unit integer: nothing left to float32 summation order
    x = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    report = export_onnx(sim, tmp_path / "u8.onnx", x[0], verify_inputs=x[1:], uint8_weights=True)
    assert report.integer_units == 5 and not report.float_units
    assert report.runtime_max_abs_error == 0.0
    # the file itself: uint8 weights with zero point 128, the same values as the int8 ones
    import onnx

    model = onnx.load(str(report.path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].ndim > 1]
    assert weights and all(inits[n.input[0]].dtype == np.uint8 and (inits[n.input[2]] == 128).all()
                           for n in weights)
    # onnxruntime really ran integer kernels (not float convs on dequantized values)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(report.path), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool"} <= ops


def test_a_float_classifier_differs_from_onnxruntime_by_rounding_ties_at_most(tmp_path):
    sim, _ = _simulated()
    x = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    u8 = export_onnx(sim, tmp_path / "u8.onnx", x[0], verify_inputs=x[1:], uint8_weights=True)
    assert u8.runtime_max_error_steps <= 1.0 and u8.runtime_top1_agreement == 1.0
    assert list(u8.float_units) == ["fc"] and "runs as the float simulation" in u8.float_units["fc"]
    assert "integer-exact simulation (5 integer units)" in u8.summary()


def test_activations_onnxruntime_cannot_fuse_keep_the_float_path():
    sim, _ = _simulated(act=nn.SiLU)
    twin = integer_model(sim)
    assert "stem.0" in twin.float_units and "float" in twin.float_units["stem.0"]
    assert {"dw.0", "pw.0", "add", "pool"} <= set(twin.integer_units)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(twin(x)).all()


def test_wide_layers_stay_float_and_bad_input_is_refused():
    sim, _ = _simulated(config=qsurgery.QuantConfig.int8().override("pw.0", bits=16))
    twin = integer_model(sim)
    assert "pw.0" in twin.float_units and "16-bit" in twin.float_units["pw.0"]
    with pytest.raises(TypeError, match="SimulatedModel"):
        integer_model(nn.Linear(2, 2))


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the twin follows onnxruntime's x86 QLinearAdd kernel")
@pytest.mark.parametrize("sa, sb, sc, za, zb, zc", [
    # scales and zero points where rounding zc - (ra*za + rb*zb) once or twice changes some outputs
    (0.07733961939811707, 0.04985100030899048, 0.028835292905569077, 117, 231, 97),
    (0.09699961543083191, 0.051227159798145294, 0.0853724256157875, 147, 14, 142),
    (0.05870269611477852, 0.029184820130467415, 0.08007223159074783, 122, 232, 71),
])
def test_integer_add_equals_onnxruntime_on_every_input_pair(sa, sb, sc, za, zb, zc):
    from onnx import TensorProto, helper, numpy_helper

    from qsurgery.quant import ActQuantizer, TensorFormat
    from qsurgery.quant.integer import _Grid, _IntegerAdd

    def grid(s, z):
        q = ActQuantizer("t", TensorFormat("int", 8))
        q.scale.fill_(s)
        q.zero_point.fill_(z)
        q.mode = "quant"
        return _Grid(q)

    a = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(1, 1, 256, 256)
    b = np.tile(np.arange(256, dtype=np.uint8), 256).reshape(1, 1, 256, 256)
    consts = [numpy_helper.from_array(np.asarray(v, dtype=t), n) for n, v, t in
              [("sa", sa, np.float32), ("za", za, np.uint8), ("sb", sb, np.float32), ("zb", zb, np.uint8),
               ("sc", sc, np.float32), ("zc", zc, np.uint8)]]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
             helper.make_node("Add", ["af", "bf"], ["cf"]),
             helper.make_node("QuantizeLinear", ["cf", "sc", "zc"], ["y"])]
    graph = helper.make_graph(nodes, "add", [helper.make_tensor_value_info(n, TensorProto.UINT8, a.shape)
                                             for n in ("a", "b")],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"a": a, "b": b})[0]
    ga, gb, gc = grid(sa, za), grid(sb, zb), grid(sc, zc)
    got = _IntegerAdd(ga, gb, gc)(ga.values(torch.tensor(a, dtype=torch.float64) - za),
                                  gb.values(torch.tensor(b, dtype=torch.float64) - zb))
    q = (got.double() / gc.scale.double()).round() + zc
    assert int((q.numpy() != expected).sum()) == 0


def test_a_dead_channel_with_a_bias_keeps_its_bias_inside_int32(tmp_path):
    torch.manual_seed(0)
    model = Block(classifier=False).eval()
    with torch.no_grad():  # channel 3: weights ~0 after training, bias not (BN folded into it)
        model.stem[0].weight[3].mul_(1e-7)
        model.stem[1].bias[3] = -4.0
    graph = qsurgery.capture(model, torch.randn(1, 3, 32, 32))
    sim, plan = qsurgery.quantize(graph, [torch.randn(16, 3, 32, 32) for _ in range(2)], progress=False)
    assert any("bias fits int32" in n for n in plan["stem.0"].notes)
    bias = sim.graph_module.get_submodule("stem.0").bias.detach()
    assert float((bias / (plan["input"].scale * plan["stem.0"].weight_scale)).abs().max()) <= 2 ** 30 + 64
    x = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    report = export_onnx(sim, tmp_path / "dead.onnx", x[0], verify_inputs=x[1:], uint8_weights=True)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert report.runtime_max_abs_error == 0.0  # no int32 overflow in onnxruntime's QLinearConv
