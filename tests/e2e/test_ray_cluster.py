"""``fedge simulate --backend ray`` as a user runs it: a two-node Ray cluster, a local instance, no Ray.

The cluster fixture starts a Ray head (``ray start --head``) and a second node
(``ray start --address ...``) on this machine: two raylets with their own
ports and temp folders, exactly as on two hosts. Each node has one CPU, so
the two workers of the run must land on different nodes. Both ``ray start``
processes run with ``--block`` in their own process groups; the fixture
stops them with SIGTERM (Ray's graceful stop) and then SIGKILLs what is left
of their groups, so it never touches another Ray instance on the machine (a
plain ``ray stop`` would stop every one).

Ports. This test used to fail now and then on a busy machine, with ``ray
start`` exiting after 30 s: "The current node timed out during startup. This
could happen because some of the raylet failed to startup or the GCS has
become overloaded". The raylet's own log said why: ``bind: Address already
in use`` on a port the fixture had picked with ``free_port()`` (bind to port
0, close, hand the number to Ray). Such a port is in the kernel's ephemeral
range, which the kernel hands out again to anyone who binds port 0 (other
tests' servers) and to outgoing connections; between the pick and Ray's
bind (seconds, more under load) someone else could take it. Reproduced:
holding one connection on such a port gives the same 30 s failure every
time; with listeners on port 0 coming and going beside the test (150 a
second, each held 5 s) and CPU hogs, the old fixture failed 3 of 19 runs
and this one 0 of 13 (under CPU hogs alone the old one passed 12 of 12).
So the fixture now leaves every
port that Ray can bind as port 0 to Ray (the kernel picks it at bind time:
no window), and picks the few that must be known in advance (the head's GCS
port, each node's dashboard-agent HTTP port, which defaults to one fixed
number for every node, and the worker port ranges) below the ephemeral range,
where the kernel never hands out ports on its own, checking each with a bind.
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
from fedge_processes import FEDGE, PORTS, LowPorts, child_env
from safetensors.numpy import load_file

from fedge.sim.engine import simulate

RAY = str(Path(sys.executable).with_name("ray"))
ATOL = 1e-5
#: Ports for each node's worker processes (the driver's among them).
WORKER_PORTS = 100


def _node_args(temp_dir: Path, ports: LowPorts) -> list[str]:
    workers = ports.take(WORKER_PORTS)
    return [
        "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
        "--temp-dir", str(temp_dir), "--disable-usage-stats",
        # Its default is one fixed port for every node, so two nodes on one
        # machine would collide; every other port Ray binds as port 0.
        "--dashboard-agent-listen-port", str(ports.take()),
        "--min-worker-port", str(workers), "--max-worker-port", str(workers + WORKER_PORTS - 1),
    ]


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A two-node Ray cluster on 127.0.0.1; yields the head's address."""
    pytest.importorskip("ray")
    # Short paths: Ray's Unix sockets live under the temp folder (108-byte limit).
    top = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))
    env = {**child_env(), "RAY_AUTH_MODE": "disabled"}
    ports = PORTS
    port = ports.take()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for name, extra in (
            ("head", ["--head", "--port", str(port), "--include-dashboard", "false",
                      "--ray-client-server-port", str(ports.take())]),
            ("node", ["--address", address]),
        ):
            log = (top / f"{name}.log").open("wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [RAY, "start", *extra, *_node_args(top / name, ports)], stdout=log,
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
            pytest.fail(f"ray start exited {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}"
                        f"{_component_errors(log.with_suffix(''))}")
        time.sleep(0.3)
    pytest.fail(f"ray start did not report {text!r} in {timeout_s} s{_component_errors(log.with_suffix(''))}")


def _component_errors(temp_dir: Path) -> str:
    """The last lines of the node's raylet and GCS error logs: why `ray start` gave up.

    `ray start` itself only says that the node "timed out during startup";
    the component that died says what it hit (a port in use, for one).
    """
    out = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
        for path in sorted(temp_dir.glob(f"session_*/logs/{name}")):
            lines = [ln for ln in path.read_text(errors="replace").splitlines()
                     if " E " in ln or " C " in ln or "rror" in ln][-5:]
            if lines:
                out.append(f"--- {path.name}:\n" + "\n".join(ln[:400] for ln in lines))
    return ("\n" + "\n".join(out)) if out else ""


def _wait_for_nodes(address: str, count: int, env: dict[str, str], timeout_s: float = 120) -> None:
    """Wait until the cluster counts ``count`` live nodes, from one driver that asks every second.

    `ray start` returns once its node is registered, so this normally holds at
    the first look; it is the test's own check that the second raylet joined
    this head (not another cluster) before the run relies on it.
    """
    probe = textwrap.dedent(f"""
        import sys, time
        import ray
        ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
        end = time.monotonic() + {timeout_s}
        while True:
            alive = sum(1 for n in ray.nodes() if n["Alive"])
            if alive >= {count} or time.monotonic() > end:
                break
            time.sleep(1)
        print(alive)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env=env, check=False, timeout=timeout_s + 120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the probe driver could not join the Ray cluster at {address} in {timeout_s + 120} s")
    last = out.stdout.strip().splitlines()[-1:]
    if out.returncode != 0 or last != [str(count)]:
        pytest.fail(f"the Ray cluster at {address} did not reach {count} live nodes (saw {last}):\n"
                    f"{out.stderr[-2000:]}")


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
    # A local instance is this run's own: its GCS and raylet are charged their
    # CPU (in clock ticks, so two short rounds may well cost 0.0 of it).
    profile = summary["backend"]["profile"]
    assert profile["rounds"] == 2 and profile["system_cpu_s"] >= 0


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
