"""Real ``fedge`` processes for the end-to-end tests: start them, watch them, always stop them.

Every process runs the installed ``fedge`` console script in its own session
(so a test can signal it, and teardown can kill its whole process group),
with stdout and stderr in one log file per process. :class:`Processes` keeps
them all and kills whatever still runs when the test ends, pass or fail.
:class:`CoordinatorHandle` polls ``/v1/status``; every wait has a timeout and
fails with the tail of every log, so a failure says what the processes saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

#: The console script of the package under test, next to this interpreter.
FEDGE = str(Path(sys.executable).with_name("fedge"))

_POLL_S = 0.05
_TAIL_LINES = 25
# One BLAS thread per process: several processes share two cores.
_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


class LowPorts:
    """Ports below the ephemeral range, from a block of this process's own, each checked free.

    The block's start follows the process id, so two test runs at once use
    different blocks; a port something listens on is skipped. A port picked by
    binding port 0 is in the ephemeral range, where the kernel may hand it to
    another connection before the child process that was told it binds it
    (seen with Ray's many processes); ports below that range are not handed out.
    """

    BLOCK = 1000

    def __init__(self) -> None:
        top = _ephemeral_low()
        blocks = (top - 10000) // self.BLOCK
        self._next = 10000 + (os.getpid() % blocks) * self.BLOCK
        self._end = self._next + self.BLOCK

    def take(self, count: int = 1) -> int:
        """The first of ``count`` consecutive free ports."""
        while self._next + count <= self._end:
            first, self._next = self._next, self._next + count
            if all(_bindable(p) for p in range(first, first + count)):
                return first
        raise RuntimeError("no free ports left in this test's block")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


#: This test process's ports (one block: the tests and fixtures that pick ports share it).
PORTS = LowPorts()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the ephemeral range."""
    return PORTS.take()


def child_env() -> dict[str, str]:
    return {**os.environ, **_ENV}


def tail(path: Path, lines: int = _TAIL_LINES) -> str:
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def pids_mentioning(marker: str) -> list[int]:
    """Live processes (not zombies, not this one) whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def toml_config(tables: Mapping[str, Mapping[str, object]]) -> str:
    """TOML text for ``{table: {key: value}}`` (numbers, booleans and strings only)."""
    out: list[str] = []
    for table, entries in tables.items():
        out.append(f"[{table}]")
        for key, value in entries.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float):
                text = repr(value)
            else:
                text = json.dumps(str(value))  # a TOML basic string
            out.append(f"{key} = {text}")
        out.append("")
    return "\n".join(out)


@dataclass(frozen=True)
class DigitsFiles:
    """Each device's share of the digits as ``.npz``, and the test split for central evaluation."""

    devices: list[Path]
    test: Path


@dataclass
class Proc:
    """One started process and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, signum: int) -> None:
        """Send ``signum`` to the process alone (not its group)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signum)

    def wait(self, timeout_s: float, *, context: str = "") -> int:
        """Its exit status, waiting at most ``timeout_s``; fails with its log if it runs on."""
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still runs after {timeout_s} s{context}\n--- {self.name} log:\n{tail(self.log)}"
            ) from None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill_group(self) -> None:
        """SIGKILL the process's whole session group and reap the process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait()


class Processes:
    """The processes one test started; :meth:`close` kills every one still running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log_dir = root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def start(self, name: str, *args: str, cwd: Path | None = None) -> Proc:
        if any(p.name == name for p in self.procs):
            raise ValueError(f"a process named {name!r} was started already (the name picks its log file)")
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as f:
            popen = subprocess.Popen(
                [FEDGE, *args],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=child_env(),
                cwd=cwd or self.root,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def agent(self, name: str, url: str, data: Path, *extra: str) -> Proc:
        """``fedge agent`` with device id ``name`` and its own state directory."""
        return self.start(
            name,
            "agent",
            "--coordinator",
            url,
            "--data",
            str(data),
            "--state-dir",
            str(self.root / "state" / name),
            "--device-id",
            name,
            *(() if url.startswith("https://") else ("--insecure",)),
            *extra,
        )

    def logs(self) -> str:
        """The tail of every log, for an assertion message."""
        return "\n".join(
            f"--- {p.name} (pid {p.pid}, {'running' if p.alive() else f'exit {p.popen.returncode}'}):\n"
            f"{tail(p.log)}"
            for p in self.procs
        )

    def close(self) -> None:
        """Kill every process started here, and any process they left that names the test's folder."""
        for p in self.procs:
            p.kill_group()
        # Children in sessions of their own (the demo's) escape the group kill; every
        # process of a test names its folder in its arguments.
        for pid in pids_mentioning(f"{self.root}{os.sep}"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class CoordinatorHandle:
    """A running ``fedge coordinator`` and an HTTP client to it."""

    def __init__(self, procs: Processes, proc: Proc, url: str, client: httpx.Client) -> None:
        self.procs = procs
        self.proc = proc
        self.url = url
        self.client = client

    def status(self) -> dict[str, Any] | None:
        """``/v1/status``, or ``None`` while the coordinator does not answer."""
        try:
            r = self.client.get(f"{self.url}/v1/status", timeout=5.0)
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None  # type: ignore[no-any-return]

    def wait_for(
        self, what: str, cond: Callable[[dict[str, Any]], bool], *, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Poll ``/v1/status`` until ``cond`` holds; fail with every log if it does not in time."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None:
                last = status
                if cond(status):
                    return status
            if not self.proc.alive():
                raise AssertionError(
                    f"the coordinator exited ({self.proc.popen.returncode}) while waiting for {what}; "
                    f"last status {_brief(last)}\n{self.procs.logs()}"
                )
            time.sleep(_POLL_S)
        raise AssertionError(
            f"not reached in {timeout_s} s: {what}; last status {_brief(last)}\n{self.procs.logs()}"
        )


def _brief(status: dict[str, Any] | None) -> str:
    """A status for a failure message: the last three history entries are enough."""
    if status is None:
        return "none (the coordinator never answered)"
    return json.dumps({**status, "history": status["history"][-3:]})


def start_coordinator(
    procs: Processes,
    client: httpx.Client,
    config: Path,
    port: int,
    *extra: str,
    name: str = "coordinator",
    timeout_s: float = 30.0,
) -> CoordinatorHandle:
    """Start ``fedge coordinator --config config`` and wait until ``/healthz`` answers."""
    proc = procs.start(name, "coordinator", "--config", str(config), *extra)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(
                f"the coordinator exited at startup ({proc.popen.returncode})\n{procs.logs()}"
            )
        with contextlib.suppress(httpx.TransportError):
            if client.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return CoordinatorHandle(procs, proc, url, client)
        time.sleep(_POLL_S)
    raise AssertionError(f"the coordinator did not answer /healthz in {timeout_s} s\n{procs.logs()}")


def coordinator_config(
    path: Path,
    *,
    eval_data: Path,
    data_dir: Path,
    port: int,
    rounds: int,
    cohort_size: int,
    deadline_s: float,
    wait_s: float = 0.25,
    **more: float,
) -> Path:
    """Write a logreg/FedAvg ``coordinator.toml``; ``more`` holds other ``[rounds]`` keys
    (``min_updates``, ``min_devices``...) and ``max_body_mb``."""
    server: dict[str, object] = {"host": "127.0.0.1", "port": port, "data_dir": str(data_dir)}
    if "max_body_mb" in more:
        server["max_body_mb"] = more.pop("max_body_mb")
    path.write_text(
        toml_config(
            {
                "task": {"name": "logreg", "eval_data": str(eval_data)},
                "strategy": {"name": "fedavg"},
                "rounds": {
                    "count": rounds,
                    "cohort_size": cohort_size,
                    "deadline_s": deadline_s,
                    "wait_s": wait_s,
                    **more,
                },
                "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.1},
                "server": server,
                # These tests exercise the protocol over plain HTTP; mutual TLS
                # has its own tests (test_tls.py).
                "security": {"insecure": True},
            }
        )
    )
    return path
