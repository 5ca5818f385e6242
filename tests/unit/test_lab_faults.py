"""Tests for fedge.lab.faults: when each fault fires, how soon the lab polls, and the fill faults' work."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedge.lab.faults import FAST_POLL_S, FILL_FILE, POLL_S, Fault, due, fill_disk, memory_hog, poll_interval
from fedge.lab.spec import FaultSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "deploy" / "lab" / "ci.toml"
T0 = 1_700_000_000.0


def fault(**fields: Any) -> Fault:
    return Fault(FaultSpec.model_validate(fields))


def at_round(n: int) -> Fault:
    return fault(action="kill-coordinator", at_round=n)


def at_s(t: float) -> Fault:
    return fault(action="kill-agent", at_s=t, target="pi-0")


def status(rounds_complete: int, open_round: int | None) -> dict[str, Any]:
    """The part of the coordinator's ``/v1/status`` the fault schedule reads."""
    return {"rounds_complete": rounds_complete,
            "open": None if open_round is None else {"round": open_round, "attempt": 1}}


# ------------------------------------------------------------------ due: round faults


def test_round_fault_waits_for_its_round_to_open() -> None:
    f = at_round(3)
    assert due([f], None, agents_started=T0, now=T0 + 1) == []
    assert due([f], status(1, 2), agents_started=T0, now=T0 + 2) == []
    assert due([f], status(2, None), agents_started=T0, now=T0 + 3) == []  # between rounds 2 and 3
    assert f.fired_unix is None and f.round_at_fire is None
    assert due([f], status(2, 3), agents_started=T0, now=T0 + 4) == [f]
    assert (f.fired_unix, f.round_at_fire) == (T0 + 4, 3)


def test_round_fault_seen_late_fires_in_the_later_round_and_says_so() -> None:
    f = at_round(3)
    assert due([f], status(4, 5), agents_started=T0, now=T0 + 9) == [f]
    assert f.round_at_fire == 5


def test_a_fault_never_fires_twice() -> None:
    f = at_round(2)
    assert due([f], status(1, 2), agents_started=T0, now=T0 + 1) == [f]
    assert due([f], status(1, 2), agents_started=T0, now=T0 + 2) == []
    assert due([f], status(2, 3), agents_started=T0, now=T0 + 3) == []
    assert (f.fired_unix, f.round_at_fire) == (T0 + 1, 2)


def test_only_the_faults_due_fire_and_in_spec_order() -> None:
    early, late, later = at_round(2), at_round(4), at_round(2)
    assert due([early, late, later], status(1, 2), agents_started=T0, now=T0 + 1) == [early, later]
    assert late.fired_unix is None


# ------------------------------------------------------------------ due: time faults


def test_time_fault_fires_at_agents_started_plus_at_s_and_not_before() -> None:
    f = at_s(10.0)
    assert due([f], status(0, 1), agents_started=T0, now=T0 + 9.999) == []
    assert f.fired_unix is None
    assert due([f], status(0, 1), agents_started=T0, now=T0 + 10.0) == [f]
    assert (f.fired_unix, f.round_at_fire) == (T0 + 10.0, 1)
    assert due([f], status(0, 1), agents_started=T0, now=T0 + 20.0) == []


def test_time_fault_waits_while_the_agents_have_not_started() -> None:
    f = at_s(0.0)
    assert due([f], status(0, None), agents_started=None, now=T0 + 1000) == []
    assert f.fired_unix is None
    assert due([f], status(0, None), agents_started=T0 + 1000, now=T0 + 1000) == [f]


def test_time_fault_between_rounds_records_the_next_round() -> None:
    f = at_s(5.0)
    assert due([f], status(2, None), agents_started=T0, now=T0 + 5) == [f]
    assert f.round_at_fire == 3


def test_time_fault_without_a_status_records_no_round() -> None:
    f = at_s(5.0)
    assert due([f], None, agents_started=T0, now=T0 + 5) == [f]
    assert (f.fired_unix, f.round_at_fire) == (T0 + 5, None)


def test_the_ci_specs_faults_each_fire_in_their_round() -> None:
    specs = load_spec(CI).faults
    assert specs and all(s.at_round is not None for s in specs)
    faults = [Fault(s) for s in specs]
    fired = []
    for n in range(1, 6):
        fired += [(f.spec.action, f.round_at_fire)
                  for f in due(faults, status(n - 1, n), agents_started=T0, now=T0 + n)]
    assert fired == sorted(((s.action, s.at_round) for s in specs), key=lambda a: a[1])


# ------------------------------------------------------------------ poll_interval


def test_poll_is_slow_without_a_status() -> None:
    assert poll_interval([at_round(1)], None) == POLL_S


def test_poll_is_fast_from_the_round_before_a_round_fault() -> None:
    faults = [at_round(4)]
    assert poll_interval(faults, status(1, 2)) == POLL_S  # round 4 is two rounds past the next (2)
    assert poll_interval(faults, status(2, None)) == FAST_POLL_S  # next is 3: round 4 is one ahead
    assert poll_interval(faults, status(2, 3)) == FAST_POLL_S
    assert poll_interval(faults, status(3, 4)) == FAST_POLL_S


def test_poll_is_slow_once_the_round_fault_fired() -> None:
    f = at_round(2)
    assert poll_interval([f], status(0, 1)) == FAST_POLL_S
    assert due([f], status(1, 2), agents_started=T0, now=T0 + 1) == [f]
    assert poll_interval([f], status(1, 2)) == POLL_S


def test_poll_ignores_time_faults() -> None:
    assert poll_interval([at_s(0.0)], status(0, 1)) == POLL_S
    assert poll_interval([], status(0, 1)) == POLL_S


def test_poll_is_fast_if_any_pending_round_fault_is_close() -> None:
    fired, far, near = at_round(1), at_round(9), at_round(3)
    due([fired], status(0, 1), agents_started=T0, now=T0)
    assert poll_interval([fired, far], status(1, 2)) == POLL_S
    assert poll_interval([fired, far, near], status(1, 2)) == FAST_POLL_S


# ------------------------------------------------------------------ fill_disk


def test_fill_disk_writes_exactly_the_size_given(tmp_path: Path) -> None:
    assert fill_disk(tmp_path, 300_001) == 300_001
    assert (tmp_path / FILL_FILE).read_bytes() == b"\0" * 300_001


def test_fill_disk_of_size_zero_writes_an_empty_file(tmp_path: Path) -> None:
    assert fill_disk(tmp_path, 0) == 0
    assert (tmp_path / FILL_FILE).stat().st_size == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Any:
    """A 1 MiB tmpfs mounted under ``tmp_path`` (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_fill_disk_without_a_size_fills_the_disk(tmpfs: Path) -> None:
    free = os.statvfs(tmpfs)
    room = free.f_bavail * free.f_frsize
    assert room == 2**20
    assert fill_disk(tmpfs, None) == room
    assert os.statvfs(tmpfs).f_bavail == 0
    with pytest.raises(OSError) as e, (tmpfs / "more").open("wb", buffering=0) as f:
        f.write(b"x" * 4096)
    assert e.value.errno == errno.ENOSPC


def test_fill_disk_with_a_size_leaves_the_rest_free(tmpfs: Path) -> None:
    assert fill_disk(tmpfs, 256 * 1024) == 256 * 1024
    free = os.statvfs(tmpfs)
    assert free.f_bavail * free.f_frsize == 768 * 1024


def test_fill_disk_with_a_size_larger_than_the_disk_stops_when_full(tmpfs: Path) -> None:
    assert fill_disk(tmpfs, 4 * 2**20) == 2**20
    assert os.statvfs(tmpfs).f_bavail == 0


# ------------------------------------------------------------------ memory_hog


def test_memory_hog_is_a_python3_command() -> None:
    argv = memory_hog(64 * 1024, 0.0)
    assert argv[:2] == ["python3", "-c"] and len(argv) == 3


def test_memory_hog_runs_and_exits_0() -> None:
    argv = memory_hog(64 * 1024, 0.0)
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()


def test_memory_hog_touches_the_memory_and_holds_it() -> None:
    size = 48 * 2**20
    argv = memory_hog(size, 0.2)
    start = time.monotonic()
    pid = os.posix_spawn(sys.executable, [sys.executable, *argv[1:]], dict(os.environ))
    _, wait_status, usage = os.wait4(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert time.monotonic() - start >= 0.2
    assert usage.ru_maxrss * 1024 >= size  # ru_maxrss is in KiB on Linux: every page was written


def test_memory_hog_quotes_nothing_from_its_arguments() -> None:
    # Only numbers reach the code: int() and float() refuse anything else.
    with pytest.raises(ValueError):
        memory_hog("1; import os", 0.0)  # type: ignore[arg-type]
