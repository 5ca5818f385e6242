"""The ``ray`` simulator backend: devices on long-lived Ray actors, partial sums reduced on the cluster.

The same work as every other backend (:class:`~fedge.sim.devices.DeviceRunner`),
placed on a Ray cluster (Moritz et al., "Ray: A Distributed Framework for
Emerging AI Applications", OSDI 2018), which may be a local instance, a
multi-node cluster, or a KubeRay cluster on Kubernetes:

- **Actors own devices.** ``W`` long-lived actors (cluster CPUs divided by
  ``--ray-cpus-per-device``, or ``--workers``) each hold the devices that
  :func:`~fedge.sim.backends.assign_devices` gives them (balanced in
  devices, local steps and examples, as with ``processes``). An actor
  loads or generates its devices' data itself,
  once, from the run's data settings (every source is deterministic for a
  seed), so no data leaves the driver; data handed to the Python API as
  values is put in the object store once, one shard per actor.
- **Params once per round.** The round's params go into the object store
  with one ``ray.put``; every actor reads the same object.
- **Reduced on the cluster.** Each actor returns one partial accumulator
  (:class:`~fedge.sim.devices.PartialRound`); zero-CPU merge tasks join them
  in a tree of fan-in :data:`FAN_IN`, always through
  :func:`~fedge.sim.backends.merge_partials`, and the driver joins the last
  :data:`FAN_IN` or fewer itself (the root costs no task and no extra trip
  through the object store): O(model) memory at the driver whatever the
  cohort size. A strategy
  whose accumulator keeps every update (``needs_every_update``) gets its
  partials collected at the driver instead, with a warning about memory.
- **Failures.** A worker process lost mid-round (killed, out of memory, its
  node gone) is restarted by Ray with its data reloaded. With
  ``on_failure="retry"`` Ray re-runs its batch; training is keyed by (seed,
  round, device), so the retried batch is the same batch and the round is the
  same round. With ``"dropout"`` the batch's devices count as dropped out of
  that round, as a coordinator would count devices that never reported.
  Either way a worker that keeps dying stops the run with a
  :class:`~fedge.errors.BackendError` rather than a hung or wrong round.

Each round is profiled (:mod:`fedge.sim.backend_profile`): actors time
their ``run`` calls, the driver the rest, and a local instance's own
processes are charged their CPU; ``summary.json`` has it under
``backend.profile``.

Bit-identity with ``inline`` is lost in one place only: the order in which
partial sums are added (per actor, then the merge tree), so the model agrees
to floating-point rounding; cohorts, stragglers and every device's training
are identical.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from fedge.data.dataset import Dataset, DataSpec
from fedge.encoding import EncodingConfig
from fedge.errors import BackendError, ConfigError, DataError, FedgeError, TaskError
from fedge.params import Params
from fedge.sim.attacks import Attack
from fedge.sim.backend_profile import BackendProfile, RoundTimes, WorkerClock, WorkerReport, descendants_cpu_s
from fedge.sim.backends import _WORKER_ENV, _usable_cores, assign_devices, merge_partials
from fedge.sim.devices import DeviceJob, DeviceRunner, PartialRound
from fedge.strategies.base import Strategy
from fedge.tasks import load_task
from fedge.tasks.base import TrainConfig

__all__ = ["FAN_IN", "INSTALL_HINT", "DataRecipe", "RayBackend", "import_ray"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "--backend ray needs Ray, which is not installed: pip install 'fedge[ray]'"
#: Partials joined per merge task: a tree of depth log4(W) over W actors.
FAN_IN = 4
#: How often one actor may be lost before the run stops.
MAX_RESTARTS = 3
#: How long the driver tries to reach a cluster's head before giving up.
CONNECT_TIMEOUT_S = 5.0
#: How long actors may take to start and load their data.
READY_TIMEOUT_S = 600.0
#: How long closing waits for the actors' timings.
PROFILE_TIMEOUT_S = 10.0

# A worker's error, by class name, becomes the same class on the driver, so a
# bad task name is still a configuration error (exit 2) when a worker finds it.
_ERRORS: dict[str, type[FedgeError]] = {
    "ConfigError": ConfigError,
    "UnknownNameError": ConfigError,
    "DataError": DataError,
    "TaskError": TaskError,
    "BackendError": BackendError,
}


def import_ray() -> ModuleType:
    """Import Ray, or fail with one line that says how to install it.

    Raises:
        ConfigError: Ray is not installed (or its import fails).
    """
    try:
        import ray
    except ImportError as e:
        detail = "" if getattr(e, "name", None) == "ray" else f" ({type(e).__name__}: {e})"
        raise ConfigError(INSTALL_HINT + detail) from None
    return ray


@dataclass(frozen=True)
class DataRecipe:
    """How a worker rebuilds the run's data itself: the ``--data`` settings and seed."""

    data: str
    partition: str | None
    devices: int | None
    seed: int

    def shard(self, devices: Collection[int]) -> dict[int, Dataset]:
        """The run's data for ``devices`` (ids) alone."""
        from fedge.data import load_federated
        from fedge.data.sources import synthetic_shard

        wanted = frozenset(devices)

        def mine(d: int) -> bool:
            return d in wanted

        if self.data.startswith("synthetic:"):
            # Generated device by device, keeping only this worker's: the
            # worker never holds the whole federation's data.
            return synthetic_shard(self.data, seed=self.seed, keep=mine)
        fed = load_federated(self.data, partition=self.partition, num_devices=self.devices,
                             seed=self.seed)
        return {d: ds for d, ds in enumerate(fed.devices) if mine(d)}


class _DeviceActor:
    """One Ray worker: the devices it owns, their data, and a runner for rounds."""

    def __init__(
        self,
        task_name: str,
        spec: DataSpec,
        strategy: Strategy,
        base_config: TrainConfig,
        seed: int,
        source: DataRecipe | Mapping[int, Dataset],
        devices: Sequence[int],
        attack: Attack | None = None,
        encoding: EncodingConfig | None = None,
        count_bytes: str = "wire",
    ) -> None:
        # An exception out of __init__ reaches the driver as a bare message
        # (Ray keeps no cause for a dead actor); kept and raised by ready(),
        # it arrives as itself, so a bad task name stays a ConfigError.
        self._error: Exception | None = None
        self._devices = 0
        self._clock = WorkerClock()
        try:
            datasets = source.shard(devices) if isinstance(source, DataRecipe) else dict(source)
            self._runner = DeviceRunner(
                task=load_task(task_name, spec), strategy=strategy, datasets=datasets,
                base_config=base_config, seed=seed, attack=attack, encoding=encoding,
                count_bytes=count_bytes,
            )
            self._devices = len(datasets)
        except Exception as e:
            self._error = e

    def ready(self) -> tuple[int, str, int]:
        """(process id, node id, devices held): for placement checks and tests."""
        import ray

        if self._error is not None:
            raise self._error
        return os.getpid(), ray.get_runtime_context().get_node_id(), self._devices

    def run(self, round_id: int, params: Params, jobs: Sequence[DeviceJob]) -> PartialRound:
        if self._error is not None:
            raise self._error
        started = self._clock.start()
        # The object store hands out read-only views; a private copy per actor
        # and round gives the task the same writable params as other backends.
        own = {k: np.array(v) for k, v in params.items()}
        out = self._runner.run(round_id, own, jobs)
        self._clock.stop(round_id, started)
        return out

    def profile(self) -> WorkerReport:
        """This actor's round spans and CPU, for the backend's profile."""
        return self._clock.report()


@dataclass
class _Merged:
    """A merge task's result: the joined partial (None if every input was lost) and lost actors.

    ``spans`` are the (process id, start, end, thread CPU s) of every merge
    in its subtree, for the backend's profile.
    """

    part: PartialRound | None
    lost: list[int] = field(default_factory=list)
    spans: list[tuple[int, float, float, float]] = field(default_factory=list)


def _combine(items: Sequence[tuple[int, Any]], *, tolerate: bool, get: Callable[[Any], Any]) -> _Merged:
    """Join leaf partials and earlier merges, in the order given.

    ``items`` are (actor index, ref): a leaf ref resolves to a PartialRound,
    an inner one to a :class:`_Merged`. With ``tolerate``, an actor that died
    is recorded as lost instead of failing the merge.
    """
    from ray.exceptions import RayActorError

    cpu = time.thread_time()  # waiting for the inputs costs none
    parts: list[PartialRound] = []
    lost: list[int] = []
    spans: list[tuple[int, float, float, float]] = []
    for index, ref in items:
        try:
            got = get(ref)
        except RayActorError:
            if not tolerate:
                raise
            lost.append(index)
            continue
        if isinstance(got, _Merged):
            lost.extend(got.lost)
            spans.extend(got.spans)
            if got.part is not None:
                parts.append(got.part)
        else:
            parts.append(got)
    start, merged = time.time(), None
    if parts:
        # Objects from the store are read-only views; the partial that the others
        # are added into gets a private copy first (one model's worth of memory).
        parts[0] = copy.deepcopy(parts[0])
        merged = merge_partials(parts)
    spans.append((os.getpid(), start, time.time(), time.thread_time() - cpu))
    return _Merged(merged, lost, spans)


def _merge_task(wrapped: list[tuple[int, list[Any]]], tolerate: bool) -> _Merged:
    """Body of the remote merge task; refs arrive wrapped in lists so Ray does not resolve them."""
    import ray

    return _combine([(i, refs[0]) for i, refs in wrapped], tolerate=tolerate, get=ray.get)


class RayBackend:
    """Devices on Ray actors; see the module docstring for the design."""

    def __init__(
        self,
        *,
        task_name: str,
        spec: DataSpec,
        strategy: Strategy,
        datasets: Sequence[Dataset],
        recipe: DataRecipe | None,
        base_config: TrainConfig,
        seed: int,
        address: str | None,
        cpus_per_device: float,
        workers: int | None,
        on_failure: str,
        attack: Attack | None = None,
        encoding: EncodingConfig | None = None,
        count_bytes: str = "wire",
    ) -> None:
        ray = import_ray()
        self._ray = ray
        self._attack = attack
        self._encoding = encoding
        self._count_bytes = count_bytes
        if on_failure not in ("retry", "dropout"):
            raise ConfigError(f"on_failure must be 'retry' or 'dropout', got {on_failure!r}")
        self._tolerate = on_failure == "dropout"
        self._strategy = strategy
        self._collect = bool(getattr(strategy, "needs_every_update", False))
        if self._collect:
            logger.warning(
                "strategy %s needs every update: the ray backend collects every worker's "
                "updates at the driver, so its memory grows with the cohort size",
                type(strategy).__name__,
            )
        self._owns_ray = False
        # A local instance's processes are this one's descendants, charged in the profile.
        local = address is None and not ray.is_initialized()
        self._profile = BackendProfile(
            (lambda: descendants_cpu_s(os.getpid())) if local else None)
        self.profile: dict[str, Any] | None = None
        self._actors: list[Any] = []
        self._failures: list[int] = []
        self._shards: list[Any] = []
        t0 = time.perf_counter()
        try:
            self._connect(address, cpus_per_device, workers)
            cpus = float(ray.cluster_resources().get("CPU", 0.0))
            count = workers if workers is not None else max(1, int(cpus // cpus_per_device))
            count = max(1, min(count, len(datasets)))
            if count * cpus_per_device > cpus + 1e-9:
                raise ConfigError(
                    f"{count} Ray workers at --ray-cpus-per-device {cpus_per_device:g} need "
                    f"{count * cpus_per_device:g} CPUs; the cluster has {cpus:g}"
                )
            self.workers = count
            self._start_actors(task_name, spec, strategy, datasets, recipe, base_config, seed,
                               cpus_per_device, on_failure)
            self._merge = ray.remote(num_cpus=0)(_merge_task)
            if count > FAN_IN and not self._collect:
                # Start the merge tasks' worker process now, so its start-up is
                # counted once here rather than in the first round.
                self._get_one(lambda: ray.get(self._merge.remote([], self._tolerate)))
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t0

    # Start-up ------------------------------------------------------------------

    def _connect(self, address: str | None, cpus_per_device: float, workers: int | None) -> None:
        ray = self._ray
        if ray.is_initialized():
            return  # The caller's own Ray session: use it, leave it running.
        env = dict(_WORKER_ENV)
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        if address is None:
            # A local instance sees the driver's modules, as spawned worker
            # processes do (a user task given as module:attr, a src checkout).
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            cores = _usable_cores()
            if workers is not None:
                cores = max(cores, int(np.ceil(workers * cpus_per_device)))
            options["num_cpus"] = cores
            # Nothing reads an instance's metrics when it lives for one run
            # without a dashboard; not recording and exporting them takes
            # about 1% of a core off the cores the actors train on.
            options["_system_config"] = {"enable_metrics_collection": False}
        else:
            _check_reachable(address)
            options["address"] = address
        try:
            ray.init(runtime_env={"env_vars": env}, **options)
        except ConnectionError as e:
            raise BackendError(f"cannot join the Ray cluster at {address!r}: {e}") from None
        self._owns_ray = True

    def _start_actors(
        self,
        task_name: str,
        spec: DataSpec,
        strategy: Strategy,
        datasets: Sequence[Dataset],
        recipe: DataRecipe | None,
        base_config: TrainConfig,
        seed: int,
        cpus_per_device: float,
        on_failure: str,
    ) -> None:
        ray = self._ray
        count = self.workers
        actor_cls = ray.remote(_DeviceActor).options(
            num_cpus=cpus_per_device,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_RESTARTS if on_failure == "retry" else 0,
            scheduling_strategy="SPREAD",
        )
        self.owner = assign_devices([len(ds) for ds in datasets], count,
                                    batch_size=base_config.batch_size)
        for index in range(count):
            mine = [d for d, w in enumerate(self.owner) if w == index]
            source: DataRecipe | Any = recipe
            if recipe is None:
                source = ray.put({d: datasets[d] for d in mine})
                # Held for the backend's life: a restarted actor reads its shard again.
                self._shards.append(source)
            self._actors.append(actor_cls.remote(
                task_name, spec, strategy, base_config, seed, source, mine, self._attack,
                self._encoding, self._count_bytes,
            ))
        self._failures = [0] * count
        pending = [a.ready.remote() for a in self._actors]
        done, waiting = ray.wait(pending, num_returns=len(pending), timeout=READY_TIMEOUT_S)
        if waiting:
            raise BackendError(
                f"{len(waiting)} of {count} Ray workers did not start within "
                f"{READY_TIMEOUT_S:.0f} s (does the cluster have "
                f"{count * cpus_per_device:g} free CPUs?)"
            )
        info = self._get(done)
        by_ref = dict(zip(done, info, strict=True))
        placed = [by_ref[r] for r in pending]
        self.pids = [p[0] for p in placed]
        self.nodes = sorted({p[1] for p in placed})

    # Rounds --------------------------------------------------------------------

    def run_round(self, round_id: int, params: Params, jobs: Sequence[DeviceJob]) -> PartialRound:
        ray = self._ray
        enter = self._profile.enter()
        per_actor: list[list[DeviceJob]] = [[] for _ in range(self.workers)]
        for job in jobs:
            per_actor[self.owner[job.device_id]].append(job)
        params_ref = ray.put(params)
        level: list[tuple[int, Any]] = [
            (i, self._actors[i].run.remote(round_id, params_ref, per_actor[i]))
            for i in range(self.workers) if per_actor[i]
        ]
        # Merge tasks join the partials FAN_IN at a time until FAN_IN or fewer
        # are left, which the driver joins itself as they arrive: the root of
        # the tree costs no task, no extra trip through the object store, and
        # the driver still holds O(model) (objects it reads from the store are
        # shared-memory views; the first is copied once to add the rest into).
        while not self._collect and len(level) > FAN_IN:
            level = [
                (g[0][0], self._merge.remote([(i, [ref]) for i, ref in g], self._tolerate))
                for g in (level[k:k + FAN_IN] for k in range(0, len(level), FAN_IN))
            ]
        items = level
        merged = self._get_one(lambda: _combine(items, tolerate=self._tolerate, get=ray.get))
        times = RoundTimes(round_id, enter, time.time(), merged.spans)
        for index in merged.lost:
            self._failures[index] += 1
            if self._failures[index] > MAX_RESTARTS:
                raise BackendError(
                    f"Ray worker {index} was lost {self._failures[index]} times; giving up"
                )
            logger.warning(
                "round %d: Ray worker %d was lost; its %d devices count as dropped out",
                round_id, index, len(per_actor[index]),
            )
            self._await_restart(index)
        self._profile.leave(times)
        if merged.part is None:
            # Every worker was lost: an empty partial, so every device is a dropout.
            return PartialRound(accumulator=self._strategy.accumulator(params))
        return merged.part

    def _await_restart(self, index: int) -> None:
        """Wait until Ray has restarted lost worker ``index`` (its data reloaded) for the next round."""
        probe = self._actors[index].ready.options(max_task_retries=MAX_RESTARTS).remote()
        try:
            self._ray.get(probe, timeout=READY_TIMEOUT_S)
        except Exception as e:
            raise BackendError(
                f"Ray worker {index} was lost and did not come back: {type(e).__name__}"
            ) from None

    def _get_one(self, fetch: Callable[[], _Merged]) -> _Merged:
        try:
            return fetch()
        except Exception as e:
            raise self._translate(e) from None

    def _get(self, refs: Sequence[Any]) -> list[Any]:
        try:
            return list(self._ray.get(list(refs)))
        except Exception as e:
            raise self._translate(e) from None

    def _translate(self, e: BaseException) -> BaseException:
        """A Ray error as the fedge error it stands for, on one line."""
        from ray.exceptions import RayActorError, RayError, RayTaskError

        cause: BaseException | None = e
        while isinstance(cause, RayTaskError):
            cause = cause.cause
        if isinstance(cause, FedgeError):
            kind = _ERRORS.get(type(cause).__name__)
            if kind is None:
                kind = next((k for k in _ERRORS.values() if isinstance(cause, k)), BackendError)
            message = str(cause.args[0]) if len(cause.args) == 1 else str(cause)
            return kind(f"Ray worker: {_one_line(message)}")
        if isinstance(cause, RayActorError):
            return BackendError(
                f"a Ray worker died and was not recovered ({type(cause).__name__}: "
                f"{_one_line(str(cause))[:300]}); see Ray's logs under the session's logs/ folder"
            )
        if isinstance(cause, RayError | Exception) and cause is not None:
            return BackendError(f"Ray worker: {type(cause).__name__}: {_one_line(str(cause))}")
        return e

    def _finish_profile(self) -> None:
        """Gather the actors' spans and the processes' CPU into :attr:`profile`."""
        self._profile.finish()
        ray = self._ray
        refs = [a.profile.remote() for a in self._actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROFILE_TIMEOUT_S)
        got: list[WorkerReport | None] = []
        for ref in refs:
            try:
                got.append(ray.get(ref) if ref in ready else None)
            except Exception:  # a lost actor's spans are gone with it
                got.append(None)
        self.profile = self._profile.summary(got, self.pids)

    def close(self) -> None:
        ray = self._ray
        if self._profile.rounds and self.profile is None:
            try:
                self._finish_profile()
            except Exception as e:
                logger.debug("no backend profile: %s: %s", type(e).__name__, e)
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:
                logger.debug("Ray actor already gone at close")
        self._actors.clear()
        self._shards.clear()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def describe(self) -> dict[str, Any]:
        """What summary.json records about the backend."""
        out: dict[str, Any] = {"workers": self.workers, "nodes": len(self.nodes),
                               "start_s": round(self.start_s, 4)}
        if self.profile is not None:
            out["profile"] = self.profile
        return out


def _check_reachable(address: str) -> None:
    """Fail fast when nothing listens at HOST:PORT (Ray itself would retry for minutes)."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BackendError(
            f"cannot join the Ray cluster at {address}: {e.strerror or e} "
            "(is its head node running? start one with: ray start --head)"
        ) from None


def _one_line(text: str) -> str:
    first = text.strip().splitlines()
    return first[0] if first else text
