"""Device targets, the plan cost model and assign_precision."""

import pytest
import torch
from torch import nn

import qsurgery
from qsurgery import ConfigError
from qsurgery.analysis import sensitivity
from qsurgery.cost import plan_cost
from qsurgery.graph import module_macs
from qsurgery.passes import assign_precision
from qsurgery.passes.assign_precision import with_formats
from qsurgery.targets import TARGETS, Target, get_target, layer_format


class Outlier(nn.Module):
    """conv2 has one output channel 300x larger than the rest (which conv3 ignores): one per-tensor int8
    scale for conv2's output leaves the other channels a step or two. Widening conv2's activation (16 bits)
    or keeping it float repairs the model; nothing else matters much."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(8 * 16, 6)
        with torch.no_grad():
            self.conv2.weight[0] *= 300
            self.conv2.bias[0] *= 300
            self.conv3.weight[:, 0] = 0
            self.fc.weight *= 10

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def outlier():
    torch.manual_seed(0)
    graph = qsurgery.capture(Outlier().eval(), torch.randn(1, 3, 10, 10))
    calib = [torch.randn(16, 3, 10, 10) for _ in range(2)]
    data = [torch.randn(32, 3, 10, 10) for _ in range(4)]
    sim, plan = qsurgery.quantize(graph, calib, progress=False)
    sens = sensitivity(graph, None, data, mode="float_one", metric="kl", simulated=sim, progress=False)
    return graph, plan, sens, data


def test_targets_are_data_and_check_plans(outlier):
    graph, plan, _, _ = outlier
    assert set(TARGETS) == {"generic", "full-int8", "int8-int16", "pow2-int8", "per-tensor-int8", "per-tensor-int16",
                            "pow2-int16", "w4a8"}
    with pytest.raises(ConfigError, match="known: .*full-int8"):
        get_target("tpu9000")
    mine = get_target({"name": "npu", "description": "int8 + fp16", "formats": ["int8", "fp16"],
                       "mac_cost": {"int8": 1, "fp16": 3}})
    assert mine.mixed and mine.config().allow_mixed
    assert not get_target("full-int8").config().allow_mixed
    assert get_target("pow2-int8").config().weight.pow2
    floated = with_formats(plan, {"conv2": "float"}, get_target("generic"))
    assert layer_format(floated["conv2"]) == "float" and layer_format(floated["conv1"]) == "int8"
    get_target("generic").check(floated)
    with pytest.raises(ConfigError, match="'conv2' in float"):
        get_target("int8-int16").check(floated)
    with pytest.raises(ConfigError, match="does not run float"):
        with_formats(plan, {"conv2": "float"}, get_target("full-int8"))
    with pytest.raises(ConfigError, match="power-of-two"):
        get_target("pow2-int8").check(plan)
    with pytest.raises(ConfigError, match="formats must include 'int8'"):
        Target("bad", "no int8", formats=("float",), mac_cost={"float": 1})


def test_plan_cost_counts_macs_bytes_and_conversions(outlier):
    graph, plan, _, _ = outlier
    target = get_target("generic")
    base = plan_cost(graph, plan, target)
    macs = module_macs(graph)
    assert base.macs == sum(macs.values()) and base.non_int8_mac_share == 0 and base.conversions == 0
    floated = plan_cost(graph, with_formats(plan, {"conv2": "float"}, target), target)
    assert floated.macs_by_format["float"] == macs["conv2"]
    assert floated.non_int8_layers == ["conv2"]
    assert floated.weight_bytes - base.weight_bytes == 3 * sum(p.numel() for p in graph.conv2.parameters())
    assert floated.conversions == 2  # int8 -> float into conv2's consumer, float output read by int8 conv3
    assert floated.total > base.total
    wide = plan_cost(graph, with_formats(plan, {"conv2": "a16w8"}, get_target("int8-int16")), "int8-int16")
    assert wide.macs_by_format["a16w8"] == macs["conv2"] and wide.weight_bytes == base.weight_bytes


def test_assign_precision_repairs_the_broken_layer_cheaply(outlier):
    graph, plan, sens, data = outlier
    assert sens.rows[0].layer == "conv2"
    res = assign_precision(graph, plan, sens, target="generic", data=data, metric="agreement", budget=3.0,
                           progress=False)
    assert res.reached and res.int8_accuracy < res.float_accuracy - 3.0
    assert res.accuracy >= res.float_accuracy - 3.0
    assert res.steps[1].formats == {"conv2": "float"} and res.steps[1].accepted  # the broken layer goes first
    assert res.formats["conv2"] == "float" and "conv1" not in res.formats  # the costly healthy conv stays int8
    assert layer_format(res.plan["conv2"]) == "float"
    wide = assign_precision(graph, plan, sens, target="int8-int16", data=data, metric="agreement", budget=3.0,
                            progress=False)
    assert wide.reached and wide.formats.get("conv2") in ("a16w8", "int16")
    assert all(f != "float" for f in wide.formats.values())
    assert wide.cost.total < res.cost.total * 4  # widening is charged, not free
    front = res.front
    assert [p.cost for p in front] == sorted(p.cost for p in front)
    assert [p.accuracy for p in front] == sorted(p.accuracy for p in front)


def test_assign_precision_flags_unreachable_budget_and_bad_input(outlier, tmp_path):
    graph, plan, sens, data = outlier
    fixed = assign_precision(graph, plan, sens, target="full-int8", data=data, metric="agreement", budget=0.0,
                             progress=False)
    assert fixed.formats == {} and not fixed.reached
    capped = assign_precision(graph, plan, sens, target="generic", data=data, metric="agreement", max_cost=0.0,
                              progress=False)
    assert capped.formats == {} and capped.cost.non_int8_mac_share == 0
    res = assign_precision(graph, plan, sens, target="generic", data=data, metric="agreement", progress=False)
    assert res.plot(tmp_path / "front.png").stat().st_size > 0
    assert "conv2" in res.summary()
    with pytest.raises(ConfigError, match="not both"):
        assign_precision(graph, plan, sens, target="generic", data=data, budget=1, max_cost=0.1)
    qsens = sensitivity(graph, [data[0]], data[:1], mode="quantize_one", progress=False)
    with pytest.raises(ConfigError, match="float_one"):
        assign_precision(graph, plan, qsens, target="generic", data=data)
    with pytest.raises(ConfigError, match="labeled"):
        assign_precision(graph, plan, sens, target="generic", data=data, metric="top1")
