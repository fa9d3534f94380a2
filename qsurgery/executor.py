"""Where the long evaluation loops run: in this process (the default, nothing to install) or on Ray workers
(``pip install 'qsurgery[ray]'``), with the same answers bit for bit.

A loop (sensitivity, pruning sensitivity) is cut into small :class:`Task` descriptions. What every task needs
(the simulated model, the evaluation batches) is shipped once: into Ray's object store, from which each
long-lived worker builds its state once (``setup``), then takes tasks one at a time (``work(state, payload)``)
and sends back small results (sums, not tensors). Results are returned in task order, whatever the worker
count, so the caller combines them exactly as it would in-process. A ``checkpoint`` file keeps finished tasks:
a run stopped by Ctrl-C, a lost cluster or a crash resumes where it stopped.

    executor = qsurgery.executor.get_executor("ray", workers=2)       # a local Ray, 2 workers x 1 thread
    report = sensitivity(graph, calib, data, executor=executor)       # same report as executor=None
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QSurgeryError

__all__ = ["Task", "Executor", "InProcess", "RayExecutor", "ScaleOutError", "get_executor", "RunStats", "fingerprint"]


class ScaleOutError(QSurgeryError):
    """Ray is missing or unreachable, an object cannot be shipped, or a worker kept dying."""


@dataclass(frozen=True)
class Task:
    """One unit of work: ``key`` names it (stable across runs, for resuming), ``payload`` is what the worker
    needs beyond the shared state (small: names and indices), ``size`` its share of the progress bar."""

    key: str
    payload: Any
    size: int = 1


@dataclass
class RunStats:
    """What the last run cost: start-up (connect, ship, build workers), per-task compute time on the workers,
    bytes shipped once (shared state) and per task (payload and result), tasks resumed from a checkpoint."""

    workers: int = 1
    startup_s: float = 0.0
    wall_s: float = 0.0
    task_s: list[float] = field(default_factory=list)
    shared_bytes: int = 0
    task_bytes: int = 0
    result_bytes: int = 0
    resumed: int = 0

    def summary(self) -> str:
        n = len(self.task_s)
        per = sum(self.task_s) / n if n else 0.0
        return (f"{self.workers} worker(s): {n} tasks ({self.resumed} resumed), start-up {self.startup_s:.1f} s, "
                f"{per:.2f} s per task, wall {self.wall_s:.1f} s; shipped {self.shared_bytes / 1e6:.1f} MB once, "
                f"{self.task_bytes / max(n, 1):.0f} B per task out and {self.result_bytes / max(n, 1):.0f} B back")


class _Checkpoint:
    """Finished tasks' results in one file, rewritten atomically after each; ignored when ``fingerprint``
    (what the results depend on) differs from the file's."""

    def __init__(self, path: str | Path | None, fingerprint: str):
        self.path = Path(path) if path is not None else None
        self.fingerprint = fingerprint
        self.results: dict[str, Any] = {}
        if self.path is not None:
            if self.path.exists() and not self.path.is_file():
                raise QSurgeryError(f"checkpoint {self.path} exists and is not a file")
            if not self.path.parent.is_dir():
                raise QSurgeryError(f"checkpoint folder {self.path.parent} does not exist")
            if self.path.is_file():
                try:
                    data = pickle.loads(self.path.read_bytes())
                except Exception as exc:  # a file cut short by a crash: start again
                    data = {"fingerprint": None, "why": str(exc)}
                if data.get("fingerprint") == fingerprint:
                    self.results = dict(data["results"])

    def add(self, key: str, result: Any) -> None:
        self.results[key] = result
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(pickle.dumps({"fingerprint": self.fingerprint, "results": self.results}))
            os.replace(tmp, self.path)


class Executor:
    """Runs ``work(state, task.payload)`` for every task, ``state = setup(**shared)`` built once per worker;
    returns the results in task order. Subclasses differ only in where the work runs."""

    workers: int = 1
    stats: RunStats

    def map(self, setup: Callable[..., Any], shared: dict[str, Any], work: Callable[[Any, Any], Any],
            tasks: Sequence[Task], *, desc: str = "", unit: str = "task", progress: bool = True,
            checkpoint: str | Path | None = None, depends_on: str = "") -> list[Any]:
        """The results of ``work(setup(**shared), task.payload)`` for ``tasks``, in their order. A later call
        with the same ``shared`` objects (the same dict values) reuses what was shipped and built. With
        ``checkpoint``, tasks already in that file (written for the same tasks and the same ``depends_on``, a
        :func:`fingerprint` of what the results depend on) are not run again."""
        from tqdm.auto import tqdm

        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            raise QSurgeryError("task keys must be unique")
        key = fingerprint(depends_on, [(t.key, t.payload) for t in tasks]) if checkpoint is not None else ""
        saved = _Checkpoint(checkpoint, key)  # results are kept per task: the tasks are part of the key
        todo = [t for t in tasks if t.key not in saved.results]
        self.stats = RunStats(workers=self.workers, resumed=len(tasks) - len(todo))
        bar = tqdm(total=sum(t.size for t in tasks), initial=sum(t.size for t in tasks if t.key in saved.results),
                   desc=desc, unit=unit, disable=not progress, leave=False)
        start = time.perf_counter()
        try:
            if todo:
                run = self._run(setup, shared, work, todo)
                try:
                    for task, result in run:
                        saved.add(task.key, result)
                        bar.update(task.size)
                finally:
                    run.close()  # stops remote work at once on an error or Ctrl-C here
        finally:
            bar.close()
            self.stats.wall_s = time.perf_counter() - start
        return [saved.results[k] for k in keys]

    def _run(self, setup: Callable[..., Any], shared: dict[str, Any], work: Callable[[Any, Any], Any],
             tasks: list[Task]):
        raise NotImplementedError


class InProcess(Executor):
    """Every task in this process, one after another (the default): ``setup`` gets the caller's objects as
    they are, nothing is copied."""

    def __repr__(self) -> str:
        return "InProcess()"

    def _run(self, setup, shared, work, tasks):
        state = setup(**shared)
        for task in tasks:
            t0 = time.perf_counter()
            result = work(state, task.payload)
            self.stats.task_s.append(time.perf_counter() - t0)
            yield task, result


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ScaleOutError("the Ray executor needs Ray, which is not installed here: pip install 'qsurgery[ray]' "
                            "(or run without --ray / executor=None, in this process)") from exc
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's long connection retries, when ``host:port`` does not answer."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ScaleOutError(f"a Ray address is 'host:port' (the head node's GCS port, 6379 by default), "
                            f"'ray://host:10001' or 'auto'; got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ScaleOutError(f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head` "
                            "there, or check the address and the firewall") from exc


def fingerprint(*parts: Any) -> str:
    """A short hash of what a result depends on, for checkpoints: tensors by dtype, shape and bytes (modules by
    their state), lists, tuples and dicts by their items, anything else by ``repr``."""
    import hashlib

    import torch

    h = hashlib.blake2b(digest_size=16)

    def add(obj: Any) -> None:
        if isinstance(obj, torch.nn.Module):
            add(obj.state_dict())
        elif isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
        elif isinstance(obj, dict):
            for k, v in obj.items():
                h.update(repr(k).encode())
                add(v)
        elif isinstance(obj, (list, tuple)):
            h.update(f"{type(obj).__name__}{len(obj)}".encode())
            for v in obj:
                add(v)
        else:
            h.update(repr(getattr(obj, "__qualname__", obj)).encode())

    for part in parts:
        add(part)
    return h.hexdigest()


class _PackedGraph:
    """A GraphModule on its way to a worker, packed with what qsurgery keeps beside its code (a pickled
    GraphModule alone re-traces without its metadata)."""

    def __init__(self, graph: Any):
        from .io import pack_graph

        self.data = pack_graph(graph)


def _compact(obj: Any) -> Any:
    """``obj`` as it is shipped (shared objects, task payloads and results alike): every tensor that views a
    larger storage (a slice of a big batch) copied to its own (a pickled view carries its whole storage: 8
    slices of one image tensor shipped it 8 times), and every GraphModule packed with its metadata
    (:func:`_restore` unpacks it on the other side), inside lists, tuples, dicts and dataclasses too."""
    import torch
    import torch.fx as fx

    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.nbytes else obj
    if isinstance(obj, fx.GraphModule):
        return _PackedGraph(obj)
    return _each(obj, _compact)


def _restore(obj: Any) -> Any:
    """What :func:`_compact` shipped, with its packed graphs unpacked."""
    if isinstance(obj, _PackedGraph):
        from .io import unpack_graph

        return unpack_graph(obj.data)
    return _each(obj, _restore)


def _each(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to each item of a list, tuple or dict, or each field of a dataclass."""
    if isinstance(obj, list):
        return [fn(o) for o in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(fn(o) for o in obj)
    if isinstance(obj, dict):
        return {k: fn(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changed = {f.name: fn(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        if any(v is not getattr(obj, k) for k, v in changed.items()):
            return dataclasses.replace(obj, **changed)
    return obj


class _Worker:
    """A long-lived Ray actor (one process, ``threads`` torch threads). The first task of a run builds the
    state from the shipped objects, the next ones reuse it; a restarted worker rebuilds it the same way, so a
    retried task needs nothing else."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.run_id: str | None = None
        self.state: Any = None

    def run(self, run_id: str, job: tuple, payload: Any) -> tuple[Any, float, float]:
        setup_s = 0.0
        if self.run_id != run_id:
            import ray

            t0 = time.perf_counter()
            setup, work, names, refs = job
            self.state = None  # free the last run's state first
            self.state, self.work = setup(**dict(zip(names, _restore(ray.get(list(refs)))))), work
            self.run_id = run_id
            setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = self.work(self.state, _restore(payload))
        return _compact(result), time.perf_counter() - t0, setup_s


class RayExecutor(Executor):
    """Tasks on Ray: ``address`` None starts a local Ray on this machine (``workers`` x ``threads`` CPUs),
    ``"auto"`` attaches to the cluster this machine belongs to, ``"host:port"`` or ``"ray://host:10001"`` to
    a given one. ``workers`` long-lived workers (default: as many as the cluster's CPUs allow), each with
    ``threads`` torch threads. A worker that dies is restarted and its task retried (``retries`` times)."""

    def __init__(self, address: str | None = None, *, workers: int | None = None, threads: int = 1,
                 retries: int = 3):
        if workers is not None and workers < 1:
            raise ScaleOutError(f"workers must be >= 1, got {workers}")
        if threads < 1:
            raise ScaleOutError(f"threads must be >= 1, got {threads}")
        self.address, self.threads, self.retries = address, threads, retries
        self._workers = workers
        self._n = 0  # workers, known once connected
        self._pool: list[Any] = []
        self._shipped: tuple | None = None  # what the last run shipped: reused by a run with the same objects
        self.ray = _ray()  # a clear error now, before any work, when Ray is not installed
        if address is not None:  # an unreachable cluster is said now, before any work
            _check_reachable(address)
            self._connect()

    @property
    def workers(self) -> int:  # type: ignore[override]
        """How many workers run tasks at once (connects to Ray the first time it is asked)."""
        if self._n == 0:
            self._connect()
        return self._n

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, workers={self._workers}, threads={self.threads})"

    def _connect(self) -> Any:
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if self.address is None:
                kwargs["num_cpus"] = (self._workers or os.cpu_count() or 1) * self.threads
            else:
                kwargs["address"] = self.address
            try:
                ray.init(**kwargs)
            except Exception as exc:
                raise ScaleOutError(f"could not start or reach Ray ({self.address or 'local'}): {exc}") from exc
        if self._workers is None:
            self._n = max(1, int(ray.cluster_resources().get("CPU", 1)) // self.threads)
        else:
            self._n = self._workers
        if hasattr(self, "stats"):
            self.stats.workers = self._n
        return ray

    def _ship(self, ray: Any, shared: dict[str, Any]) -> list[Any]:
        import ray.cloudpickle as cloudpickle

        refs = []
        for name, obj in shared.items():
            obj = _compact(obj)
            try:
                blob = cloudpickle.dumps(obj)
            except Exception as exc:
                where = name
                if isinstance(obj, dict):  # say which entry
                    for k, v in obj.items():
                        try:
                            cloudpickle.dumps(v)
                        except Exception:
                            where, obj = f"{name}[{k!r}]", v
                            break
                raise ScaleOutError(f"cannot ship {where} ({type(obj).__name__}) to Ray workers: it does not "
                                    f"pickle ({type(exc).__name__}: {exc}); run in-process (executor=None) or "
                                    "make it picklable (no open files, locks or lambdas over them)") from exc
            self.stats.shared_bytes += len(blob)
            refs.append(ray.put(obj))
        return refs

    def close(self) -> None:
        """Stop this executor's workers (they are kept between runs, so the next run skips their start)."""
        for w in self._pool:
            self.ray.kill(w, no_restart=True)
        self._pool, self._shipped = [], None

    def _run(self, setup, shared, work, tasks):
        import uuid

        import ray.cloudpickle as cloudpickle

        t0 = time.perf_counter()
        ray = self._connect()
        key = (setup, work, tuple((k, id(v)) for k, v in shared.items()))
        if self._shipped is not None and self._shipped[0] == key:  # the same objects again: already there
            _key, job, run_id, _held = self._shipped
        else:
            refs = self._ship(ray, shared)
            job = (setup, work, list(shared), refs)
            run_id = uuid.uuid4().hex
            self._shipped = (key, job, run_id, dict(shared))  # holding the objects keeps their ids unique
        actor = ray.remote(_Worker).options(num_cpus=self.threads, max_restarts=self.retries,
                                            max_task_retries=self.retries)
        while len(self._pool) < self.workers:
            self._pool.append(actor.remote(self.threads))
        queue, idle, pending = deque(tasks), list(self._pool[:len(tasks)]), {}
        job_bytes = len(cloudpickle.dumps(job))
        first, ok = True, False
        try:
            while queue or pending:
                while idle and queue:
                    task, w = queue.popleft(), idle.pop()
                    payload = _compact(task.payload)
                    self.stats.task_bytes += job_bytes + len(cloudpickle.dumps(payload))
                    pending[w.run.remote(run_id, job, payload)] = (w, task)
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    w, task = pending.pop(ref)
                    try:
                        result, seconds, _setup_s = ray.get(ref)
                    except ray.exceptions.OutOfMemoryError as exc:
                        raise ScaleOutError(f"a Ray worker ran out of memory on task {task.key!r}: give each "
                                            "worker more memory, run fewer per machine (workers=) or evaluate "
                                            "fewer images per batch") from exc
                    except ray.exceptions.RayTaskError as exc:
                        text = str(exc)
                        if "No module named" not in text:
                            raise  # the work's own error (the same exception type as in-process)
                        module = text.split("No module named", 1)[1].split("\n", 1)[0].strip()
                        raise ScaleOutError(f"the Ray workers cannot import {module}, which the shipped objects "
                                            "(a metric, a model class) come from: install it on every node, or "
                                            "ship it by value with ray.cloudpickle.register_pickle_by_value("
                                            "<module>) before the run") from exc
                    except ray.exceptions.RayActorError as exc:
                        raise ScaleOutError(f"a Ray worker died {self.retries + 1} times on task {task.key!r} "
                                            f"({exc.__class__.__name__}); finished tasks are kept when a "
                                            "checkpoint is given: run again to resume") from exc
                    if first:  # the first result also paid for starting and building the workers
                        self.stats.startup_s = time.perf_counter() - t0 - seconds
                        first = False
                    self.stats.task_s.append(seconds)
                    self.stats.result_bytes += len(cloudpickle.dumps(result))
                    idle.append(w)
                    yield task, _restore(result)
            ok = True
        finally:
            if not ok:  # failed or Ctrl-C: stop the remote work now (the workers go with it)
                for ref in pending:
                    ray.cancel(ref, force=False)
                self.close()
def get_executor(spec: Executor | str | None = None, *, workers: int | None = None, threads: int = 1) -> Executor:
    """An executor from what a user writes: None or ``"inprocess"`` (this process), ``"ray"`` (a local Ray, or
    the cluster this machine is attached to when ``RAY_ADDRESS`` is set), a cluster address
    (``"host:port"``, ``"ray://host:10001"``, ``"auto"``), or an :class:`Executor` as is."""
    if spec is None or spec == "inprocess":
        return InProcess()
    if isinstance(spec, Executor):
        return spec
    if not isinstance(spec, str):
        raise ScaleOutError(f"executor must be None, 'ray', a Ray address or an Executor, got {type(spec).__name__}")
    if spec == "ray":
        return RayExecutor(os.environ.get("RAY_ADDRESS") or None, workers=workers, threads=threads)
    return RayExecutor(spec, workers=workers, threads=threads)
