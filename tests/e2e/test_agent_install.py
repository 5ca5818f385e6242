"""The agent installs and runs with the ``agent`` extra alone: no torch, FastAPI or matplotlib.

DESIGN.md, "Dependencies": the agent must install and run without torch,
FastAPI or matplotlib (small devices). This builds a fresh virtual environment,
``pip install``s fedge with ``[agent]`` into it (a real, non-editable install,
from a copy of the working tree so that the build leaves nothing in the
checkout), and checks that:

* none of the heavy distributions came with it;
* ``fedge agent --help`` answers;
* an agent run from that environment, against a coordinator run from the
  test's own environment, trains both rounds of a tiny federation and exits 0
  when the coordinator says "done", without having imported any heavy module
  (an ``atexit`` hook in a wrapper around ``fedge.cli`` reports ``sys.modules``).

pip needs the package index (or a wheel cache) to fetch numpy, pydantic,
cryptography and the rest; when it cannot, the tests fail, saying so: they
never skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FEDGE = Path(sys.executable).with_name("fedge")  # the dev environment's, for the coordinator
HEAVY_DISTRIBUTIONS = {"torch", "fastapi", "starlette", "uvicorn", "matplotlib", "scikit-learn"}
HEAVY_MODULES = ("torch", "fastapi", "starlette", "uvicorn", "matplotlib", "sklearn")
MARK = "FEDGE_TEST_MODULES "

# ``python -c WRAPPER agent ...`` runs the ``fedge`` CLI (sys.argv[1:] are its
# arguments) and, at exit, prints the heavy modules the process had imported.
WRAPPER = f"""
import atexit, runpy, sys

def _report():
    import json
    heavy = {HEAVY_MODULES!r}
    print({MARK!r} + json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in heavy)),
          file=sys.stderr, flush=True)

atexit.register(_report)
runpy.run_module("fedge.cli", run_name="__main__", alter_sys=True)
"""


def _env() -> dict[str, str]:
    """The environment for the agent's venv: nothing leaks in through PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    return env


def _copy_source(dst: Path) -> Path:
    """The checkout without its VCS data, caches, build outputs and virtual environments."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(folder) == ROOT:
            skipped |= {n for n in names if n.startswith(".") or n in {"build", "dist", "runs"}}
            skipped |= {n for n in names if (ROOT / n / "pyvenv.cfg").exists()}
        return skipped

    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding ``fedge[agent]`` and nothing else; returns its ``bin`` folder."""
    base = tmp_path_factory.mktemp("agent-install")
    source = _copy_source(base / "fedge-src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    # A new venv's setuptools is older than pyproject's build requirement
    # (setuptools>=77), so pip builds in its usual isolated environment.
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{source}[agent]"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(cmd)}` took more than 900 s: is the package index reachable?")
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode}. Installing the agent extra "
            f"needs the package index (or a wheel cache) for numpy, safetensors, httpx, psutil, "
            f"cryptography, zstandard and pydantic; check network access to it.\n"
            f"{(proc.stdout + proc.stderr)[-4000:]}"
        )
    return venv / "bin"


def test_agent_extra_brings_no_heavy_package(agent_venv: Path) -> None:
    out = subprocess.run(
        [str(agent_venv / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, env=_env(), check=True, timeout=120,
    ).stdout
    installed = {d["name"].lower().replace("_", "-"): d for d in json.loads(out)}
    assert not HEAVY_DISTRIBUTIONS & installed.keys(), sorted(HEAVY_DISTRIBUTIONS & installed.keys())
    assert {"fedge", "numpy", "safetensors", "httpx", "psutil", "cryptography", "zstandard",
            "pydantic"} <= installed.keys()
    assert "editable_project_location" not in installed["fedge"]
    where = subprocess.run(
        [str(agent_venv / "python"), "-c", "import fedge; print(fedge.__file__)"],
        capture_output=True, text=True, env=_env(), cwd=agent_venv, check=True, timeout=60,
    ).stdout.strip()
    assert Path(where).is_relative_to(agent_venv.parent), where  # the installed copy, not the checkout


def test_agent_help_runs(agent_venv: Path) -> None:
    proc = subprocess.run(
        [str(agent_venv / "fedge"), "agent", "--help"],
        capture_output=True, text=True, env=_env(), check=False, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--coordinator" in proc.stdout and "--state-dir" in proc.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _processes() -> Iterator[list[tuple[subprocess.Popen[bytes], IO[bytes]]]]:
    """Started processes and their log files: every one is stopped, and every log closed, on exit."""
    started: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    try:
        yield started
    finally:
        for proc, log in reversed(started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()


def _start(
    started: list[tuple[subprocess.Popen[bytes], IO[bytes]]], args: list[str], log_path: Path, cwd: Path
) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=_env(), cwd=cwd)
    except BaseException:
        log.close()
        raise
    started.append((proc, log))
    return proc


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the coordinator exited with {proc.returncode}:\n{log.read_text()}"
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/healthz", timeout=1.0) as r:
            if r.status == 200:
                return
        time.sleep(0.05)
    pytest.fail(f"the coordinator did not answer /healthz within {timeout_s:.0f} s:\n{log.read_text()}")


def test_agent_only_venv_trains_and_imports_nothing_heavy(agent_venv: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "device.npz"
    np.savez(data, x=rng.standard_normal((120, 64)).astype(np.float32), y=np.arange(120) % 10)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    store = tmp_path / "store"
    config = tmp_path / "coordinator.toml"
    config.write_text(
        "[task]\n"
        'name = "logreg"\n'
        "num_features = 64\n"
        "num_classes = 10\n"
        "[rounds]\n"
        "count = 2\n"
        "cohort_size = 1\n"
        "deadline_s = 60.0\n"
        "wait_s = 0.2\n"
        "[server]\n"
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f"data_dir = {json.dumps(str(store))}\n"
        "[security]\n"
        "insecure = true\n"
    )
    coordinator_log, agent_log = tmp_path / "coordinator.log", tmp_path / "agent.log"
    with _processes() as started:
        coordinator = _start(
            started, [str(FEDGE), "coordinator", "--config", str(config), "--exit-when-done"],
            coordinator_log, tmp_path,
        )
        _wait_healthy(url, coordinator, coordinator_log)
        agent = _start(
            started,
            [str(agent_venv / "python"), "-c", WRAPPER, "agent", "--coordinator", url, "--data", str(data),
             "--state-dir", str(tmp_path / "agent-state"), "--device-id", "install-0", "--insecure"],
            agent_log, tmp_path,
        )
        try:
            agent_rc = agent.wait(60)
            coordinator_rc = coordinator.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the federation did not finish in time.\nagent:\n{agent_log.read_text()[-3000:]}\n"
                        f"coordinator:\n{coordinator_log.read_text()[-3000:]}")
    log = agent_log.read_text(errors="replace")
    assert agent_rc == 0, log
    assert coordinator_rc == 0, coordinator_log.read_text()
    assert "round 1 attempt 1: trained" in log and "round 2 attempt 1: trained" in log, log
    assert (store / "checkpoints" / "round-000002.safetensors").exists(), coordinator_log.read_text()
    reports = [json.loads(line[len(MARK):]) for line in log.splitlines() if line.startswith(MARK)]
    assert len(reports) == 1, log
    assert reports[0] == [], f"the agent imported heavy modules: {reports[0]}"
