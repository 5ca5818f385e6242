"""Local training inside limits, watched by the policy: a forked child per round.

The round's training runs in a child process forked from the agent, so that

- its limits bind training and not the agent: a lower CPU priority
  (``nice``), the idle I/O class, an address-space cap (``RLIMIT_AS``) that
  makes a runaway model fail with ``MemoryError`` in the child instead of
  getting the agent killed, and a wall-clock bound per round;
- the agent can pause it (``SIGSTOP``) while the device is busy with other
  work and resume it (``SIGCONT``) when it is not, and stop it (``SIGKILL``)
  when the device becomes unsafe to train on (unplugged, too hot, out of
  memory...), then tell the coordinator why;
- its CPU time is known apart from the agent's own, so the policy's CPU
  load excludes the agent's training and the agent can report its own
  overhead.

BLAS thread counts are fixed before numpy loads (``fedge agent`` sets
``OMP_NUM_THREADS`` and friends from ``[limits] threads``); in the child,
torch's own count is set if torch is loaded. The result comes back through a
pipe (pickled numpy arrays: a local pipe between two processes of the same
program, never network input).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import logging
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Generic, TypeVar

from fedge.agent.monitor import Monitor
from fedge.agent.policy import Policy, Verdict, verdict
from fedge.errors import ConfigError, TaskError

__all__ = ["LIMIT_KEYS", "Limits", "TrainStats", "Trainer", "TrainingStopped", "parse_limits"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

LIMIT_KEYS = ("threads", "nice", "io_idle", "memory_mb", "max_train_s", "check_every_s")

# ioprio_set(2): syscall numbers by machine, the idle class and "this process".
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "armv7l": 314, "riscv64": 30, "i686": 289}
_IOPRIO_CLASS_IDLE, _IOPRIO_WHO_PROCESS = 3, 1


@dataclass(frozen=True)
class Limits:
    """``[limits]`` of the agent's config.

    Attributes:
        threads: BLAS/OpenMP/torch threads for training (``None``: the libraries' default).
        nice: the training child's nice value, 0-19 (``None``: the agent's own).
        io_idle: put the training child in the idle I/O scheduling class.
        memory_mb: the training child's address-space cap (``RLIMIT_AS``), MiB.
        max_train_s: the most wall-clock seconds one round's training may take, pauses included.
        check_every_s: how often the policy is checked during training.
    """

    threads: int | None = None
    nice: int | None = None
    io_idle: bool = False
    memory_mb: float | None = None
    max_train_s: float | None = None
    check_every_s: float = 1.0


def parse_limits(table: Mapping[str, Any], *, source: str = "[limits]") -> Limits:
    """Check a ``[limits]`` table.

    Raises:
        ConfigError: an unknown key, or a bad value (named with the key).
    """
    for key in table:
        if key not in LIMIT_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r}; known: {', '.join(LIMIT_KEYS)}")
    values: dict[str, Any] = {}
    for key, low, high in (("threads", 1, 1024), ("nice", 0, 19)):
        if key in table:
            v = table[key]  # an int checked just below
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ConfigError(f"{source}: {key} must be an integer between {low} and {high}, got {v!r}")
            values[key] = v
    if "io_idle" in table:
        if not isinstance(table["io_idle"], bool):
            raise ConfigError(f"{source}: io_idle must be true or false, got {table['io_idle']!r}")
        values["io_idle"] = table["io_idle"]
    for key, minimum in (("memory_mb", 64.0), ("max_train_s", 1.0), ("check_every_s", 0.05)):
        if key in table:
            x = table[key]
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x < minimum:
                raise ConfigError(f"{source}: {key} must be a number >= {minimum:g}, got {x!r}")
            values[key] = float(x)
    return Limits(**values)


class TrainingStopped(Exception):  # noqa: N818 - a stop, not an error of the task
    """Training was stopped by the policy or a limit; ``reasons`` say why (sent to the coordinator)."""

    def __init__(self, reasons: tuple[str, ...]) -> None:
        self.reasons = reasons
        super().__init__("; ".join(reasons))


@dataclass(frozen=True)
class TrainStats:
    """How one round's training went."""

    wall_s: float
    cpu_s: float
    paused_s: float
    pauses: int
    peak_rss_mb: float | None

    def to_json(self) -> dict[str, float | int | None]:
        return {"wall_s": round(self.wall_s, 4), "cpu_s": round(self.cpu_s, 4),
                "paused_s": round(self.paused_s, 4), "pauses": self.pauses,
                "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1)}


@dataclass
class _Outcome(Generic[T]):
    value: T | None
    error: str | None
    cpu_s: float
    peak_rss_mb: float


class Trainer:
    """Runs one round's training function under :class:`Limits`, watched by a :class:`Policy`."""

    def __init__(
        self,
        limits: Limits,
        policy: Policy,
        monitor: Monitor,
        *,
        rounds_today: Callable[[], int] = lambda: 0,
        local_now: Callable[[], dt.datetime] = dt.datetime.now,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.policy = policy
        self.monitor = monitor
        self._rounds_today = rounds_today
        self._local_now = local_now
        self._clock = clock
        self._child: int | None = None
        self._ctx = mp.get_context("fork")

    def child_cpu_s(self) -> float:
        """CPU seconds the running training child has used (0 when none runs)."""
        return _cpu_of(self._child) if self._child is not None else 0.0

    def check(self) -> Verdict:
        """The policy's verdict now."""
        return verdict(self.policy, self.monitor.read(), now=self._local_now(),
                       rounds_today=self._rounds_today())

    def run(self, fn: Callable[[], T], *, max_s: float | None = None, what: str = "training"
            ) -> tuple[T, TrainStats]:
        """Run ``fn`` in a training child and return its value.

        ``max_s`` bounds this run's wall-clock time (the round's deadline),
        besides ``max_train_s``.

        Raises:
            TrainingStopped: the policy turned unsafe, ``max_train_s`` or ``max_s`` passed.
            TaskError: ``fn`` raised (its type and message, from the child),
                or the child died (killed by the kernel, out of memory).
        """
        parent, child = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_child_main, args=(child, fn, self.limits, what), daemon=True,
                                 name="fedge-train")
        t0 = self._clock()
        proc.start()
        child.close()
        pid = proc.pid
        assert pid is not None  # started
        self._child = pid
        paused_since: float | None = None
        paused_s, pauses = 0.0, 0
        last_cpu = 0.0
        try:
            while True:
                if parent.poll(self.limits.check_every_s):
                    outcome: _Outcome[T] = parent.recv()
                    break
                if not proc.is_alive():
                    raise TaskError(_death(proc.exitcode, self.limits))
                last_cpu = _cpu_of(pid) or last_cpu
                elapsed = self._clock() - t0
                if self.limits.max_train_s is not None and elapsed > self.limits.max_train_s:
                    limit = self.limits.max_train_s
                    raise TrainingStopped((f"training took more than max_train_s {limit:g} s",))
                if max_s is not None and elapsed > max_s:
                    raise TrainingStopped(("training would miss the round's deadline",))
                v = self.check()
                if not v.ok and not v.pause:
                    raise TrainingStopped(v.reasons)
                if v.pause and paused_since is None:
                    os.kill(pid, signal.SIGSTOP)
                    paused_since, pauses = self._clock(), pauses + 1
                    logger.info("training paused: %s", "; ".join(v.reasons))
                elif v.ok and paused_since is not None:
                    os.kill(pid, signal.SIGCONT)
                    paused_s += self._clock() - paused_since
                    paused_since = None
                    logger.info("training resumed")
        except (EOFError, OSError):
            raise TaskError(_death(proc.exitcode, self.limits)) from None
        finally:
            self._child = None
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    os.kill(pid, signal.SIGCONT)
            proc.join(timeout=5)
            parent.close()
        if paused_since is not None:
            paused_s += self._clock() - paused_since
        if outcome.error is not None:
            raise TaskError(outcome.error)
        stats = TrainStats(wall_s=self._clock() - t0, cpu_s=outcome.cpu_s or last_cpu,
                           paused_s=paused_s, pauses=pauses, peak_rss_mb=outcome.peak_rss_mb)
        return outcome.value, stats  # type: ignore[return-value]


def _child_main(conn: Connection, fn: Callable[[], Any], limits: Limits, what: str) -> None:
    """The training child: apply the limits, run ``fn``, send back an :class:`_Outcome`."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the agent's to handle
    try:
        _apply_limits(limits)
        value, error = fn(), None
    except MemoryError:
        cap = f" under the memory_mb cap of {limits.memory_mb:g} MiB" if limits.memory_mb else ""
        value, error = None, f"{what} ran out of memory{cap}"
    except Exception as e:
        logger.debug("training failed:\n%s", traceback.format_exc())
        value, error = None, f"{what} raised {type(e).__name__}: {e}"
    t = os.times()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    try:
        conn.send(_Outcome(value, error, t.user + t.system, peak))
    except (OSError, ValueError):
        pass
    finally:
        conn.close()
    os._exit(0)  # no atexit handlers of the agent run in the child


def _apply_limits(limits: Limits) -> None:
    if limits.nice is not None:
        os.nice(max(0, limits.nice - os.nice(0)))
    if limits.io_idle:
        _set_idle_io()
    if limits.memory_mb is not None:
        cap = int(limits.memory_mb * 1024 * 1024)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if limits.threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(limits.threads)


def _set_idle_io() -> None:
    number = _IOPRIO_SET.get(platform.machine())
    if number is None:
        logger.warning("idle I/O priority is not known on %s; left as it is", platform.machine())
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, _IOPRIO_CLASS_IDLE << 13) != 0:
        logger.warning("could not set the idle I/O class: %s", os.strerror(ctypes.get_errno()))


def _cpu_of(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` from ``/proc/PID/stat`` (0 if gone)."""
    if pid is None:
        return 0.0
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _death(exitcode: int | None, limits: Limits) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (the kernel's OOM killer, or a cgroup memory limit)" if exitcode == -signal.SIGKILL else ""
        cap = f"; memory_mb is {limits.memory_mb:g}" if limits.memory_mb else ""
        return f"the training process was killed by {name}{hint}{cap}"
    return f"the training process exited with status {exitcode} without a result"


def agent_overhead() -> dict[str, float]:
    """The agent's own CPU seconds (training children excluded) and resident memory, MiB."""
    t = os.times()
    rss = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024.0
    return {"cpu_s": round(t.user + t.system, 3), "rss_mb": round(rss, 1)}


def cgroup_memory_limit_mb(root: Path = Path("/")) -> float | None:
    """The memory limit of this process's cgroup (systemd's ``MemoryMax``), MiB; ``None`` if unlimited."""
    try:
        lines = (root / "proc" / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            f = root / "sys" / "fs" / "cgroup" / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            f = root / "sys" / "fs" / "cgroup" / "memory" / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        with contextlib.suppress(OSError, ValueError):
            text = f.read_text().strip()
            if text == "max":
                return None
            limit = int(text)
            if limit < 1 << 60:  # v1 writes a huge number for "no limit"
                return limit / (1024.0 * 1024.0)
    return None
