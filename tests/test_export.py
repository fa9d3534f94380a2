import json
import os
import stat

import onnx
import pytest
import torch
from test_quantize import small_model
from torch import nn

import qsurgery
from qsurgery.export import ExportError, export_onnx


@pytest.fixture
def simulated():
    m = small_model()
    x = torch.randn(4, 3, 12, 12)
    graph = qsurgery.capture(m, x)
    calib = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    return graph, calib, x


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_float_export_matches_pytorch(simulated, tmp_path):
    graph, _, x = simulated
    report = export_onnx(graph, tmp_path / "f.onnx", x, verify_inputs=[torch.randn(2, 3, 12, 12)])
    assert not report.qdq and report.max_abs_error < 1e-5 and report.verified_on == 6
    assert "QuantizeLinear" not in _ops(report.path)
    assert report.top1_agreement == 1.0


def test_qdq_export_carries_our_scales_exactly(simulated, tmp_path):
    graph, calib, x = simulated
    sim, plan = qsurgery.quantize(graph, calib, progress=False)
    ranges = tmp_path / "ranges.json"
    report = export_onnx(sim, tmp_path / "q.onnx", x, calib_ranges_json=ranges, verify_inputs=calib)
    assert report.qdq and report.simplified
    assert report.qdq_pairs == len(plan) == 6 and report.int_weights == 3
    assert report.max_error_steps <= 1.0 and report.top1_agreement == 1.0
    assert all(steps <= 1.0 for _, steps, _ in report.layer_differences)  # at most rounding-tie flips
    umask = os.umask(0)
    os.umask(umask)
    for written in (report.path, ranges):  # the user's normal permissions, not mkstemp's 0600
        assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    model = onnx.load(str(report.path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dq_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    for node in dq_weights:
        assert inits[node.input[0]].dtype.name == "int8"
        assert inits[node.input[1]].shape[0] == inits[node.input[0]].shape[0]  # per output channel
    conv2_scale = next(inits[n.input[1]] for n in dq_weights if n.input[0].startswith("conv2"))
    assert torch.allclose(torch.tensor(conv2_scale), plan["conv2"].weight_scale)
    data = json.loads(ranges.read_text())
    assert data["input"]["scale"] == pytest.approx(plan["input"].scale)
    assert {v["layer"] for v in data.values()} == set(plan.names())


def test_widened_float_and_fp16_layers_in_qdq(simulated, tmp_path):
    graph, calib, x = simulated
    cfg = qsurgery.QuantConfig.int8().override("conv2", bits=16).override("fc", dtype="float")
    sim, plan = qsurgery.quantize(graph, calib, cfg, progress=False)
    with pytest.raises(ExportError, match=r"conv2.*opset >= 21"):
        export_onnx(sim, tmp_path / "q.onnx", x, verify=False)
    assert not list(tmp_path.iterdir())
    report = export_onnx(sim, tmp_path / "q.onnx", x, opset=21)
    assert report.max_error_steps is None or report.max_error_steps <= 1.0
    assert report.max_abs_error < 1e-4  # the output is float (fc kept float)
    assert report.qdq_pairs == 5  # 6 units, fc float: no pair for it
    model = onnx.load(str(report.path))
    zps = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    inits = {i.name: i for i in model.graph.initializer}
    types = {(inits[z.input[2]].data_type if z.input[2] in inits else consts[z.input[2]].attribute[0].t.data_type)
             for z in zps}
    assert onnx.TensorProto.UINT16 in types and onnx.TensorProto.UINT8 in types
    sim16, _ = qsurgery.quantize(graph, calib, qsurgery.QuantConfig.int8().override("conv*", dtype="fp16"),
                                 progress=False)
    rep16 = export_onnx(sim16, tmp_path / "h.onnx", x)
    assert "Cast" in _ops(rep16.path) and rep16.max_error_steps <= 1.0


def test_narrow_formats_travel_in_8_bit_types(simulated, tmp_path):
    graph, calib, x = simulated
    cfg = qsurgery.QuantConfig.int8().override("conv*", weight_bits=4).override("conv1", act_bits=4)
    sim, plan = qsurgery.quantize(graph, calib, cfg, progress=False)
    report = export_onnx(sim, tmp_path / "q4.onnx", x, verify_inputs=calib)
    assert report.max_error_steps <= 1.0 and report.top1_agreement == 1.0
    model = onnx.load(str(report.path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    conv_weights = [inits[n.input[0]] for n in model.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[0].startswith("conv")]
    assert conv_weights and all(w.dtype.name == "int8" and abs(w).max() <= 7 for w in conv_weights)
    assert "Clip" in _ops(report.path)  # conv1's 4-bit activation grid, before its 8-bit Q/DQ pair


def test_noise_floor_says_whether_differences_are_rounding_noise(simulated, tmp_path):
    from qsurgery.export import _noise_floor

    graph, calib, x = simulated
    sim, _ = qsurgery.quantize(graph, calib, progress=False)
    report = export_onnx(sim, tmp_path / "q.onnx", x, verify_inputs=calib)
    report.max_error_steps = 1.0
    _noise_floor(report, sim, [(b,) for b in calib])
    assert report.noise_floor_steps is not None and report.noise_floor_steps <= 1.0
    assert report.noise_floor_agreement >= 0.9
    assert "differs from itself" in report.differences[-1] and "at that level" in report.differences[-1]
    assert "noise floor" in report.summary()
    report.max_error_steps = 50.0  # a file far off the simulation: not noise
    report.layer_differences = [("conv2", 9.0, 0.2)]
    _noise_floor(report, sim, [(b,) for b in calib])
    assert "larger than that and start at 'conv2' with up to 9 steps" in report.differences[-1]
    # ... unless the trace shows it starts as 1-step rounding ties that the network amplifies
    report.layer_differences = [("conv1", 1.0000153, 1e-5), ("conv2", 50.0, 0.01)]  # 1 step, float32 error
    _noise_floor(report, sim, [(b,) for b in calib])
    assert "start as 1-step rounding ties at 'conv1'" in report.differences[-1]


def test_bad_export_requests(simulated, tmp_path):
    graph, calib, x = simulated
    with pytest.raises(ExportError, match="not writable|does not exist"):
        export_onnx(graph, tmp_path / "missing" / "f.onnx", x)
    with pytest.raises(ExportError, match="needs the SimulatedModel"):
        export_onnx(graph, tmp_path / "f.onnx", x, qdq=True)
    sim, plan = qsurgery.quantize(graph, calib, progress=False)
    plan["conv1"].scale = None
    with pytest.raises(ExportError, match="never calibrated"):
        export_onnx(sim, tmp_path / "q.onnx", x)

    class Warp(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.register_buffer("grid", torch.zeros(1, 4, 4, 2))

        def forward(self, x):
            return nn.functional.grid_sample(self.conv(x), self.grid, align_corners=False)

    warp = qsurgery.capture(Warp().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ExportError, match="opset 15.*grid_sampler.*used by 'grid_sample'"):
        export_onnx(warp, tmp_path / "w.onnx", torch.randn(1, 3, 8, 8), opset=15)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_leaves_the_simulation_untouched(simulated, tmp_path):
    graph, calib, x = simulated
    sim, _ = qsurgery.quantize(graph, calib, progress=False)
    with torch.no_grad():
        before = sim(x)
    export_onnx(sim, tmp_path / "q.onnx", x)
    export_onnx(sim, tmp_path / "f.onnx", x, qdq=False)
    with torch.no_grad():
        assert torch.equal(before, sim(x))
