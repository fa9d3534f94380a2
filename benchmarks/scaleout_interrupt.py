"""Ctrl-C during a sensitivity run on a local Ray (2 workers): the remote work stops (no worker process is left),
the finished tasks are in the checkpoint, the run resumes from it, and the resumed report equals an in-process
one. A small made-up net, so it needs no data (about 2 minutes on a 2-core CPU).

    python benchmarks/scaleout_interrupt.py
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import tempfile
import threading
import time

import ray
import torch
import torch.nn as nn

import qsurgery
from qsurgery.analysis import sensitivity
from qsurgery.executor import RayExecutor


def main() -> None:
    torch.manual_seed(0)
    body = [m for _ in range(6) for m in (nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())]
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *body, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10)).eval()
    x = torch.randn(768, 3, 128, 128)
    graph = qsurgery.capture(net, x[:1])
    sim, _ = qsurgery.quantize(graph, x[:32], progress=False)
    data = [x[i:i + 16] for i in range(0, len(x), 16)]
    executor = RayExecutor(workers=2)
    _ = executor.workers  # start Ray before the clock
    ckpt = os.path.join(tempfile.mkdtemp(), "sens.ckpt")
    threading.Timer(15.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t = time.time()
    try:
        sensitivity(graph, None, data, simulated=sim, executor=executor, checkpoint=ckpt, progress=False)
        print("finished before the interrupt: give it more images")
    except KeyboardInterrupt:
        print(f"Ctrl-C after {time.time() - t:.1f} s")
    time.sleep(3)
    procs = subprocess.run(["pgrep", "-fc", "ray::_Worker"], capture_output=True, text=True).stdout.strip()
    print(f"worker processes left: {procs}")
    with open(ckpt, "rb") as f:
        print(f"tasks kept in the checkpoint: {len(pickle.load(f)['results'])} of {len(data)}")
    t = time.time()
    resumed = sensitivity(graph, None, data, simulated=sim, executor=executor, checkpoint=ckpt, progress=False)
    print(f"resumed: {executor.stats.resumed} tasks from the checkpoint, the rest in {time.time() - t:.1f} s")
    here = sensitivity(graph, None, data, simulated=sim, progress=False)
    print(f"resumed report == in-process report: {resumed.to_dict() == here.to_dict()}")
    executor.close()
    ray.shutdown()


if __name__ == "__main__":
    main()
