"""Scale-out: sensitivity on Ray workers gives the in-process report bit for bit (two Ray nodes on this
machine), survives a worker that dies, resumes from a checkpoint, and fails clearly without Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import qsurgery
from qsurgery.analysis import sensitivity
from qsurgery.evaluate import distance
from qsurgery.executor import InProcess, RayExecutor, ScaleOutError, get_executor


def _net() -> tuple[torch.fx.GraphModule, torch.Tensor, list]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10)).eval()
    x = torch.randn(48, 3, 16, 16)
    y = net(x).argmax(1)
    y[::3] = 0  # labels the float model does not always match
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)]
    return qsurgery.capture(net, x[:1]), x[:16], data


class _DieOnce:
    """A distance that kills the Ray worker running it the first time (not the test process)."""

    def __init__(self, marker: Path):
        self.marker, self.driver = str(marker), os.getpid()

    def __call__(self, ref, out) -> float:
        if os.getpid() != self.driver and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return distance(ref, out)


@pytest.fixture(scope="module")
def two_nodes():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    # the workers cannot import this test file: ship what it defines (a distance) by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    executor = RayExecutor(workers=2)
    yield executor
    executor.close()
    ray.shutdown()
    cluster.shutdown()


def test_two_ray_nodes_give_the_in_process_report(two_nodes, tmp_path):
    graph, calib, data = _net()
    sim, _ = qsurgery.quantize(graph, calib, progress=False)
    for mode, metric in (("quantize_one", "kl"), ("float_one", "top1")):
        here = sensitivity(graph, None, data, metric=metric, mode=mode, simulated=sim, progress=False)
        there = sensitivity(graph, None, data, metric=metric, mode=mode, simulated=sim, progress=False,
                            executor=two_nodes)
        assert there.to_dict() == here.to_dict()  # every float, bit for bit, in the same order
    assert two_nodes.stats.workers == 2 and len(two_nodes.stats.task_s) == len(data)
    # a worker that dies mid-run is restarted and its task retried: the same report
    die = _DieOnce(tmp_path / "died")
    here = sensitivity(graph, None, data, metric="distance", mode="float_one", simulated=sim, progress=False)
    there = sensitivity(graph, None, data, metric="distance", distance=die, mode="float_one", simulated=sim,
                        progress=False, executor=two_nodes)
    assert (tmp_path / "died").exists()  # a worker did die
    assert there.to_dict() == here.to_dict()


def _prunable() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.randn(32, 3, 16, 16)
    return qsurgery.capture(net, x[:1]), x


def test_pruning_sensitivity_on_ray_is_the_in_process_one(two_nodes):
    from qsurgery.passes import pruning_sensitivity

    graph, x = _prunable()
    here = pruning_sensitivity(graph, [x[:16], x[16:]], images=32, progress=False)
    there = pruning_sensitivity(graph, [x[:16], x[16:]], images=32, progress=False, executor=two_nodes)
    assert len(here.curves) >= 2 and there.curves == here.curves and there.fingerprint == here.fingerprint


def test_pruning_sensitivity_resumes_from_its_checkpoint(tmp_path):
    from qsurgery.passes import pruning_sensitivity

    graph, x = _prunable()
    first = pruning_sensitivity(graph, [x], images=32, progress=False, checkpoint=tmp_path / "p.ckpt")
    executor = InProcess()
    again = pruning_sensitivity(graph, [x], images=32, progress=False, checkpoint=tmp_path / "p.ckpt",
                                executor=executor)
    assert executor.stats.resumed == len(first.curves) and not executor.stats.task_s and again.curves == first.curves
    other = pruning_sensitivity(graph, [x * 2], images=32, progress=False, checkpoint=tmp_path / "p.ckpt",
                                executor=executor)  # other images: measured again
    assert executor.stats.resumed == 0 and other.curves != first.curves


def _precision_case():
    from test_mixed_precision import Outlier  # one layer breaks int8; several widenings help, some do not

    torch.manual_seed(0)
    graph = qsurgery.capture(Outlier().eval(), torch.randn(1, 3, 10, 10))
    sim, plan = qsurgery.quantize(graph, [torch.randn(16, 3, 10, 10) for _ in range(2)], progress=False)
    data = [torch.randn(32, 3, 10, 10) for _ in range(4)]
    sens = sensitivity(graph, None, data, mode="float_one", metric="kl", simulated=sim, progress=False)
    return graph, plan, sens, data


def test_precision_search_measuring_several_steps_at_once_takes_the_same_steps():
    from qsurgery.passes import assign_precision

    graph, plan, sens, data = _precision_case()
    one = assign_precision(graph, plan, sens, target="int8-int16", data=data, metric="agreement", progress=False)
    wide = InProcess()
    wide.workers = 3  # windows of three candidates: stale ones measured again after a step is kept
    three = assign_precision(graph, plan, sens, target="int8-int16", data=data, metric="agreement", progress=False,
                             executor=wide)
    assert sum(p.accepted for p in one.steps) >= 3 and not all(p.accepted for p in one.steps)
    assert three.steps == one.steps and three.formats == one.formats


def test_precision_search_on_ray_is_the_in_process_one(two_nodes):
    from qsurgery.passes import assign_precision

    graph, plan, sens, data = _precision_case()
    here = assign_precision(graph, plan, sens, target="int8-int16", data=data, metric="agreement", progress=False)
    there = assign_precision(graph, plan, sens, target="int8-int16", data=data, metric="agreement", progress=False,
                             executor=two_nodes)
    assert there.steps == here.steps and there.formats == here.formats


def test_repair_trials_on_ray_are_the_in_process_ones(two_nodes):
    from test_repair import FAST, _same_trials
    from test_techniques import DepthwiseNet, images

    torch.manual_seed(0)
    m = DepthwiseNet().eval()
    calib, x = [images(32) for _ in range(2)], images(160)
    with torch.no_grad():
        y = m(x).argmax(1)
    kwargs = dict(budget=qsurgery.Budget(0.0, "top1"), target="per-tensor-int16", remedies=FAST + ["precision"],
                  max_trials=6, progress=False)
    here = qsurgery.repair(m, calib, (x, y), **kwargs)
    there = qsurgery.repair(m, calib, (x, y), executor=two_nodes, **kwargs)
    assert _same_trials(here, there)


def test_an_object_that_cannot_be_shipped_is_named(two_nodes):
    import threading

    graph, calib, data = _net()
    lock = threading.Lock()

    def locked(ref, out):
        with lock:
            return distance(ref, out)

    with pytest.raises(ScaleOutError, match=r"cannot ship spec\['distance'\]"):
        sensitivity(graph, calib, data, metric="distance", distance=locked, progress=False, executor=two_nodes)


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    graph, calib, data = _net()
    sim, _ = qsurgery.quantize(graph, calib, progress=False)
    full = sensitivity(graph, None, data, metric="distance", simulated=sim, progress=False)
    per_batch = len(full.rows) + 1  # the reference run and each layer's
    calls = {"n": 0, "limit": 3 * per_batch}

    def stopping(ref, out):
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise KeyboardInterrupt  # Ctrl-C during the fourth batch
        return distance(ref, out)

    ckpt = tmp_path / "sens.ckpt"
    with pytest.raises(KeyboardInterrupt):
        sensitivity(graph, None, data, metric="distance", distance=stopping, simulated=sim, progress=False,
                    checkpoint=ckpt)
    assert ckpt.is_file()
    calls.update(n=0, limit=None)
    executor = InProcess()
    resumed = sensitivity(graph, None, data, metric="distance", distance=stopping, simulated=sim, progress=False,
                          checkpoint=ckpt, executor=executor)
    assert executor.stats.resumed == 3 and calls["n"] == 3 * per_batch  # only the three batches left ran
    assert resumed.rows == full.rows
    # a checkpoint of another task grouping (more workers: each batch's layers in groups) is not used
    grouped = InProcess()
    grouped.workers = 12
    sensitivity(graph, None, data, metric="distance", simulated=sim, progress=False, checkpoint=ckpt,
                executor=grouped)
    assert len(grouped.stats.task_s) > len(data)  # grouped tasks did run
    again = sensitivity(graph, None, data, metric="distance", simulated=sim, progress=False, checkpoint=ckpt,
                        executor=executor)
    assert executor.stats.resumed == 0 and again.rows == full.rows
    # a checkpoint of another model is not used
    sim2, _ = qsurgery.quantize(graph, calib[:4], progress=False)
    sensitivity(graph, None, data, metric="distance", distance=stopping, simulated=sim2, progress=False,
                checkpoint=ckpt, executor=executor)
    assert executor.stats.resumed == 0


def test_ray_missing_fails_before_any_work(monkeypatch):
    sens_module = sys.modules["qsurgery.analysis.sensitivity"]
    graph, calib, data = _net()
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError

    def no_calibration(*_a, **_k):
        raise AssertionError("calibration ran before the executor was checked")

    monkeypatch.setattr(sens_module, "quantize", no_calibration)
    with pytest.raises(ScaleOutError, match=r"pip install 'qsurgery\[ray\]'"):
        sensitivity(graph, calib, data, executor="ray", progress=False)


def test_bad_executor_arguments_fail_clearly():
    pytest.importorskip("ray")
    with pytest.raises(ScaleOutError, match="no Ray cluster answers at 127.0.0.1:9"):
        get_executor("127.0.0.1:9")
    with pytest.raises(ScaleOutError, match="host:port"):
        get_executor("not-an-address")
    with pytest.raises(ScaleOutError, match="workers must be >= 1"):
        RayExecutor(workers=0)
    with pytest.raises(ScaleOutError, match="executor must be"):
        get_executor(3)
