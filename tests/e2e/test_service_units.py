"""The systemd units' command lines, run for real: the agent starts with exactly the
``ExecStart`` of ``fedge-agent.service`` (its flags and its config path, /etc/fedge/agent.toml)
and trains over mutual TLS with a test coordinator; ``fedge healthcheck`` sees both services."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from deploy_tools import DEPLOY, need_root, tool
from fedge_processes import FEDGE, DigitsFiles, Processes, child_env, free_port, toml_config

pytestmark = pytest.mark.slow


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDGE, *args], capture_output=True, text=True, env=child_env(), timeout=60,
                          check=False)


def exec_start(unit: str) -> list[str]:
    lines = (DEPLOY / "systemd" / unit).read_text().splitlines()
    (line,) = [ln for ln in lines if ln.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


@contextlib.contextmanager
def etc_fedge_mount_point() -> Iterator[Path]:
    """/etc/fedge as a mount point (made if missing, removed again); the host's copy is never written."""
    path = Path("/etc/fedge")
    made = not path.exists()
    if made:
        path.mkdir()
    try:
        yield path
    finally:
        if made:
            path.rmdir()


def test_agent_runs_with_the_units_exec_start(
    tmp_path: Path, procs: Processes, digits: Callable[[int], DigitsFiles]
) -> None:
    need_root("bind-mounting the unit's /etc/fedge in a private mount namespace")
    unshare = tool("unshare", "util-linux")
    argv = exec_start("fedge-agent.service")
    assert argv[0] == "/opt/fedge/bin/fedge"
    config_path = Path(argv[argv.index("--config") + 1])
    assert config_path.parent == Path("/etc/fedge")

    # A coordinator with its CA, over TLS.
    store = tmp_path / "store"
    assert fedge("ca", "init", "--data-dir", str(store)).returncode == 0
    assert fedge("ca", "issue-server", "--data-dir", str(store), "--ip", "127.0.0.1").returncode == 0
    port = free_port()
    files = digits(1)
    coordinator_toml = tmp_path / "coordinator.toml"
    coordinator_toml.write_text(toml_config({
        "task": {"name": "logreg", "eval_data": str(files.test)},
        "rounds": {"count": 20, "cohort_size": 1, "deadline_s": 30.0, "wait_s": 0.25},
        "server": {"host": "127.0.0.1", "port": port, "data_dir": str(store)},
    }))
    coordinator = procs.start("coordinator", "coordinator", "--config", str(coordinator_toml),
                              "--exit-when-done")
    deadline = time.monotonic() + 60
    while fedge("healthcheck", "coordinator", "--config", str(coordinator_toml)).returncode != 0:
        assert coordinator.alive() and time.monotonic() < deadline, procs.logs()
        time.sleep(0.2)

    # The agent's settings where the unit looks for them, in a folder of the test's own.
    token = fedge("token", "create", "--data-dir", str(store), "--device-id", "unit-agent")
    assert token.returncode == 0, token.stderr
    etc = tmp_path / "etc-fedge"
    etc.mkdir()
    (etc / "enrol.token").write_text(token.stdout.strip() + "\n")
    state = tmp_path / "state"
    (etc / config_path.name).write_text(toml_config({}) + "\n".join([
        f'coordinator = "https://127.0.0.1:{port}"',
        f'data = "{files.devices[0]}"',
        f'state_dir = "{state}"',
        'device_id = "unit-agent"',
        f'ca_cert = "{store / "ca" / "ca.crt"}"',
        f'token_file = "{etc / "enrol.token"}"',
    ]) + "\n")
    log = tmp_path / "agent.log"
    with etc_fedge_mount_point() as mount_point, log.open("wb") as out:
        # The unit's command line with only the program's location changed.
        command = [FEDGE, *argv[1:]]
        agent = subprocess.Popen(
            [unshare, "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$1" "$2" && shift 2 && exec "$@"', "-", str(etc), str(mount_point), *command],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not (state / "agent.lock").exists():
                assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            running = fedge("healthcheck", "agent", "--state-dir", str(state))
            status = agent.wait(timeout=120)
        finally:
            if agent.poll() is None:
                os.killpg(agent.pid, 9)
                agent.wait()
    text = log.read_text()
    assert status == 0, text
    assert coordinator.wait(60) == 0, procs.logs()
    # The healthcheck saw the agent while it ran (20 rounds at 0.25 s check-ins outlast the probe).
    assert running.returncode == 0, running.stderr
    assert fedge("healthcheck", "agent", "--state-dir", str(state)).returncode == 1
    # The unit asks for JSON logs: every line is one object with the fields journald users query.
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any("enrolled" in r["message"] for r in records), text
    assert (state / "device.crt").exists()
    # The coordinator's healthcheck tells a stopped coordinator apart.
    assert fedge("healthcheck", "coordinator", "--config", str(coordinator_toml)).returncode == 1
