"""Where a parallel backend's round time goes, measured so that a busy machine cannot hide it.

A round on the ``processes`` or ``ray`` backend is a critical path: the
driver submits the round (params out, one call per worker), the workers
train their devices in parallel, their partial sums come back (through the
merge tree on Ray), and the engine does the serial rest (strategy apply,
evaluation, byte counting, the next cohort) before the next round starts.
Amdahl's law (Amdahl, "Validity of the single processor approach to
achieving large scale computing capabilities", AFIPS 1967) then bounds the
speed-up of W workers by the serial part.

Every part is measured twice: as wall time, which other work on a shared
machine inflates, and as CPU time of the thread doing it
(``time.thread_time``), which it inflates much less (it still counts cache
and memory-bandwidth contention). Workers time their own ``run`` calls
(:class:`WorkerClock`) and hand the spans back; the driver times the rest
(:class:`BackendProfile`); the processes of a local Ray instance are charged
their CPU from ``/proc``. ``summary.json`` records the totals under
``backend.profile`` (the keys are explained in docs/scale.md, "Where the
time goes"), and ``bench/scale.py --only mlp`` turns them into the Amdahl
figures.

Clocks: spans use ``time.time()``, comparable between processes of one
machine; across machines they are as good as the nodes' clock sync, so the
phase split (not the CPU figures) is approximate on a multi-node cluster.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BackendProfile", "RoundTimes", "Span", "WorkerClock", "WorkerReport", "descendants_cpu_s"]

#: One worker's ``run`` call: (round, start, end, thread CPU seconds).
Span = tuple[int, float, float, float]


@dataclass
class WorkerReport:
    """What a worker hands back at the end: its spans, and its process's CPU since its first round."""

    spans: list[Span] = field(default_factory=list)
    process_cpu_s: float = 0.0


class WorkerClock:
    """Times a worker's rounds: its own thread's CPU, and its whole process's (Ray's threads too)."""

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._cpu_at_first: float | None = None

    def start(self) -> tuple[float, float]:
        if self._cpu_at_first is None:
            self._cpu_at_first = _process_cpu_s()
        return time.time(), time.thread_time()

    def stop(self, round_id: int, started: tuple[float, float]) -> Span:
        span = (round_id, started[0], time.time(), time.thread_time() - started[1])
        self._spans.append(span)
        return span

    def report(self) -> WorkerReport:
        first = self._cpu_at_first
        return WorkerReport(list(self._spans), 0.0 if first is None else _process_cpu_s() - first)


@dataclass
class RoundTimes:
    """One round at the driver: instants (``time.time()``) and the remote merges' spans."""

    round_id: int
    enter: float  # run_round called
    got: float  # the round's merged partial in hand
    merges: list[tuple[int, float, float, float]] = field(default_factory=list)  # (pid, start, end, cpu)
    driver_cpu_s: float = 0.0  # the driver thread's CPU inside run_round
    engine_s: float = 0.0  # from run_round's return to the next call (or to close)
    engine_cpu_s: float = 0.0


class BackendProfile:
    """The driver's side: per-round instants and CPU, then :meth:`summary` over every round."""

    def __init__(self, tree_cpu: Callable[[], dict[int, float]] | None = None) -> None:
        self.rounds: list[RoundTimes] = []
        self._tree_cpu = tree_cpu
        self._left: tuple[float, float] | None = None  # (time, thread CPU) at the last return
        self._gap = (0.0, 0.0)
        self._enter_cpu = 0.0
        self._driver_cpu_at_first = 0.0
        self._tree_cpu_at_first: dict[int, float] = {}
        self._started = False

    def enter(self) -> float:
        """run_round was called; returns the instant for :class:`RoundTimes`."""
        now, cpu = time.time(), time.thread_time()
        if not self._started:
            self._started = True
            self._driver_cpu_at_first = time.process_time()
            self._tree_cpu_at_first = self._tree_cpu() if self._tree_cpu is not None else {}
        self._gap = (0.0, 0.0) if self._left is None else (now - self._left[0], cpu - self._left[1])
        self._enter_cpu = cpu
        return now

    def leave(self, times: RoundTimes) -> None:
        """run_round returns: the engine's work since the previous one is charged to that round."""
        cpu = time.thread_time()
        times.driver_cpu_s = cpu - self._enter_cpu
        if self.rounds:
            self.rounds[-1].engine_s, self.rounds[-1].engine_cpu_s = self._gap
        self.rounds.append(times)
        self._left = (time.time(), cpu)

    def finish(self) -> None:
        """The backend closes: the engine's work after the last round (its evaluation) is that round's."""
        if self.rounds and self._left is not None:
            self.rounds[-1].engine_s = time.time() - self._left[0]
            self.rounds[-1].engine_cpu_s = time.thread_time() - self._left[1]
            self._left = None

    def summary(self, workers: Sequence[WorkerReport | None], worker_pids: Sequence[int]) -> dict[str, Any]:
        """Totals over the rounds, in seconds (``None`` for a worker whose report was lost).

        Phases of a round, which add up to its wall time: ``start_s`` (from
        run_round's call to the first worker starting), ``workers_s`` (first
        start to last end), ``collect_s`` (last end to the merged partial at
        the driver) and ``engine_s`` (from there to the next round). CPU:
        ``critical_worker_cpu_s`` sums each round's busiest worker, the
        parallel phase's length on a machine with a free core per worker;
        ``median_round`` holds the median round of the per-round figures
        (``serial_cpu_s`` is the driver thread's engine and backend CPU).
        """
        spans = [{} if w is None else {s[0]: s for s in w.spans} for w in workers]
        me = os.getpid()
        total = {"start_s": 0.0, "workers_s": 0.0, "collect_s": 0.0, "engine_s": 0.0,
                 "engine_cpu_s": 0.0, "driver_backend_cpu_s": 0.0, "merge_cpu_s": 0.0,
                 "critical_worker_s": 0.0, "critical_worker_cpu_s": 0.0}
        merge_pids: set[int] = set()
        per_round: dict[str, list[float]] = {k: [] for k in (
            "serial_cpu_s", "critical_worker_cpu_s", "worker_cpu_s", "start_s", "collect_s", "engine_s")}
        for rt in self.rounds:
            mine = [sp[rt.round_id] for sp in spans if rt.round_id in sp]
            first = min((s[1] for s in mine), default=rt.enter)
            last = max((s[2] for s in mine), default=rt.enter)
            total["start_s"] += first - rt.enter
            total["workers_s"] += last - first
            total["collect_s"] += rt.got - last
            total["engine_s"] += rt.engine_s
            total["engine_cpu_s"] += rt.engine_cpu_s
            total["driver_backend_cpu_s"] += rt.driver_cpu_s
            remote = [m for m in rt.merges if m[0] != me]  # the driver's own is in driver_backend
            total["merge_cpu_s"] += sum(m[3] for m in remote)
            merge_pids.update(m[0] for m in remote)
            total["critical_worker_s"] += max((s[2] - s[1] for s in mine), default=0.0)
            total["critical_worker_cpu_s"] += max((s[3] for s in mine), default=0.0)
            per_round["serial_cpu_s"].append(rt.engine_cpu_s + rt.driver_cpu_s)
            per_round["critical_worker_cpu_s"].append(max((s[3] for s in mine), default=0.0))
            per_round["worker_cpu_s"].append(sum(s[3] for s in mine))
            per_round["start_s"].append(first - rt.enter)
            per_round["collect_s"].append(rt.got - last)
            per_round["engine_s"].append(rt.engine_s)
        out: dict[str, Any] = {"rounds": len(self.rounds), **{k: round(v, 4) for k, v in total.items()}}
        # Medians over rounds resist bursts of other work on the machine.
        out["median_round"] = {k: round(statistics.median(v), 5) if v else 0.0
                               for k, v in per_round.items()}
        out["worker_run_s"] = [round(sum(s[2] - s[1] for s in sp.values()), 4) for sp in spans]
        out["worker_run_cpu_s"] = [round(sum(s[3] for s in sp.values()), 4) for sp in spans]
        out["worker_process_cpu_s"] = [None if w is None else round(w.process_cpu_s, 4) for w in workers]
        out["driver_process_cpu_s"] = round(time.process_time() - self._driver_cpu_at_first, 4)
        if self._tree_cpu is not None:
            grown = {pid: c - self._tree_cpu_at_first.get(pid, 0.0)
                     for pid, c in self._tree_cpu().items() if pid not in worker_pids}
            out["merge_process_cpu_s"] = round(sum(c for p, c in grown.items() if p in merge_pids), 4)
            # A local Ray instance's own processes: GCS, raylet, agents, idle workers.
            out["system_cpu_s"] = round(sum(c for p, c in grown.items() if p not in merge_pids), 4)
        return out


def descendants_cpu_s(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of every descendant of process ``root``, from Linux's /proc.

    Empty where there is no /proc.
    """
    if not os.path.isdir("/proc"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        # The command name (field 2) may hold spaces and parentheses; the
        # fields after it start past its last ')': state, ppid, ... utime (14), stime (15).
        fields = stat[stat.rindex(b")") + 2:].split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, float] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out[pid] = cpu[pid]
        todo.extend(children.get(pid, []))
    return out


def _process_cpu_s() -> float:
    """This process's CPU seconds, every thread, user and system."""
    t = os.times()
    return t.user + t.system
