"""Device placement over workers, the backend profile's arithmetic, /proc CPU accounting, malloc tuning."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import time

import pytest

from fedge.sim.backend_profile import BackendProfile, RoundTimes, WorkerClock, WorkerReport, descendants_cpu_s
from fedge.sim.backends import assign_devices


def _load(owner: list[int], sizes: list[int], workers: int) -> tuple[list[int], list[int]]:
    counts = [owner.count(w) for w in range(workers)]
    examples = [sum(n for n, w in zip(sizes, owner, strict=True) if w == worker) for worker in range(workers)]
    return counts, examples


def _steps(sizes: list[int], batch_size: int) -> list[int]:
    return [-(-n // batch_size) for n in sizes]


def test_devices_go_to_the_worker_with_the_fewest_steps_then_examples() -> None:
    #            d:  0   1   2   3   4   5
    sizes = [10, 60, 30, 50, 40, 20]  # steps at batch 20: 1, 3, 2, 3, 2, 1
    # Most steps first, each to the worker with (fewest steps, fewest examples):
    # 1 -> w0 (3, 60); 3 -> w1 (3, 50); 4 -> w1, fewer examples (5, 90); 2 -> w0 (5, 90);
    # 5 -> w0, a tie goes to the lower worker (6, 110); 0 -> w1 (6, 100).
    owner = assign_devices(sizes, 2, batch_size=20)
    assert owner == [1, 0, 0, 1, 1, 0]
    counts, examples = _load(owner, sizes, 2)
    assert counts == [3, 3] and examples == [110, 100]
    assert _load(owner, _steps(sizes, 20), 2)[1] == [6, 6]


def test_placement_balances_skewed_sizes_better_than_modulo() -> None:
    sizes = [33, 157, 113, 65, 97, 14, 39, 79, 78, 86, 105, 77, 80, 32, 58, 70, 44, 47, 36, 128]
    owner = assign_devices(sizes, 2, batch_size=32)
    counts, examples = _load(owner, sizes, 2)
    modulo = _load([d % 2 for d in range(len(sizes))], sizes, 2)[1]
    assert counts == [10, 10]
    assert _load(owner, _steps(sizes, 32), 2)[1] == [28, 28]
    assert max(examples) - min(examples) < (max(modulo) - min(modulo)) / 3
    for workers in (3, 4, 7):
        owner = assign_devices(sizes, workers, batch_size=32)
        counts, examples = _load(owner, sizes, workers)
        assert max(counts) <= -(-len(sizes) // workers)
        assert sum(examples) == sum(sizes)
        steps = _load(owner, _steps(sizes, 32), workers)[1]
        assert max(steps) - min(steps) <= max(_steps(sizes, 32))


def test_placement_ties_follow_device_ids_and_extra_workers_stay_empty() -> None:
    assert assign_devices([5, 5, 5, 5], 2, batch_size=8) == [0, 1, 0, 1]
    assert assign_devices([5, 5], 4, batch_size=8) == [0, 1]
    assert assign_devices([], 3, batch_size=8) == []
    assert assign_devices([7, 1, 3], 1, batch_size=8) == [0, 0, 0]


@pytest.mark.parametrize("workers", [0, -2])
def test_placement_refuses_fewer_than_one_worker(workers: int) -> None:
    with pytest.raises(ValueError, match=f"workers must be >= 1, got {workers}"):
        assign_devices([1, 2, 3], workers, batch_size=8)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_placement_refuses_a_batch_size_below_one(batch_size: int) -> None:
    with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {batch_size}"):
        assign_devices([1, 2, 3], 2, batch_size=batch_size)


def _round(profile: BackendProfile, round_id: int, *, engine_s: float) -> RoundTimes:
    enter = profile.enter()
    times = RoundTimes(round_id, enter, enter + 0.3, merges=[(os.getpid() + 1, 0.0, 0.0, 0.02)])
    profile.leave(times)
    time.sleep(engine_s)  # the engine's work between rounds
    return times


def test_profile_adds_phases_and_takes_each_rounds_busiest_worker() -> None:
    profile = BackendProfile()
    first = _round(profile, 1, engine_s=0.02)
    second = _round(profile, 2, engine_s=0.01)
    profile.finish()
    # Worker 0 ran 0.1 s then 0.2 s; worker 1 the other way round, starting later.
    workers = [
        WorkerReport([(1, first.enter + 0.05, first.enter + 0.15, 0.09),
                      (2, second.enter + 0.05, second.enter + 0.25, 0.18)], 0.3),
        WorkerReport([(1, first.enter + 0.06, first.enter + 0.26, 0.19),
                      (2, second.enter + 0.06, second.enter + 0.16, 0.08)], 0.3),
    ]
    out = profile.summary(workers, [11, 12])
    assert out["rounds"] == 2
    assert out["start_s"] == pytest.approx(0.10)  # 0.05 to the first start, twice
    assert out["workers_s"] == pytest.approx(0.21 + 0.20)
    assert out["collect_s"] == pytest.approx(0.04 + 0.05)  # got at +0.3
    assert out["engine_s"] >= 0.03
    assert out["critical_worker_s"] == pytest.approx(0.2 + 0.2)
    assert out["critical_worker_cpu_s"] == pytest.approx(0.19 + 0.18)
    assert out["worker_run_s"] == pytest.approx([0.3, 0.3])
    assert out["worker_run_cpu_s"] == pytest.approx([0.27, 0.27])
    assert out["worker_process_cpu_s"] == [0.3, 0.3]
    assert out["merge_cpu_s"] == pytest.approx(0.04)  # remote merges only
    assert out["median_round"]["worker_cpu_s"] == pytest.approx(0.27)
    assert out["median_round"]["critical_worker_cpu_s"] == pytest.approx(0.185)
    assert "system_cpu_s" not in out  # no process tree was given to charge


def test_profile_keeps_a_lost_workers_place() -> None:
    profile = BackendProfile()
    times = _round(profile, 1, engine_s=0.0)
    profile.finish()
    report = WorkerReport([(1, times.enter + 0.01, times.enter + 0.2, 0.15)], 0.2)
    out = profile.summary([None, report], [1, 2])
    assert out["worker_run_cpu_s"] == [0.0, pytest.approx(0.15)]
    assert out["worker_process_cpu_s"] == [None, 0.2]
    assert out["critical_worker_cpu_s"] == pytest.approx(0.15)


def test_worker_clock_times_its_thread() -> None:
    clock = WorkerClock()
    started = clock.start()
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:
        pass
    span = clock.stop(7, started)
    assert span[0] == 7 and span[2] >= span[1]
    assert 0.04 <= span[3] <= 1.0
    report = clock.report()
    assert report.spans == [span]
    assert report.process_cpu_s >= span[3] - 0.02


def test_descendants_are_charged_their_cpu_from_proc() -> None:
    if not os.path.isdir("/proc"):
        pytest.skip("needs Linux's /proc")
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n" \
           "print('done', flush=True)\ntime.sleep(30)"
    with subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "done"
            cpu = descendants_cpu_s(os.getpid())
            assert child.pid in cpu and cpu[child.pid] >= 0.25
            assert os.getpid() not in cpu
            assert descendants_cpu_s(child.pid) == {}
        finally:
            child.kill()


def test_tune_malloc_makes_model_sized_temporaries_reuse_memory() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    # In a fresh process, so this one's allocator is left as it was.
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np
        from fedge.sim.backends import tune_malloc
        if sys.argv[1] == "tuned":
            assert tune_malloc()
        a = np.ones(1_000_000, np.float32)
        for _ in range(2):  # warm up: the heap grows once
            b = a * 2.0
            c = b + a
            del b, c
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):  # two model-sized temporaries alive at once, as in a round
            b = a * 2.0
            c = b + a
            del b, c
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    faults = {}
    for how in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True,
                             env=env, check=True)
        faults[how] = float(out.stdout)
    # Two 4 MB arrays are about 2,000 pages: faulted in afresh by default, reused once tuned.
    assert faults["default"] > 500
    assert faults["tuned"] < 50
    assert math.isfinite(faults["tuned"])
