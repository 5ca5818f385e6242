"""``fedge simulate --backend ray`` as a user runs it: a two-node Ray cluster, a local instance, no Ray.

The cluster fixture starts a Ray head (``ray start --head``) and a second node
(``ray start --address ...``) on this machine: two raylets with their own
ports and temp folders, exactly as on two hosts. Each node has one CPU, so
the two workers of the run must land on different nodes. Both ``ray start``
processes run with ``--block`` in their own process groups; the fixture
stops them with SIGTERM (Ray's graceful stop) and then SIGKILLs what is left
of their groups, so it never touches another Ray instance on the machine (a
plain ``ray stop`` would stop every one).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedge_processes import FEDGE, child_env, free_port
from safetensors.numpy import load_file

from fedge.sim.engine import simulate

RAY = str(Path(sys.executable).with_name("ray"))
ATOL = 1e-5


def _node_args(temp_dir: Path, node: int) -> list[str]:
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    # Each node its own range of worker ports (both listen on 127.0.0.1),
    # below Linux's ephemeral range (32768+) that free_port() draws from.
    low = 11000 + (os.getpid() * 7919) % 19000 + node * 1000
    return [
        "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
        "--min-worker-port", str(low), "--max-worker-port", str(low + 200),
        *(x for k, v in ports.items() for x in (k, str(v))),
    ]


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A two-node Ray cluster on 127.0.0.1; yields the head's address."""
    pytest.importorskip("ray")
    # Short paths: Ray's Unix sockets live under the temp folder (108-byte limit).
    top = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))
    env = {**child_env(), "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for node, (name, extra) in enumerate((
            ("head", ["--head", "--port", str(port), "--include-dashboard", "false",
                      "--ray-client-server-port", str(free_port())]),
            ("node", ["--address", address]),
        )):
            log = (top / f"{name}.log").open("wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [RAY, "start", *extra, *_node_args(top / name, node)], stdout=log,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
            ))
            _wait_for(top / f"{name}.log", "Ray runtime started", procs[-1])
        _wait_for_nodes(address, 2, env)
        yield address
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=40)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # whatever the graceful stop left
            p.wait()
        for log in logs:
            log.close()
        subprocess.run(["rm", "-rf", str(top)], check=False)


def _wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"ray start did not report {text!r} in {timeout_s} s")


def _wait_for_nodes(address: str, count: int, env: dict[str, str], timeout_s: float = 60) -> None:
    probe = textwrap.dedent(f"""
        import ray
        ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
        print(sum(1 for n in ray.nodes() if n["Alive"]))
    """)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=env, check=False, timeout=120)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    pytest.fail(f"the Ray cluster at {address} did not reach {count} nodes")


def _simulate(
    args: list[str], out: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDGE, "simulate", *args, "--no-plot", "--quiet", "--out", str(out)],
        capture_output=True, text=True, env=env or child_env(), check=False, timeout=600,
    )


@pytest.mark.slow
def test_simulation_across_two_ray_nodes(ray_cluster: str, tmp_path: Path) -> None:
    args = ["--data", "synthetic:0.5,0.5,40", "--rounds", "3", "--cohort", "12", "--seed", "4"]
    proc = _simulate([*args, "--backend", "ray", "--ray-address", ray_cluster, "--workers", "2"],
                     tmp_path / "ray")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["backend"]["name"] == "ray"
    assert summary["backend"]["workers"] == 2
    assert summary["backend"]["nodes"] == 2  # one worker per raylet
    assert summary["rounds_complete"] == 3
    inline = simulate(data="synthetic:0.5,0.5,40", rounds=3, cohort=12, seed=4)
    model = load_file(str(tmp_path / "ray" / "model.safetensors"))
    assert max(float(np.abs(model[k] - inline.params[k]).max()) for k in model) < ATOL


@pytest.mark.slow
def test_local_ray_instance_from_the_cli(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    proc = _simulate(["--rounds", "2", "--backend", "ray", "--workers", "2"], tmp_path / "run",
                     env={**child_env(), "RAY_AUTH_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["backend"]["name"] == "ray" and summary["backend"]["nodes"] == 1
    assert summary["timing"]["backend_start_s"] > 0


_NO_RAY = textwrap.dedent("""
    # Makes `import ray` fail as it does where Ray is not installed.
    import sys

    class _NoRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoRay())
""")


def test_without_ray_one_line_says_how_to_install_it(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_RAY)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    check = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True,
                           text=True, check=False)
    assert check.returncode != 0 and "No module named 'ray'" in check.stderr
    proc = _simulate(["--rounds", "1", "--backend", "ray"], tmp_path / "out", env=env)
    assert proc.returncode == 2
    assert proc.stderr == (
        "fedge: error: --backend ray needs Ray, which is not installed: pip install 'fedge[ray]'\n"
    )
    assert not (tmp_path / "out").exists()
    # Every other backend, auto included, runs without Ray.
    proc = _simulate(["--rounds", "1", "--backend", "auto"], tmp_path / "auto", env=env)
    assert proc.returncode == 0, proc.stderr
