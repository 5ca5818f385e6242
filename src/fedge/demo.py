"""``fedge demo``: a real coordinator and real agent processes on 127.0.0.1.

The demo writes each agent its own Dirichlet(0.5) share of the digits to an
``.npz`` file (the device's local data), writes the test split for the
coordinator's central evaluation, starts ``fedge coordinator`` and ``fedge
agent`` as separate processes, shows progress from ``/v1/status`` and, at
the end, writes ``summary.json``, ``metrics.jsonl`` and ``model.safetensors``
like the simulator does. With ``secagg=True`` the coordinator's ``[secagg]``
table is on: every round runs SecAgg+ between the agents (docs/secagg.md)
and the coordinator sees only the sum of their updates. Every child is
stopped on completion, on error and
on Ctrl-C, and dies with the demo even if the demo is killed outright
(``PR_SET_PDEATHSIG``), so nothing is left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from fedge import __version__, pki
from fedge.coordinator.identity import create_token, init_ca, issue_server, tls_files
from fedge.data import load_federated
from fedge.errors import ConfigError, FedgeError
from fedge.store import Store, atomic_write

__all__ = ["DemoResult", "process_cpu_s", "run_demo"]

logger = logging.getLogger(__name__)

_STARTUP_S = 60.0
_POLL_S = 0.25


@dataclass(frozen=True)
class DemoResult:
    """Where the demo's files are, and what it reached."""

    out_dir: Path
    summary: dict[str, Any]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Linux: the child gets SIGTERM when the demo process dies, however it dies.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Children:
    """The demo's processes: started with their logs in files, always stopped."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        self._logs.append(log)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Own session: a Ctrl-C in the terminal reaches the demo only, which
        # then stops the agents before the coordinator, in order.
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - the demo starts no threads
        )
        self.procs[name] = proc
        return proc

    def stop(self, names: list[str], timeout_s: float = 10.0) -> None:
        live = [self.procs[n] for n in names if n in self.procs and self.procs[n].poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        self.stop([n for n in self.procs if n != "coordinator"])
        self.stop(["coordinator"])
        for log in self._logs:
            log.close()

    def tail(self, name: str, lines: int = 5) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return "\n".join(text[-lines:])


def _write_data(out_dir: Path, agents: int, seed: int) -> tuple[list[Path], Path]:
    fed = load_federated("digits", partition="dirichlet:0.5", num_devices=agents, seed=seed)
    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, d in enumerate(fed.devices):
        path = data_dir / f"agent-{i}.npz"
        np.savez(path, x=d.x, y=d.y)
        paths.append(path)
    test = data_dir / "test.npz"
    np.savez(test, x=fed.test.x, y=fed.test.y)
    return paths, test


def _coordinator_toml(
    *, test: Path, port: int, data_dir: Path, agents: int, rounds: int, seed: int, secagg: bool = False
) -> str:
    # Secure aggregation needs at least 3 updates a round (fewer would reveal each other's).
    min_updates = max(3, agents // 2) if secagg else max(1, agents // 2)
    return "\n".join(
        [
            "[task]",
            'name = "logreg"',
            f"eval_data = {json.dumps(str(test))}",
            "",
            "[strategy]",
            'name = "fedavg"',
            "",
            "[rounds]",
            f"count = {rounds}",
            f"cohort_size = {agents}",
            f"min_updates = {min_updates}",
            # Round 1 waits for every agent; later rounds need half of them.
            f"min_devices = {agents}",
            "deadline_s = 60.0",
            "wait_s = 0.25",
            "",
            "[train]",
            "local_epochs = 1",
            "batch_size = 32",
            "lr = 0.1",
            "",
            "[server]",
            'host = "127.0.0.1"',
            f"port = {port}",
            f"data_dir = {json.dumps(str(data_dir))}",
            f"seed = {seed}",
            "",
            *(["[secagg]", "enabled = true", ""] if secagg else []),
        ]
    )


def _get_status(client: Any, url: str) -> dict[str, Any] | None:
    import httpx

    try:
        r = client.get(f"{url}/v1/status", timeout=5.0)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def run_demo(
    *,
    agents: int = 8,
    rounds: int = 20,
    out_dir: Path,
    seed: int = 0,
    secagg: bool = False,
    progress: Any = None,
) -> DemoResult:
    """Run the demo federation to completion; ``progress(status)`` sees each new status.

    Raises:
        ConfigError: a bad argument, or no free port.
        FedgeError: a process failed or training did not finish.
    """
    import httpx

    if agents < 2:
        raise ConfigError(f"--agents must be at least 2, got {agents}")
    if secagg and agents < 3:
        raise ConfigError(f"--secagg needs at least 3 agents (secure aggregation of two reveals each "
                          f"one's update to the other), got {agents}")
    if rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {rounds}")
    t0 = time.perf_counter()
    # Absolute from here on: the coordinator resolves relative paths in its
    # config against the config file's folder, not this working directory.
    out_dir = out_dir.resolve()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    data_paths, test = _write_data(out_dir, agents, seed)
    port = _free_port()
    url = f"https://127.0.0.1:{port}"
    config = out_dir / "coordinator.toml"
    store_dir = out_dir / "coordinator"
    config.write_text(
        _coordinator_toml(test=test, port=port, data_dir=store_dir, agents=agents, rounds=rounds, seed=seed,
                          secagg=secagg)
    )
    # The whole flow an operator follows: a CA, a server certificate, and a
    # one-time token per device, bound to its id; each agent makes its own key.
    _, admin_token = init_ca(store_dir)
    issue_server(store_dir, hosts=["localhost"], ips=["127.0.0.1"])
    tokens = []
    with Store(store_dir) as store:
        for i in range(agents):
            reply = create_token(store, expires_s=3600.0, uses=1, device_id=f"demo-{i}", now=time.time())
            path = out_dir / "agents" / f"agent-{i}.token"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(reply.token + "\n")
            path.chmod(0o600)
            tokens.append(path)
    ca_file = tls_files(store_dir).ca_cert
    context = pki.client_ssl_context(ca_file=ca_file)
    children = _Children(out_dir / "logs")
    statuses: list[dict[str, Any]] = []
    try:
        coordinator = children.start(
            "coordinator", ["coordinator", "--config", str(config), "--exit-when-done"]
        )
        with httpx.Client(verify=context, headers={"authorization": f"Bearer {admin_token}"}) as client:
            _wait_healthy(client, url, coordinator, children)
            cpu_at_start = process_cpu_s(coordinator.pid)
            for i, path in enumerate(data_paths):
                children.start(
                    f"agent-{i}",
                    [
                        "agent",
                        "--coordinator",
                        url,
                        "--data",
                        str(path),
                        "--state-dir",
                        str(out_dir / "agents" / f"agent-{i}"),
                        "--device-id",
                        f"demo-{i}",
                        "--ca-cert",
                        str(ca_file),
                        "--token-file",
                        str(tokens[i]),
                    ],
                )
            t_train = time.perf_counter()
            last: dict[str, Any] | None = None
            while True:
                status = _get_status(client, url)
                if status is not None and status != last:
                    last = status
                    if progress is not None:
                        progress(status)
                    if status["state"] == "done":
                        break
                if coordinator.poll() is not None:
                    raise FedgeError(
                        f"the coordinator exited with status {coordinator.returncode}:\n"
                        f"{children.tail('coordinator')}"
                    )
                if all(p.poll() is not None for n, p in children.procs.items() if n != "coordinator"):
                    raise FedgeError(
                        f"every agent exited before training finished:\n{children.tail('agent-0')}"
                    )
                time.sleep(_POLL_S)
            train_s = time.perf_counter() - t_train
            cpu_at_end = process_cpu_s(coordinator.pid)
            assert last is not None
            statuses.append(last)
        # The coordinator lingers for the agents to hear "done", then exits.
        children.stop([n for n in children.procs if n != "coordinator"], timeout_s=15.0)
        children.stop(["coordinator"], timeout_s=15.0)
    finally:
        children.close()
    cpu_s = None if cpu_at_start is None or cpu_at_end is None else cpu_at_end - cpu_at_start
    summary = _summarize(
        statuses[-1], store_dir, out_dir, agents=agents, train_s=train_s, wall_s=time.perf_counter() - t0,
        secagg=secagg, coordinator_cpu_s=cpu_s,
    )
    return DemoResult(out_dir, summary)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _wait_healthy(client: Any, url: str, coordinator: subprocess.Popen[bytes], children: _Children) -> None:
    import httpx

    deadline = time.monotonic() + _STARTUP_S
    while time.monotonic() < deadline:
        if coordinator.poll() is not None:
            raise FedgeError(
                f"the coordinator exited with status {coordinator.returncode}:\n"
                f"{children.tail('coordinator')}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if client.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise FedgeError(f"the coordinator did not answer within {_STARTUP_S:.0f} s")


def _summarize(
    status: dict[str, Any], store_dir: Path, out_dir: Path, *, agents: int, train_s: float, wall_s: float,
    secagg: bool = False, coordinator_cpu_s: float | None = None,
) -> dict[str, Any]:
    from safetensors.numpy import save

    from fedge.store import Store

    history = status["history"]
    complete = [h for h in history if h["state"] == "complete"]
    with _lines(out_dir / "metrics.jsonl") as write:
        for h in history:
            write(json.dumps(h))
    with Store(store_dir) as store:
        last = store.last_complete_round()
        state = store.load_checkpoint(last)
    atomic_write(
        out_dir / "model.safetensors",
        bytes(save({k: np.ascontiguousarray(v) for k, v in state.params.items()})),
    )
    final = complete[-1] if complete else {}
    overheads = [
        h["duration_s"] - h["train_s"] for h in complete if h.get("duration_s") is not None and "train_s" in h
    ]
    summary = {
        "fedge_version": __version__,
        "accuracy": final.get("accuracy"),
        "loss": final.get("loss"),
        "best_accuracy": max((h["accuracy"] for h in complete if "accuracy" in h), default=None),
        "rounds": status["rounds"],
        "rounds_complete": status["rounds_complete"],
        "attempts": len(history),
        "devices": agents,
        "secagg": secagg,
        "wall_s": round(wall_s, 4),
        "timing": {
            "rounds_s": round(train_s, 4),
            "round_s_mean": round(sum(h["duration_s"] for h in complete) / max(1, len(complete)), 4),
            "protocol_overhead_s_per_round": round(sum(overheads) / len(overheads), 4) if overheads else None,
            # The coordinator process's CPU from its first answer to the last round (startup excluded).
            "coordinator_cpu_s": None if coordinator_cpu_s is None else round(coordinator_cpu_s, 3),
            "coordinator_cpu_s_per_round": None if coordinator_cpu_s is None or not status["rounds_complete"]
            else round(coordinator_cpu_s / status["rounds_complete"], 4),
        },
        # As the coordinator counted them: update bodies in, params payloads out
        # (zstd-compressed, as sent; HTTP and TLS framing not included).
        "bytes_up": int(sum(h.get("bytes_up", 0) for h in history)),
        "bytes_down": int(sum(h.get("bytes_down", 0) for h in history)),
        "refusals": status.get("refusals", {}),
        "files": {
            "metrics": "metrics.jsonl",
            "model": "model.safetensors",
            "summary": "summary.json",
            "store": "coordinator/",
            "logs": "logs/",
        },
    }
    atomic_write(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


@contextlib.contextmanager
def _lines(path: Path) -> Iterator[Any]:
    with path.open("w", encoding="utf-8") as f:
        yield lambda line: f.write(line + "\n")
