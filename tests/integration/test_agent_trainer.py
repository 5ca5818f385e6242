"""Training in a limited, policy-watched child process: results, failures, caps, stops and pauses."""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.monitor import Monitor, Readings
from fedge.agent.policy import Policy, parse_policy
from fedge.agent.trainer import Limits, Trainer, TrainingStopped, agent_overhead
from fedge.errors import TaskError


class ScriptedMonitor(Monitor):
    """Readings from a list, one per check (the last one repeats)."""

    def __init__(self, script: list[Readings]) -> None:
        super().__init__(Path("/"))
        self.script = script
        self.calls = 0

    def read(self) -> Readings:
        r = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return r


def reading(**kw: object) -> Readings:
    base = dict(cpu_load=0.0, memory_available_mb=1000.0, battery_percent=None, on_ac=True,
                temperature_c=40.0, disk_free_mb=1000.0, cores=2)
    base.update(kw)
    return Readings(**base)  # type: ignore[arg-type]


def trainer(script: list[Readings], policy: Policy | None = None, **limits: float) -> Trainer:
    return Trainer(Limits(check_every_s=0.05, **limits), policy or Policy(), ScriptedMonitor(script))  # type: ignore[arg-type]


def _sum_of_squares() -> float:
    x = np.arange(1000, dtype=np.float64)
    return float(x @ x)


def _sleep_then(value: int, seconds: float) -> int:
    time.sleep(seconds)
    return value


def test_the_childs_value_and_its_stats_come_back() -> None:
    value, stats = trainer([reading()]).run(_sum_of_squares)
    assert value == float(sum(i * i for i in range(1000)))
    assert stats.wall_s > 0 and stats.pauses == 0 and stats.peak_rss_mb and stats.peak_rss_mb > 1


def test_a_failing_task_is_a_task_error_naming_the_exception() -> None:
    def boom() -> None:
        raise KeyError("no such layer")

    with pytest.raises(TaskError, match="training raised KeyError: 'no such layer'"):
        trainer([reading()]).run(boom)


def test_the_memory_cap_stops_a_runaway_model_in_the_child_only() -> None:
    def hog() -> int:
        return len(np.ones(2_000_000_000 // 8))  # 2 GB

    with pytest.raises(TaskError, match="training ran out of memory under the memory_mb cap of 1536 MiB"):
        trainer([reading()], memory_mb=1536).run(hog)
    assert np.ones(1000).sum() == 1000  # the agent itself is unharmed


def test_max_train_s_stops_training() -> None:
    t0 = time.monotonic()
    with pytest.raises(TrainingStopped, match="training took more than max_train_s 1 s"):
        trainer([reading()], max_train_s=1.0).run(lambda: _sleep_then(1, 30))
    assert time.monotonic() - t0 < 10


def test_an_unsafe_device_stops_training_with_the_reasons() -> None:
    policy = parse_policy({"require_ac": True, "max_temperature_c": 70})
    script = [reading(), reading(on_ac=False, temperature_c=85.0)]
    with pytest.raises(TrainingStopped) as stop:
        trainer(script, policy).run(lambda: _sleep_then(1, 30))
    assert stop.value.reasons == ("not on AC power", "temperature 85.0 C > 70 C")


def test_a_busy_device_pauses_training_and_resumes_it() -> None:
    policy = parse_policy({"max_cpu_load": 0.5})
    script = [reading(cpu_load=0.9)] * 6 + [reading(cpu_load=0.1)]
    value, stats = trainer(script, policy).run(lambda: _sleep_then(7, 0.5))
    assert value == 7
    assert stats.pauses == 1 and stats.paused_s >= 0.2


def test_agent_overhead_reports_cpu_and_rss() -> None:
    o = agent_overhead()
    assert o["cpu_s"] > 0 and o["rss_mb"] > 10


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def _busy_training() -> float:
    # CPU-bound work that takes about 1.5 s of CPU on this machine.
    t0 = time.process_time()
    while time.process_time() - t0 < 1.5:
        pass
    return time.process_time() - t0


@pytest.mark.slow
def test_a_cpu_bound_neighbour_makes_training_yield(tmp_path: Path) -> None:
    """The real monitor on this machine: a neighbour on every core makes the training child pause,
    and while paused it uses no CPU; when the neighbour is gone, training finishes."""
    cores = os.cpu_count() or 1
    # One more neighbour than cores: even sharing the machine with the training child, the
    # neighbours' load is at least (cores + 1) / (cores + 2) of it, well above the bound.
    policy = parse_policy({"max_cpu_load": 0.5})
    holder: list[Trainer] = []
    monitor = Monitor(Path("/"), own_cpu_s=lambda: _own() + (holder[0].child_cpu_s() if holder else 0.0))
    t = Trainer(Limits(check_every_s=0.2), policy, monitor, local_now=dt.datetime.now)
    holder.append(t)
    ctx = mp.get_context("fork")
    neighbours = [ctx.Process(target=_burn, args=(3.0,)) for _ in range(cores + 1)]
    for n in neighbours:
        n.start()
    try:
        monitor.read()  # the agent reads at every check-in; the first load needs an interval
        time.sleep(0.3)
        value, stats = t.run(_busy_training)
    finally:
        for n in neighbours:
            n.join()
    assert stats.pauses >= 1, stats
    assert stats.paused_s >= 1.0, stats
    assert value >= 1.5
    # While paused the child did no work: its CPU time is its work, not its wall time.
    assert stats.cpu_s < stats.wall_s - 0.9, stats


def _own() -> float:
    tm = os.times()
    return tm.user + tm.system + tm.children_user + tm.children_system
