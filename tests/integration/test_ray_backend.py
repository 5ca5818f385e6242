"""The ``ray`` backend on a real local Ray instance: agreement with inline, the merge tree, failures.

One Ray instance (2 CPUs) serves the whole module; the backend joins it as a
caller's own session and leaves it running. Its workers import the test
tasks below through ``PYTHONPATH`` set for the whole Ray job.
"""

from __future__ import annotations

import logging
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from fedge import params as P  # noqa: E402
from fedge.data import load_federated  # noqa: E402
from fedge.errors import BackendError, ConfigError, TaskError  # noqa: E402
from fedge.sim.config import SimConfig  # noqa: E402
from fedge.sim.devices import DeviceJob, DeviceRunner, PartialRound  # noqa: E402
from fedge.sim.engine import Simulation, simulate  # noqa: E402
from fedge.sim.ray_backend import FAN_IN, RayBackend  # noqa: E402
from fedge.strategies import build_strategy  # noqa: E402
from fedge.tasks import LogReg  # noqa: E402
from fedge.tasks.base import TrainConfig  # noqa: E402

# Inline and ray add the same per-device deltas in another order (per worker,
# then the merge tree); after a few rounds of float32 training that leaves
# differences of a few ulps, far below this.
ATOL = 1e-5

TASKS = textwrap.dedent('''
    import os
    import signal
    from pathlib import Path

    import numpy as np
    from fedge import params as P
    from fedge.strategies import Aggregate, fedavg
    from fedge.tasks import LogReg

    HERE = Path(__file__).parent


    class KillOnce(LogReg):
        """LogReg that SIGKILLs its own worker process once, in the first round after arming."""

        def __init__(self, spec, tag):
            super().__init__(spec)
            self.tag = tag

        def train(self, params, data, config, rng):
            if (HERE / f"armed-{self.tag}").exists():
                try:
                    fd = os.open(HERE / f"killed-{self.tag}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().train(params, data, config, rng)


    def kill_once_retry(spec):
        return KillOnce(spec, "retry")


    def kill_once_dropout(spec):
        return KillOnce(spec, "dropout")


    def kill_always(spec):
        return KillOnce(spec, "always")


    class SlowTask(LogReg):
        """LogReg that takes a while per device, so a round can be interrupted from outside."""

        def train(self, params, data, config, rng):
            import time
            time.sleep(0.25)
            return super().train(params, data, config, rng)


    class RaisingTask(LogReg):
        def train(self, params, data, config, rng):
            raise RuntimeError("disk on fire")


    def worker_only_failure(spec):
        from fedge.errors import TaskError
        if os.environ.get("FEDGE_TEST_DRIVER") != "1":
            raise TaskError("no accelerator in this worker")
        return LogReg(spec)


    class KeepEvery:
        """FedAvg whose accumulator keeps every update, as robust rules do."""

        needs_every_update = True
        name = "keep-every"
        device_mu = 0.0

        def __init__(self):
            self._inner = fedavg()

        def init(self, params):
            return self._inner.init(params)

        def accumulator(self, template):
            return KeptUpdates()

        def apply(self, state, aggregate):
            return self._inner.apply(state, aggregate)


    class KeptUpdates:
        def __init__(self):
            self.updates = []

        @property
        def count(self):
            return len(self.updates)

        @property
        def total_weight(self):
            return sum(w for _, w in self.updates)

        def add(self, delta, weight):
            self.updates.append(({k: np.array(v) for k, v in delta.items()}, float(weight)))

        def merge(self, other):
            self.updates.extend(other.updates)

        def result(self):
            total = self.total_weight
            out = P.zeros_like(self.updates[0][0])
            for delta, weight in self.updates:
                P.add_scaled_(out, delta, weight)
            return Aggregate(delta=P.scale(out, 1.0 / total), total_weight=total, count=self.count)
''')


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ray-tasks")
    (folder / "fedge_ray_test_tasks.py").write_text(TASKS)
    return folder


@pytest.fixture(scope="module")
def ray_session(tasks_dir: Path) -> Iterator[None]:
    """A local 2-CPU Ray instance whose workers can import fedge and the test tasks."""
    import sys

    sys.path.insert(0, str(tasks_dir))
    path = os.pathsep.join([str(tasks_dir), *(p for p in sys.path if p)])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    os.environ["FEDGE_TEST_DRIVER"] = "1"
    try:
        yield
    finally:
        os.environ.pop("FEDGE_TEST_DRIVER", None)
        ray.shutdown()
        sys.path.remove(str(tasks_dir))


def _close(a: P.Params, b: P.Params) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _same_rounds(a: list, b: list) -> None:  # type: ignore[type-arg]
    keys = ("round", "state", "invited", "reported", "dropped", "rejected", "stragglers")
    assert [[getattr(r, k) for k in keys] for r in a] == [[getattr(r, k) for k in keys] for r in b]


@pytest.mark.parametrize(
    "settings",
    [
        {"workers": 2},
        # Five workers at 0.4 CPU each on 2 CPUs: a merge tree two levels deep.
        {"workers": 5, "ray_cpus_per_device": 0.4},
        {"workers": 2, "strategy": "fedadam", "cohort": 7, "stragglers": 0.3, "local_epochs": 2},
        # Device-side DP (clipping and local noise in DeviceRunner) comes along unchanged.
        {"workers": 2, "dp": "local", "clip_norm": 1.0, "noise_multiplier": 0.3},
        {"workers": 2, "dp": "central", "clip_norm": 1.0, "noise_multiplier": 0.5, "sample_rate": 0.5},
        # Robust rules with mixing first: every update collected, merged in the tree's order.
        {"workers": 2, "strategy": "median:mix=nnm", "attack": "sign-flip:10", "malicious": 0.2},
        {"workers": 5, "ray_cpus_per_device": 0.4, "strategy": "trimmed-mean:0.4:bucket=2",
         "attack": "gaussian:1", "malicious": 0.1},
        # Device profiles and the virtual clock run at the driver, before the backend.
        {"workers": 2, "devices": 30, "cohort": 10, "profiles": "lognormal-speed:10:5,dropout:0.1",
         "deadline_s": 30.0, "selection": "deadline"},
    ],
)
def test_ray_agrees_with_inline(ray_session: None, settings: dict[str, object]) -> None:
    assert FAN_IN < 5
    cfg = SimConfig(rounds=3, **settings)  # type: ignore[arg-type]
    inline = simulate(cfg)
    on_ray = simulate(cfg.replace(backend="ray"))
    _same_rounds(inline.history, on_ray.history)
    assert _close(inline.params, on_ray.params) < ATOL
    assert on_ray.metrics["accuracy"] == pytest.approx(inline.metrics["accuracy"], abs=2e-3)
    assert on_ray.summary()["backend"]["workers"] == settings["workers"]
    assert on_ray.summary()["privacy"] == inline.summary()["privacy"]
    for key in ("simulated_time_s", "participation"):
        assert on_ray.summary().get(key) == inline.summary().get(key)


def test_ray_backend_profiles_its_rounds_and_merges(ray_session: None) -> None:
    # Five workers: one merge task joins four of them, the driver joins it and the fifth.
    result = simulate(rounds=2, workers=5, ray_cpus_per_device=0.4, backend="ray")
    prof = result.summary()["backend"]["profile"]
    assert prof["rounds"] == 2
    assert len(prof["worker_run_cpu_s"]) == 5 and all(c > 0 for c in prof["worker_run_cpu_s"])
    assert prof["merge_cpu_s"] > 0
    phases = prof["start_s"] + prof["workers_s"] + prof["collect_s"] + prof["engine_s"]
    assert phases == pytest.approx(result.timing["rounds_s"], abs=0.05)
    # A caller's own Ray session is not this backend's to charge: no process accounting.
    assert "system_cpu_s" not in prof


def test_ray_with_data_given_as_values(ray_session: None) -> None:
    fed = load_federated("synthetic:0.5,0.5,12", partition=None, num_devices=None, seed=1)
    cfg = SimConfig(data="synthetic:0.5,0.5,12", rounds=2, workers=2)
    inline = Simulation(cfg, data=fed).run()
    on_ray = Simulation(cfg.replace(backend="ray"), data=fed).run()
    _same_rounds(inline.history, on_ray.history)
    assert _close(inline.params, on_ray.params) < ATOL


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_round_is_the_same(ray_session: None, tasks_dir: Path) -> None:
    def arm(record: object) -> None:
        (tasks_dir / "armed-retry").touch()

    cfg = SimConfig(rounds=3, workers=2)
    plain = simulate(cfg.replace(backend="ray", task="fedge.tasks:LogReg"))
    killed = simulate(cfg.replace(backend="ray", task="fedge_ray_test_tasks:kill_once_retry"),
                      on_round=arm)
    assert int((tasks_dir / "killed-retry").read_text()) != os.getpid()  # a worker died, not us
    assert all(r.reported == 20 and r.dropped == 0 for r in killed.history)
    _same_rounds(plain.history, killed.history)
    assert _close(plain.params, killed.params) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("on_failure", ["retry", "dropout"])
def test_a_worker_killed_from_outside_mid_round(ray_session: None, on_failure: str) -> None:
    import signal
    import threading

    fed = load_federated("digits", partition=None, num_devices=12, seed=0)
    base = TrainConfig(local_epochs=1, batch_size=32, lr=0.1, mu=0.0)
    strategy = build_strategy("fedavg")
    params = LogReg(fed.spec).init_params(np.random.default_rng(0))
    jobs = [DeviceJob(d, 1) for d in range(12)]
    expected = DeviceRunner(task=LogReg(fed.spec), strategy=strategy,
                            datasets=dict(enumerate(fed.devices)), base_config=base,
                            seed=0).run(1, params, jobs)
    backend = RayBackend(
        task_name="fedge_ray_test_tasks:SlowTask", spec=fed.spec, strategy=strategy,
        datasets=fed.devices, recipe=None, base_config=base, seed=0, address=None,
        cpus_per_device=1.0, workers=2, on_failure=on_failure,
    )
    try:
        box: dict[str, object] = {}
        worker = threading.Thread(target=lambda: box.update(part=backend.run_round(1, params, jobs)))
        worker.start()
        time.sleep(0.6)  # each worker is a few devices into its 6 x 0.25 s batch
        os.kill(backend.pids[1], signal.SIGKILL)
        worker.join(timeout=120)
        assert not worker.is_alive(), "the round hung on a killed worker"
        part = box["part"]
        assert isinstance(part, PartialRound)
        if on_failure == "retry":
            assert sorted(d for d, _ in part.reports) == list(range(12))
            assert _close(part.accumulator.result().delta, expected.accumulator.result().delta) < ATOL
        else:
            # Worker 1's devices all drop out, the others count.
            assert sorted(d for d, _ in part.reports) == [d for d in range(12) if backend.owner[d] != 1]
        # The worker is back (restarted, data reloaded) for the next round.
        again = backend.run_round(2, params, jobs)
        assert sorted(d for d, _ in again.reports) == list(range(12))
    finally:
        backend.close()


@pytest.mark.slow
def test_a_killed_worker_counts_as_dropout(ray_session: None, tasks_dir: Path) -> None:
    def arm(record: object) -> None:
        (tasks_dir / "armed-dropout").touch()

    cfg = SimConfig(rounds=3, workers=2, backend="ray", ray_on_failure="dropout",
                    task="fedge_ray_test_tasks:kill_once_dropout")
    result = simulate(cfg, on_round=arm)
    assert (tasks_dir / "killed-dropout").exists()
    first, second, third = result.history
    assert (first.reported, first.dropped) == (20, 0)
    # Devices are dealt out evenly, so the lost worker held 10 of the 20.
    assert (second.state, second.reported, second.dropped) == ("complete", 10, 10)
    assert (third.reported, third.dropped) == (20, 0)  # restarted, data reloaded


@pytest.mark.slow
def test_a_worker_that_keeps_dying_stops_the_run(ray_session: None, tasks_dir: Path) -> None:
    (tasks_dir / "armed-always").touch()

    # Each kill leaves the marker, so only the first train call per marker dies;
    # clearing it before every round makes the worker die every round.
    def clear(record: object) -> None:
        (tasks_dir / "killed-always").unlink(missing_ok=True)

    (tasks_dir / "killed-always").unlink(missing_ok=True)
    cfg = SimConfig(rounds=8, workers=2, backend="ray", ray_on_failure="dropout",
                    task="fedge_ray_test_tasks:kill_always")
    with pytest.raises(BackendError, match="lost 4 times; giving up"):
        simulate(cfg, on_round=clear)


def test_worker_errors_keep_their_kind_and_stay_one_line(ray_session: None) -> None:
    with pytest.raises(TaskError) as info:
        simulate(rounds=1, workers=2, backend="ray", task="fedge_ray_test_tasks:RaisingTask")
    assert "disk on fire" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TaskError) as info:
        simulate(rounds=1, workers=2, backend="ray", task="fedge_ray_test_tasks:worker_only_failure")
    assert "no accelerator in this worker" in str(info.value) and "\n" not in str(info.value)


def test_more_workers_than_the_cluster_has_cpus_is_refused(ray_session: None) -> None:
    with pytest.raises(ConfigError, match=r"3 Ray workers .* need 3 CPUs; the cluster has 2"):
        simulate(rounds=1, workers=3, backend="ray")


def test_strategy_needing_every_update_is_collected_with_a_warning(
    ray_session: None, caplog: pytest.LogCaptureFixture
) -> None:
    import fedge_ray_test_tasks as t  # type: ignore[import-not-found]

    fed = load_federated("digits", partition=None, num_devices=9, seed=0)
    task = LogReg(fed.spec)
    base = TrainConfig(local_epochs=1, batch_size=32, lr=0.1, mu=0.0)
    params = task.init_params(np.random.default_rng(0))
    jobs = [DeviceJob(d, 1) for d in range(9)]
    inline = DeviceRunner(task=task, strategy=t.KeepEvery(), datasets=dict(enumerate(fed.devices)),
                          base_config=base, seed=0).run(1, params, jobs)
    with caplog.at_level(logging.WARNING, logger="fedge.sim.ray_backend"):
        backend = RayBackend(
            task_name="logreg", spec=fed.spec, strategy=t.KeepEvery(), datasets=fed.devices,
            recipe=None, base_config=base, seed=0, address=None, cpus_per_device=0.5,
            workers=4, on_failure="retry",
        )
    try:
        part = backend.run_round(1, params, jobs)
    finally:
        backend.close()
    assert "needs every update" in caplog.text and "memory" in caplog.text
    assert part.accumulator.count == 9
    assert sorted(d for d, _ in part.reports) == list(range(9))
    assert _close(part.accumulator.result().delta, inline.accumulator.result().delta) < ATOL
