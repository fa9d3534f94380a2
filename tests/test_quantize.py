import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qsurgery
from qsurgery import CalibrationError, ConfigError, QuantConfig, QuantPlan, capture, quantize
from qsurgery.quant.config import TensorFormat
from qsurgery.quant.observers import RangeStats, choose_range, fake_quant, qparams, weight_qparams


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.conv2(y) + y
        return self.fc(torch.flatten(self.pool(z), 1))


def small_model():
    torch.manual_seed(0)
    m = Small()
    with torch.no_grad():  # non-trivial BN statistics
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
        m.bn1.weight.uniform_(0.5, 1.5)
        m.bn1.bias.uniform_(-0.2, 0.2)
    return m.eval()


# ---------------------------------------------------------------- an independent, hand-written reference
def _np(t):
    return t.detach().double().numpy()


def _q_act(x, lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / s), 0, 255)
    return (np.clip(np.round(x / s) + zp, 0, 255) - zp) * s, s


def _q_weight(w):
    flat = w.reshape(w.shape[0], -1)
    s = (np.abs(flat).max(1) / 127).astype(np.float32).astype(np.float64)
    shape = (-1,) + (1,) * (w.ndim - 1)
    return np.clip(np.round(w / s.reshape(shape)), -127, 127) * s.reshape(shape)


def reference_int8(m: Small, calib: list[torch.Tensor], x: torch.Tensor):
    g = _np(m.bn1.weight) / np.sqrt(_np(m.bn1.running_var) + m.bn1.eps)
    w1 = _np(m.conv1.weight) * g[:, None, None, None]
    b1 = _np(m.bn1.bias) - _np(m.bn1.running_mean) * g
    w2, b2, wf, bf = _np(m.conv2.weight), _np(m.conv2.bias), _np(m.fc.weight), _np(m.fc.bias)

    def conv(a, w, b):
        return F.conv2d(torch.from_numpy(a), torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy()

    def float_points(a):
        y = np.maximum(conv(a, w1, b1), 0)
        c = conv(y, w2, b2)
        d = c + y
        p = d.mean(axis=(2, 3))
        return [a, y, c, d, p, p @ wf.T + bf]

    pts = [float_points(_np(b)) for b in calib]
    ranges = [(min(p[i].min() for p in pts), max(p[i].max() for p in pts)) for i in range(6)]
    q1, q2, qf = _q_weight(w1), _q_weight(w2), _q_weight(wf)
    a, _ = _q_act(_np(x), *ranges[0])
    y, _ = _q_act(np.maximum(conv(a, q1, b1), 0), *ranges[1])
    c, _ = _q_act(conv(y, q2, b2), *ranges[2])
    d, _ = _q_act(c + y, *ranges[3])
    p, _ = _q_act(d.mean(axis=(2, 3)), *ranges[4])
    return _q_act(p @ qf.T + bf, *ranges[5])


def test_simulation_matches_hand_computed_int8_within_one_step():
    m = small_model()
    calib = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    x = torch.randn(4, 3, 12, 12)
    graph = capture(m, x)
    sim, plan = quantize(graph, calib, QuantConfig.int8(), progress=False)
    assert plan.names() == ["input", "conv1", "conv2", "add", "pool", "fc"]
    assert plan["conv1"].folded_bn == "bn1" and plan["conv1"].nodes == ["conv1", "relu"]
    ref, step = reference_int8(m, calib, x)
    with torch.no_grad():
        got = sim(x).double().numpy()
    assert np.abs(got - ref).max() <= step * 1.0001
    assert np.abs(got - ref).max() < np.abs(got - _np(m(x))).max()  # and quantization did change something


def _errors(sim, graph, x):
    with torch.no_grad():
        return (sim(x) - graph(x)).abs().max().item()


def test_wider_bits_and_float_overrides_reduce_error_and_show_in_plan():
    m = small_model()
    x = torch.randn(8, 3, 12, 12)
    graph = capture(m, x)
    base, _ = quantize(graph, x, QuantConfig.int8(), progress=False)
    wide, plan16 = quantize(graph, x, QuantConfig.int8().override("*", bits=16), progress=False)
    assert _errors(wide, graph, x) < _errors(base, graph, x) / 20
    assert plan16["conv2"].weight.bits == 16 and plan16["conv2"].activation.describe().startswith("uint16")
    skip, plan = quantize(graph, x, QuantConfig.int8().override("conv1", dtype="float"), progress=False)
    assert plan["conv1"].is_float and plan.non_int8() == ["input", "conv1"]
    conv1 = skip.graph_module.get_submodule("conv1")
    folded = quantize(graph, x, QuantConfig.int8().override("*", dtype="float"), progress=False)[0]
    assert torch.equal(conv1.weight, folded.graph_module.get_submodule("conv1").weight)
    half, plan_h = quantize(graph, x, QuantConfig.int8().override("conv*", dtype="fp16"), progress=False)
    assert plan_h["conv2"].weight.dtype == "fp16"


def test_input_read_only_by_float_layers_stays_float():
    m = small_model()
    x = torch.randn(2, 3, 12, 12)
    _, plan = quantize(capture(m, x), x, QuantConfig.int8().override("conv1", dtype="float"), progress=False)
    assert plan["input"].activation.dtype == "float"
    assert any("every layer reading it is float" in n for n in plan["input"].notes)


def test_all_float_simulation_equals_the_float_graph_and_toggles_work():
    m = small_model()
    x = torch.randn(4, 3, 12, 12)
    graph = capture(m, x)
    sim, plan = quantize(graph, x, progress=False)
    with torch.no_grad():
        ref, q = graph(x), sim(x)
        sim.set_quantized(None, False)
        off = sim(x)
        sim.set_quantized(["conv2"], True)
        one = sim(x)
        sim.set_quantized(None, True)
        again = sim(x)
    assert torch.allclose(off, ref, atol=1e-5)
    assert not torch.allclose(one, ref, atol=1e-5) and not torch.allclose(one, q)
    assert torch.equal(again, q)
    assert sim.quantized_names() == plan.names()


def test_moving_a_simulated_model_moves_the_weights_it_keeps_to_toggle():
    """``sim.to(...)`` (a device, a dtype) moves the float and quantized weights ``set_quantized`` swaps in and
    the analysis reads, not only the modules: a model moved to a GPU must not keep half its state on the CPU."""
    m = small_model()
    x = torch.randn(4, 3, 12, 12)
    graph = capture(m, x)
    sim, _ = quantize(graph, x, progress=False)
    moved = sim.to(torch.float64)
    assert moved is sim
    assert all(t.dtype == torch.float64 for name in sim.plan.names() if sim.weights(name) for t in sim.weights(name))
    with torch.no_grad():
        sim.set_quantized(None, False)
        off = sim(x.double())
    assert off.dtype == torch.float64 and torch.allclose(off, graph.double()(x.double()), atol=1e-9)


def test_user_graph_and_model_unchanged_by_quantize():
    m = small_model()
    x = torch.randn(2, 3, 12, 12)
    graph = capture(m, x)
    code, state = graph.code, {k: v.clone() for k, v in graph.state_dict().items()}
    quantize(graph, x, progress=False)
    assert graph.code == code
    assert all(torch.equal(state[k], v) for k, v in graph.state_dict().items())


def test_plan_json_round_trip_and_reuse_without_calibration(tmp_path):
    m = small_model()
    x = torch.randn(4, 3, 12, 12)
    graph = capture(m, x)
    sim, plan = quantize(graph, x, QuantConfig.int8(observer="mse"), progress=False)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    loaded = QuantPlan.from_json(path)
    assert loaded.names() == plan.names() and loaded["conv2"].clip == pytest.approx(plan["conv2"].clip)
    again, _ = quantize(graph, None, plan=loaded, progress=False)
    with torch.no_grad():
        assert torch.equal(sim(x), again(x))
    with pytest.raises(CalibrationError, match="give calib_data"):
        quantize(graph, None, progress=False)


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "entropy"])
def test_every_observer_runs_on_a_dataloader_and_a_one_shot_generator(observer):
    m = small_model()
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 12, 12), torch.zeros(12, dtype=torch.long))
    graph = capture(m, data[0][0][None])
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    cfg = QuantConfig.int8(observer=observer)
    sim_a, plan_a = quantize(graph, loader, cfg, progress=False)
    sim_b, plan_b = quantize(graph, (b for b in loader), cfg, progress=False)  # iterated twice: cached
    assert [layer.clip for layer in plan_a] == [layer.clip for layer in plan_b]
    for layer in plan_a:
        if layer.clip:
            assert layer.observed[0] - 1e-6 <= layer.clip[0] <= layer.clip[1] <= layer.observed[1] + 1e-6


def test_range_observers_behave():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[:5] = 40.0  # a few outliers
    stats = RangeStats()
    stats.update_minmax(x)
    stats.start_histogram(2048)
    stats.update_histogram(x)
    act = TensorFormat("int", 8)
    assert choose_range(stats, act) == (stats.lo, 40.0)
    lo, hi = choose_range(stats, TensorFormat("int", 8, observer="percentile"))
    assert 2.0 < hi < 20.0  # clips the outliers, keeps the bulk

    def sq_error(fmt_range):
        s, z = qparams(*fmt_range, act)
        return (fake_quant(x, s, z, act) - x).pow(2).sum().item()

    mse = choose_range(stats, TensorFormat("int", 8, observer="mse"))
    assert sq_error(mse) <= sq_error((stats.lo, stats.hi)) * 1.01
    y = torch.randn(100_000) ** 3  # heavy tails: at 4 bits clipping them beats keeping them
    s3 = RangeStats()
    s3.update_minmax(y)
    s3.start_histogram(2048)
    s3.update_histogram(y)
    assert choose_range(s3, TensorFormat("int", 4, observer="mse"))[1] < 0.5 * s3.hi
    assert choose_range(s3, TensorFormat("int", 8, observer="entropy"))[1] < 0.7 * s3.hi
    relu = torch.relu(torch.randn(100_000))
    s2 = RangeStats()
    s2.update_minmax(relu)
    s2.start_histogram(2048)
    s2.update_histogram(relu)
    lo, hi = choose_range(s2, TensorFormat("int", 8, observer="entropy"))
    assert lo == 0.0 and hi > 2.0  # the zero spike of ReLU outputs must not collapse the range


def test_a_searched_range_is_remembered_by_the_histograms_content_not_its_object():
    """The engine recalibrates the same float activations on every trial: the MSE/entropy search over an equal
    histogram answers from memory, and a histogram that changed is searched again."""
    torch.manual_seed(1)
    y = torch.randn(50_000) ** 3

    def stats_of(t):
        s = RangeStats()
        s.update_minmax(t)
        s.start_histogram(1024)
        s.update_histogram(t)
        return s

    fmt = TensorFormat("int", 4, observer="mse")
    first, again = choose_range(stats_of(y), fmt), choose_range(stats_of(y.clone()), fmt)
    assert first == again
    assert choose_range(stats_of(y), TensorFormat("int", 8, observer="mse")) != first  # the format is in the key
    changed = stats_of(y)
    changed.hist[changed.hist.numel() // 2 + 40:] *= 50  # the same bounds, other counts: a new search
    assert choose_range(changed, fmt) != first


def test_weight_mse_is_no_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    w[0, 0, 0, 0] = 12.0
    errs = {}
    for obs in ("minmax", "mse"):
        fmt = TensorFormat("int", 4, symmetric=True, per_channel=True, observer=obs)
        s, z = weight_qparams(w, fmt)
        errs[obs] = (fake_quant(w, s, z, fmt, axis=0) - w).pow(2).sum().item()
    assert errs["mse"] < errs["minmax"]


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-100, 0), width=st.floats(1e-3, 200), bits=st.integers(2, 16), sym=st.booleans(),
       pow2=st.booleans())
def test_qparams_cover_the_range_and_represent_zero(lo, width, bits, sym, pow2):
    hi = lo + width
    fmt = TensorFormat("int", bits, symmetric=sym, pow2=pow2)
    scale, zp = qparams(lo, hi, fmt)
    qmin, qmax = fmt.qrange
    assert qmin <= int(zp) <= qmax
    zero = fake_quant(torch.zeros(1), scale, zp, fmt)
    assert zero.item() == 0.0
    ends = fake_quant(torch.tensor([min(lo, 0.0), max(hi, 0.0)]), scale, zp, fmt)
    assert torch.allclose(ends, torch.tensor([min(lo, 0.0), max(hi, 0.0)]), atol=float(scale) * 0.5 + 1e-6,
                          rtol=1e-5)
    if pow2:
        assert float(scale) == 2.0 ** round(np.log2(float(scale)))


def test_fast_uint8_path_equals_fake_quantize():
    x = torch.randn(10_000) * 4
    fmt = TensorFormat("int", 8)
    scale, zp = qparams(-3.0, 7.0, fmt)
    fast = fake_quant(x, scale, zp, fmt)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
    assert torch.equal(fast, ref)


def test_pow2_preset_gives_power_of_two_scales():
    m = small_model()
    x = torch.randn(4, 3, 12, 12)
    _, plan = quantize(capture(m, x), x, QuantConfig.pow2_int8(), progress=False)
    for layer in plan:
        assert np.log2(layer.scale) == round(np.log2(layer.scale))
        if layer.weight_scale is not None:
            assert torch.all(torch.log2(layer.weight_scale) == torch.round(torch.log2(layer.weight_scale)))


# ---------------------------------------------------------------- bad input
def test_bad_calibration_data_is_refused():
    m = small_model()
    x = torch.randn(2, 3, 12, 12)
    graph = capture(m, x)
    with pytest.raises(CalibrationError, match="empty"):
        quantize(graph, [], progress=False)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="batch 1 contains NaN"):
        quantize(graph, [x, nan], progress=False)
    with pytest.raises(CalibrationError, match=r"captured for \(N, 3, 12, 12\)"):
        quantize(graph, [torch.randn(2, 3, 16, 16)], progress=False)
    with pytest.raises(CalibrationError, match="not a float tensor"):
        quantize(graph, [["a", "b"]], progress=False)
    with pytest.raises(qsurgery.QSurgeryError, match="capture"):
        quantize(m, [x], progress=False)


def test_non_finite_float_model_is_reported():
    class Blow(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) / 0.0

    x = torch.randn(2, 3, 4, 4)
    graph = capture(Blow().eval(), x, check=False)
    with pytest.raises(CalibrationError, match="NaN/inf"):
        quantize(graph, [x], progress=False)


def test_bad_overrides_are_refused_with_nearby_names():
    m = small_model()
    x = torch.randn(2, 3, 12, 12)
    graph = capture(m, x)
    with pytest.raises(ConfigError, match=r"'conv3'.*close.*conv1"):
        quantize(graph, x, QuantConfig.int8().override("conv3", bits=16), progress=False)
    for bad in (1, 17):
        with pytest.raises(ConfigError, match="bits must be an integer in 2..16"):
            QuantConfig.int8().override("conv1", bits=bad)
    with pytest.raises(ConfigError, match="unknown observer"):
        QuantConfig.int8(observer="magic")
    with pytest.raises(ConfigError, match="full-int8"):
        QuantConfig.full_int8().override("conv1", dtype="float")
    with pytest.raises(ConfigError, match="at least one change"):
        QuantConfig.int8().override("conv1")
    _, plan = quantize(graph, x, progress=False)
    with pytest.raises(ConfigError, match="close names"):
        plan["conv_1"]


def test_an_input_named_explicitly_is_quantized_even_if_its_readers_are_float():
    m = small_model()
    x = torch.randn(2, 3, 12, 12)
    cfg = QuantConfig.int8().override("*", dtype="float").override("input", dtype="int")
    _, plan = quantize(capture(m, x), x, cfg, progress=False)
    assert plan["input"].activation.is_int and plan["conv1"].is_float
