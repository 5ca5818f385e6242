"""The fault schedule of a lab run: when each fault is due, and the host-side work of the faults
that need more than one command (filling a disk, taking memory inside a container).

A fault ``at_round = N`` fires once the lab sees round N running (so it lands mid-round);
``at_s = T`` fires T seconds after the agents were started. The runner polls the coordinator's
status, asks :func:`due` which faults to fire now and :func:`poll_interval` how soon to look
again: rounds can last less than a second, so while a round fault is close the lab polls
every 50 ms, which :func:`due` still cannot make exact; a fault first seen late fires late,
and its ``round_at_fire`` says so.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.lab.spec import FaultSpec

__all__ = ["FAST_POLL_S", "FILL_FILE", "POLL_S", "Fault", "due", "fill_disk", "memory_hog", "poll_interval"]

POLL_S = 1.0
FAST_POLL_S = 0.05
#: The file a fill-disk fault writes into the device's disk (removed when the fault ends).
FILL_FILE = ".lab-fill"


@dataclass
class Fault:
    """A fault of the spec and what became of it in this run."""

    spec: FaultSpec
    fired_unix: float | None = None
    round_at_fire: int | None = None
    undo_at: float | None = None
    undo: Callable[[], None] | None = None
    undone_unix: float | None = None
    outcome: str = "not fired"
    targets: list[str] = field(default_factory=list)


def due(faults: Sequence[Fault], status: Mapping[str, Any] | None, *, agents_started: float | None,
        now: float) -> list[Fault]:
    """The faults to fire now, marked fired (time and the round then running or next)."""
    running = int(status["open"]["round"]) if status is not None and status.get("open") else None
    fire = []
    for f in faults:
        s = f.spec
        if f.fired_unix is not None:
            continue
        by_time = s.at_s is not None and agents_started is not None and now - agents_started >= s.at_s
        by_round = s.at_round is not None and running is not None and running >= s.at_round
        if by_time or by_round:
            f.fired_unix = now
            f.round_at_fire = running if running is not None else (
                None if status is None else int(status["rounds_complete"]) + 1)
            fire.append(f)
    return fire


def poll_interval(faults: Sequence[Fault], status: Mapping[str, Any] | None) -> float:
    """How long to wait before the next status poll: short while a round fault is close."""
    if status is None:
        return POLL_S
    next_round = int(status["rounds_complete"]) + 1
    pending = [f.spec.at_round for f in faults if f.fired_unix is None and f.spec.at_round is not None]
    # From the round before on: a round can end and the next open between two slow polls.
    return FAST_POLL_S if any(r <= next_round + 1 for r in pending) else POLL_S


def fill_disk(disk: Path, size: int | None) -> int:
    """Write zeros into ``disk`` (a mounted tmpfs) until ``size`` bytes or until it is full; the
    bytes written."""
    path = disk / FILL_FILE
    free = os.statvfs(disk)
    room = free.f_bavail * free.f_frsize
    take = room if size is None else min(size, room)
    # Unbuffered, so ENOSPC (the disk is full, which is the point) comes from a write, not from close.
    with path.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        chunk = b"\0" * (1 << 20)
        left = take
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
    return path.stat().st_size


def memory_hog(size: int, hold_s: float) -> list[str]:
    """The command, run inside a device's container, that takes ``size`` bytes and holds them.

    It runs in the container's cgroup, so the kernel's OOM killer, not the lab, decides what
    dies when the container's limit is reached: the agent, or the hog.
    """
    code = (f"import time,mmap;m=mmap.mmap(-1,{int(size)});"
            f"[m.__setitem__(i,1) for i in range(0,{int(size)},4096)];time.sleep({float(hold_s)})")
    return ["python3", "-c", code]
