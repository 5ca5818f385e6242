"""A real container run: the coordinator and agent images built from offline bundles on a Debian
base made here (no registry is reachable), then a coordinator and two agents as Podman containers
that enrol and train over mutual TLS. Run by ``make test-containers`` (marker ``containers``)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from deploy_tools import DEPLOY, need_root, tool
from fedge_processes import FEDGE, DigitsFiles, child_env, free_port, toml_config

from fedge.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.containers]

BASE = "localhost/fedge-base:bookworm-amd64"
TAG = f"e2e{os.getpid()}"
UID = 10001


def _env() -> dict[str, str]:
    return {**child_env(), "CONTAINERS_CONF": str(DEPLOY / "podman" / "containers.conf"), "FEDGE": FEDGE}


def run(*cmd: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, env=_env(), timeout=timeout,
                            check=False)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, str]]:
    need_root("Podman with the cgroupfs manager and debootstrap")
    podman = tool("podman", "podman")
    tool("runc", "runc")
    if run(podman, "image", "exists", BASE, check=False).returncode != 0:
        tool("debootstrap", "debootstrap")
        run("bash", str(DEPLOY / "podman" / "build-base.sh"), "--arch", "amd64", "--image", BASE)
    run("bash", str(DEPLOY / "container" / "build.sh"), "--base", BASE, "--arch", "amd64", "--tag", TAG)
    built = {role: f"localhost/fedge-{role}:{TAG}-amd64" for role in ("coordinator", "agent")}
    try:
        yield built
    finally:
        run(podman, "rmi", "-f", *built.values(), check=False)


def _fedge(*args: str) -> str:
    return run(FEDGE, *args, timeout=120).stdout


def test_coordinator_and_two_agents_train_over_tls_in_containers(
    images: dict[str, str], tmp_path: Path, digits: Callable[[int], DigitsFiles]
) -> None:
    podman = tool("podman", "podman")
    store, shared = tmp_path / "store", tmp_path / "shared"
    _fedge("ca", "init", "--data-dir", str(store))
    _fedge("ca", "issue-server", "--data-dir", str(store), "--ip", "127.0.0.1")
    files = digits(2)
    (shared / "data").mkdir(parents=True)
    for i, path in enumerate(files.devices):
        (shared / "data" / f"device-{i}.npz").write_bytes(path.read_bytes())
    (shared / "data" / "test.npz").write_bytes(files.test.read_bytes())
    (shared / "ca.crt").write_bytes((store / "ca" / "ca.crt").read_bytes())
    for i in (1, 2):
        token = _fedge("token", "create", "--data-dir", str(store), "--device-id", f"agent-{i}").strip()
        (shared / f"agent-{i}.token").write_text(token + "\n")
    port = free_port()
    rounds = 3
    (tmp_path / "coordinator.toml").write_text(toml_config({
        "task": {"name": "logreg", "eval_data": "/shared/data/test.npz"},
        "rounds": {"count": rounds, "cohort_size": 2, "min_devices": 2, "deadline_s": 60.0, "wait_s": 0.5},
        "server": {"host": "127.0.0.1", "port": port, "data_dir": "/var/lib/fedge"},
    }))
    states = [tmp_path / f"agent-{i}" for i in (1, 2)]
    for folder in (store, shared, *states):
        folder.mkdir(exist_ok=True)
        run("chown", "-R", f"{UID}:{UID}", str(folder))
    names = [f"fedge-e2e-{os.getpid()}-{n}" for n in ("coordinator", "agent-1", "agent-2")]
    try:
        run(podman, "run", "-d", "--name", names[0], "--network", "host",
            "-v", f"{store}:/var/lib/fedge", "-v", f"{shared}:/shared:ro",
            "-v", f"{tmp_path / 'coordinator.toml'}:/etc/fedge/coordinator.toml:ro",
            images["coordinator"], "--config", "/etc/fedge/coordinator.toml", "--exit-when-done")
        # The image's own healthcheck, run by Podman, sees the coordinator come up.
        deadline = time.monotonic() + 90
        while run(podman, "healthcheck", "run", names[0], check=False).returncode != 0:
            assert time.monotonic() < deadline, run(podman, "logs", names[0], check=False).stderr[-3000:]
            time.sleep(1)
        for i, (name, state) in enumerate(zip(names[1:], states, strict=True)):
            run(podman, "run", "-d", "--name", name, "--network", "host",
                "-v", f"{state}:/var/lib/fedge", "-v", f"{shared}:/shared:ro", images["agent"],
                "--coordinator", f"https://127.0.0.1:{port}", "--device-id", f"agent-{i + 1}",
                "--data", f"/shared/data/device-{i}.npz", "--state-dir", "/var/lib/fedge",
                "--ca-cert", "/shared/ca.crt", "--token-file", f"/shared/agent-{i + 1}.token")
        for name in names:
            status = run(podman, "wait", name, timeout=300).stdout.strip()
            logs = run(podman, "logs", name, check=False)
            assert status == "0", f"{name} exited {status}\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
        coordinator_log = run(podman, "logs", names[0]).stderr
        assert f'"training complete: {rounds} rounds"' in coordinator_log
    finally:
        run(podman, "rm", "-f", *names, check=False)
    with Store(store) as s:
        complete = [r for r in s.rounds() if r.state == "complete"]
        assert sorted(r.round for r in complete) == list(range(1, rounds + 1))
        assert {d.device_id for d in s.devices()} == {"agent-1", "agent-2"}
    # Every agent enrolled with its own key, made inside its container and kept in its volume.
    for state in states:
        assert (state / "device.key").stat().st_mode & 0o777 == 0o600
        assert (state / "device.crt").exists()
