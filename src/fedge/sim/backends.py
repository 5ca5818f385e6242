"""Simulator backends: where a round's devices train.

- ``inline``: this process, devices in cohort order; bit-for-bit deterministic
  for a seed.
- ``processes``: one worker process per core. Each device lives on one worker
  (:func:`assign_devices`) that receives its data once at start-up; every
  round ships the params once per worker and gets back one partial
  accumulator per worker, so the driver holds O(model) memory whatever the
  cohort size. Results equal ``inline``'s up to floating-point summation order.
  With ``--secagg`` each worker also hosts the SecAgg+ clients of its devices
  (:class:`~fedge.sim.secagg.SecAggDevices`): :meth:`ProcessBackend.secagg_call`
  sends a protocol step to every worker at once, so the devices' key
  agreements and secret sharing run on every core.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol

from fedge.data.dataset import Dataset, DataSpec
from fedge.encoding import EncodingConfig
from fedge.errors import BackendError, ConfigError, DataError, FedgeError, TaskError
from fedge.params import Params
from fedge.sim.attacks import Attack
from fedge.sim.backend_profile import BackendProfile, RoundTimes, WorkerClock, WorkerReport
from fedge.sim.devices import DeviceJob, DeviceRunner, PartialRound
from fedge.sim.secagg import SecAggDevices
from fedge.strategies.base import Strategy
from fedge.tasks import load_task
from fedge.tasks.base import Task, TrainConfig

__all__ = [
    "Backend",
    "InlineBackend",
    "ProcessBackend",
    "assign_devices",
    "build_backend",
    "merge_partials",
    "tune_malloc",
]

logger = logging.getLogger(__name__)

#: How long closing waits for a worker's timings.
PROFILE_TIMEOUT_S = 10.0

# A worker's error, by class name, becomes the same class on the driver, so
# a bad task name is still a configuration error (exit 2) when a worker finds it.
# UnknownNameError takes structured arguments, so it comes back as its parent.
_WORKER_ERRORS: dict[str, type[FedgeError]] = {
    "ConfigError": ConfigError,
    "UnknownNameError": ConfigError,
    "DataError": DataError,
    "TaskError": TaskError,
    "BackendError": BackendError,
}


class Backend(Protocol):
    """Where devices train: one call per round, then ``close`` to release workers."""

    def run_round(self, round_id: int, params: Params, jobs: Sequence[DeviceJob]) -> PartialRound:
        """Train ``jobs`` from ``params``; return their merged partial round."""
        ...

    def close(self) -> None:
        """Release every resource (worker processes); safe to call twice."""
        ...


def merge_partials(parts: Sequence[PartialRound]) -> PartialRound:
    """Join partial rounds in the order given (a fixed order keeps results reproducible)."""
    head = parts[0]
    for p in parts[1:]:
        head.accumulator.merge(p.accumulator)
        head.reports.extend(p.reports)
        head.rejected.extend(p.rejected)
        head.train_loss_sum += p.train_loss_sum
        head.train_loss_weight += p.train_loss_weight
        head.train_s += p.train_s
        head.bytes_up += p.bytes_up
        head.unclipped += p.unclipped
        if p.masked_sum is not None:  # uint32: wraps mod 2^32, as secure aggregation needs
            head.masked_sum = p.masked_sum if head.masked_sum is None else (
                head.masked_sum + p.masked_sum)
    return head


def assign_devices(sizes: Sequence[int], workers: int, *, batch_size: int) -> list[int]:
    """The worker that holds each device, so that every worker has about the same work.

    A round waits for its busiest worker. A device's cost is a fixed part
    (its delta, checks, encoding: model-sized work whatever its data), a
    part per local step (an SGD step touches every parameter) and a part per
    example; the backend cannot know their weights, so it balances all
    three: each worker gets the same number of devices (at most
    ``ceil(devices / workers)``), and devices, most steps first
    (``ceil(examples / batch_size)``, then examples, then id), go one by one
    to the capped worker with the fewest steps so far, then the fewest
    examples. On digits' 20 Dirichlet-skewed devices and 2 workers this
    gives 28/28 steps and 728/710 examples, where ``d % 2`` gave 28/28 and
    683/755 and a plain snake by size 29/27 and 728/710.

    Args:
        sizes: examples per device, indexed by device id.
        workers: how many workers there are.
        batch_size: the run's local batch size.

    Raises:
        ValueError: ``workers`` or ``batch_size`` is below 1.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cap = -(-len(sizes) // workers)
    steps = [-(-n // batch_size) for n in sizes]
    load = [[0, 0, 0] for _ in range(workers)]  # steps, examples, devices
    owner = [0] * len(sizes)
    for d in sorted(range(len(sizes)), key=lambda d: (-steps[d], -sizes[d], d)):
        w = min((w for w in range(workers) if load[w][2] < cap), key=lambda w: (*load[w][:2], w))
        owner[d] = w
        load[w][0] += steps[d]
        load[w][1] += sizes[d]
        load[w][2] += 1
    return owner


class InlineBackend:
    """Every device in this process, one after another."""

    def __init__(self, runner: DeviceRunner) -> None:
        self._runner = runner

    def run_round(self, round_id: int, params: Params, jobs: Sequence[DeviceJob]) -> PartialRound:
        return self._runner.run(round_id, params, jobs)

    def close(self) -> None:
        pass


# Worker side ------------------------------------------------------------------

def _worker_main(conn: Connection) -> None:
    """A worker's loop: build the runner from the init message, then serve rounds.

    Every failure goes back to the driver as (error class name, message), so
    the driver can raise the same kind of error in its own process.
    """
    try:
        task_name, spec, strategy, base, seed, datasets, attack, encoding, count_bytes = conn.recv()
        runner = DeviceRunner(
            task=load_task(task_name, spec), strategy=strategy, datasets=datasets,
            base_config=base, seed=seed, attack=attack, encoding=encoding, count_bytes=count_bytes,
        )
        secagg = SecAggDevices(seed)  # the SecAgg+ clients of this worker's devices
        clock = WorkerClock()
        conn.send(("ready", None))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                return
            if msg[0] == "secagg":
                _, method, shared, items = msg
                conn.send(("ok", secagg.call(method, shared, items)))
                continue
            if msg[0] == "profile":
                conn.send(("ok", clock.report()))
                continue
            _, round_id, jobs = msg
            started = clock.start()
            # The params come as one pickle made once for every worker.
            params = ForkingPickler.loads(conn.recv_bytes())
            part = runner.run(round_id, params, jobs)
            clock.stop(round_id, started)
            conn.send(("ok", part))
    except (EOFError, KeyboardInterrupt):
        return
    except Exception as e:
        logger.debug("simulator worker failed:\n%s", traceback.format_exc())
        kind = type(e).__name__ if isinstance(e, FedgeError) else "unexpected"
        with contextlib.suppress(OSError):
            conn.send(("error", (kind, f"{type(e).__name__}: {e}")))


# What spawned workers get in their environment (they inherit it at start):
# - one BLAS thread each, or W workers would each start a thread per core and
#   fight over the same cores;
# - a fixed glibc mmap threshold: a worker allocates and frees a model-sized
#   array per device, and with glibc's default each one was mapped and
#   unmapped again, spending most of a 1M-parameter run in the kernel
#   (14 s of 16 s system time; 0.4 s with these settings).
_WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": str(64 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
}


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Give this process the workers' glibc malloc thresholds (:data:`_WORKER_ENV`), now.

    The driver allocates and frees model-sized arrays every round too (the
    merged partial, the strategy's new params, evaluation's activations);
    with glibc's defaults each one is mapped and unmapped again and its
    pages faulted in afresh: 14x the CPU of reusing them (two 1M-value
    float32 temporaries: 5.8 ms against 0.42 ms). Workers get the setting
    from their environment at start; a running process can only ask
    ``mallopt``. The CLI calls this for ``fedge simulate``; a library user may.

    Returns:
        Whether both thresholds were set (False where malloc is not glibc's).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap_ok = mallopt(_M_MMAP_THRESHOLD, int(_WORKER_ENV["MALLOC_MMAP_THRESHOLD_"]))
    trim_ok = mallopt(_M_TRIM_THRESHOLD, int(_WORKER_ENV["MALLOC_TRIM_THRESHOLD_"]))
    return bool(mmap_ok and trim_ok)


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """Set :data:`_WORKER_ENV` while workers start, then restore ours."""
    names = tuple(_WORKER_ENV)
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(_WORKER_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ProcessBackend:
    """Devices spread over worker processes, each device pinned to one worker."""

    def __init__(
        self,
        *,
        task_name: str,
        spec: DataSpec,
        strategy: Strategy,
        datasets: Sequence[Dataset],
        base_config: TrainConfig,
        seed: int,
        workers: int,
        attack: Attack | None = None,
        encoding: EncodingConfig | None = None,
        count_bytes: str = "wire",
    ) -> None:
        self.workers = max(1, min(workers, len(datasets)))
        ctx = mp.get_context("spawn")
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._profile = BackendProfile()
        self.profile: dict[str, Any] | None = None
        try:
            with _worker_environment():
                for w in range(self.workers):
                    parent, child = ctx.Pipe()
                    proc = ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                       name=f"fedge-sim-worker-{w}")
                    proc.start()
                    child.close()
                    self._procs.append(proc)
                    self._conns.append(parent)
            self.owner = assign_devices([len(ds) for ds in datasets], self.workers,
                                        batch_size=base_config.batch_size)
            for w, conn in enumerate(self._conns):
                mine: Mapping[int, Dataset] = {
                    d: ds for d, ds in enumerate(datasets) if self.owner[d] == w
                }
                conn.send((task_name, spec, strategy, base_config, seed, mine, attack, encoding,
                           count_bytes))
            for w in range(self.workers):
                self._receive(w)
        except BaseException:
            self.close()
            raise

    def _receive(self, w: int) -> Any:
        try:
            kind, payload = self._conns[w].recv()
        except (EOFError, OSError):
            self._procs[w].join(timeout=1)
            raise BackendError(
                f"simulator worker {w} died (exit code {self._procs[w].exitcode})"
            ) from None
        if kind == "error":
            error_kind, message = payload
            error = _WORKER_ERRORS.get(error_kind, BackendError)
            raise error(f"simulator worker {w}: {message}")
        return payload

    def run_round(self, round_id: int, params: Params, jobs: Sequence[DeviceJob]) -> PartialRound:
        enter = self._profile.enter()
        per_worker: list[list[DeviceJob]] = [[] for _ in range(self.workers)]
        for job in jobs:
            per_worker[self.owner[job.device_id]].append(job)
        busy = [w for w in range(self.workers) if per_worker[w]]
        blob = bytes(ForkingPickler.dumps(params))
        for w in busy:
            try:
                self._conns[w].send(("round", round_id, per_worker[w]))
                self._conns[w].send_bytes(blob)
            except (BrokenPipeError, OSError):
                raise BackendError(f"simulator worker {w} is gone") from None
        parts: list[PartialRound] = [self._receive(w) for w in busy]
        merged = merge_partials(parts)
        self._profile.leave(RoundTimes(round_id, enter, time.time()))
        return merged

    def _finish_profile(self) -> None:
        """Ask every worker for its spans and CPU (see :mod:`fedge.sim.backend_profile`)."""
        self._profile.finish()
        reports: list[WorkerReport | None] = []
        for w, conn in enumerate(self._conns):
            report = None
            with contextlib.suppress(OSError, EOFError, BackendError):
                conn.send(("profile",))
                if conn.poll(PROFILE_TIMEOUT_S):
                    report = self._receive(w)
            reports.append(report if isinstance(report, WorkerReport) else None)
        self.profile = self._profile.summary(reports, [p.pid or 0 for p in self._procs])

    def describe(self) -> dict[str, Any]:
        """What summary.json records about the backend."""
        out: dict[str, Any] = {"workers": self.workers}
        if self.profile is not None:
            out["profile"] = self.profile
        return out

    def secagg_call(self, method: str, shared: Any, items: Mapping[str, Any]) -> dict[str, Any]:
        """One SecAgg+ step for the named devices, each on the worker that trains it.

        Every worker with a device in ``items`` gets the step at once; the
        answers (per device name) are merged. See :meth:`SecAggDevices.call`.
        """
        per_worker: list[dict[str, Any]] = [{} for _ in range(self.workers)]
        for name, item in items.items():
            per_worker[self.owner[int(name)]][name] = item
        busy = [w for w in range(self.workers) if per_worker[w]]
        for w in busy:
            try:
                self._conns[w].send(("secagg", method, shared, per_worker[w]))
            except (BrokenPipeError, OSError):
                raise BackendError(f"simulator worker {w} is gone") from None
        out: dict[str, Any] = {}
        for w in busy:
            out.update(self._receive(w))
        return out

    def close(self) -> None:
        if self._profile.rounds and self.profile is None and self._procs:
            try:
                self._finish_profile()
            except Exception as e:  # a profile is never worth failing a run for
                logger.debug("no backend profile: %s: %s", type(e).__name__, e)
        for conn in self._conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop",))
        for proc in self._procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()


def build_backend(
    name: str,
    *,
    task: Task,
    task_name: str,
    spec: DataSpec,
    strategy: Strategy,
    datasets: Sequence[Dataset],
    base_config: TrainConfig,
    seed: int,
    workers: int | None,
    attack: Attack | None = None,
    encoding: EncodingConfig | None = None,
    count_bytes: str = "wire",
) -> Backend:
    """The backend called ``name`` (``inline`` or ``processes``), ready for rounds."""
    if name == "inline":
        runner = DeviceRunner(task=task, strategy=strategy, datasets=dict(enumerate(datasets)),
                              base_config=base_config, seed=seed, attack=attack, encoding=encoding,
                              count_bytes=count_bytes)
        return InlineBackend(runner)
    return ProcessBackend(
        task_name=task_name, spec=spec, strategy=strategy, datasets=datasets,
        base_config=base_config, seed=seed, workers=workers or _usable_cores(), attack=attack,
        encoding=encoding, count_bytes=count_bytes,
    )


def _usable_cores() -> int:
    """Cores this process may run on (affinity and cpusets), not the host's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
