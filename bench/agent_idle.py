"""An idle device agent: its memory, its CPU and what it imported, while the coordinator says "wait".

Target (agent issue): "An idle agent without torch: RSS <= 60 MB, CPU <= 1%
of one core." DESIGN.md adds that the agent must run without torch, FastAPI
or matplotlib, so those must not be in its import graph.

Starts ``fedge coordinator`` (from this interpreter's environment) as its own
process on a free port, task logistic regression 64 features x 10 classes,
with ``[rounds] min_devices = 1000`` so that no round ever opens and every
check-in is answered "wait ``--wait-s``" (default 5.0 s, the coordinator's
default). Then one real ``fedge agent`` process checks in with it, on a
digits share (``load_federated("digits", partition="iid", num_devices=8,
seed=0).devices[0]``, 180 examples) written to an ``.npz``. After
``--settle`` seconds the agent's ``/proc`` entries are sampled every
``--interval`` seconds over ``--duration`` seconds:

* RSS: ``VmRSS`` at the end of the window (and its min/max over the samples)
  and the peak ``VmHWM`` since the process started (startup included);
* CPU: ``utime + stime`` from ``/proc/PID/stat`` spent during the window,
  divided by the window's wall time (100% = one core busy).

Then the agent is stopped with SIGTERM (it must exit 0). It runs through a
tiny wrapper, ``python -c "<register an atexit hook>; runpy.run_module('fedge.cli')"``,
which at exit prints to stderr which modules the agent process had imported:
the heavy ones (torch, fastapi, starlette, uvicorn, matplotlib, sklearn,
scipy, rich), by full name, and every top-level package. The wrapper costs
``runpy``, which ``python -m`` loads anyway. So the memory, CPU and imports
all come from one process.

The agent runs with this interpreter by default, i.e. the dev environment
where torch, FastAPI and matplotlib are installed (which alone can change
what gets imported: some libraries import optional packages when present).
``--python`` runs it with another interpreter instead, e.g. an agent-only
environment::

    python3 -m venv /tmp/fedge-agent
    /tmp/fedge-agent/bin/pip install "/path/to/fedge[agent]"
    .venv/bin/python bench/agent_idle.py --python /tmp/fedge-agent/bin/python

MB here means MiB (kB from /proc / 1024), as in the other benches.

    .venv/bin/python bench/agent_idle.py [--duration 60] [--settle 5] [--wait-s 5.0] [--python PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

import numpy as np

from _common import FEDGE, machine

FEATURES, CLASSES = 64, 10
TARGET_RSS_MB, TARGET_CPU_PCT = 60.0, 1.0
HEAVY = ("torch", "fastapi", "starlette", "uvicorn", "matplotlib", "sklearn", "scipy", "rich")
MARK = "FEDGE_BENCH_MODULES "

# Run as ``python -c WRAPPER agent --coordinator ...``: sys.argv[1:] are the
# CLI's arguments. json is imported only at exit, so the hook adds nothing to
# what the agent imports while it runs.
WRAPPER = f"""
import atexit, runpy, sys

def _report():
    import json
    heavy = {HEAVY!r}
    names = list(sys.modules)
    print({MARK!r} + json.dumps({{
        "heavy": sorted(m for m in names if m.partition(".")[0] in heavy),
        "top_level": sorted({{m.partition(".")[0] for m in names if not m.startswith("_")}}),
        "count": len(names),
    }}), file=sys.stderr, flush=True)

atexit.register(_report)
runpy.run_module("fedge.cli", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def coordinator_toml(port: int, data_dir: Path, wait_s: float) -> str:
    return f"""
[task]
name = "logreg"
num_features = {FEATURES}
num_classes = {CLASSES}
[rounds]
min_devices = 1000
wait_s = {wait_s}
[server]
host = "127.0.0.1"
port = {port}
data_dir = {json.dumps(str(data_dir))}
[security]
insecure = true
"""


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2.0) as r:
        return json.loads(r.read())


def wait_until(what: str, check: Any, timeout_s: float, procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{str(p.args)[:200]} exited with {p.returncode} "
                                 f"while waiting for {what}")
        with contextlib.suppress(OSError, ValueError):
            value = check()
            if value:
                return value
        time.sleep(0.1)
    raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")


def proc_status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def agent_python_version(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sys, fedge; print(sys.version.split()[0], fedge.__file__)"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{python} cannot import fedge (install fedge[agent] in it):\n{out.stderr}")
    return out.stdout.strip()


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from fedge.data import load_federated

    device = load_federated("digits", partition="iid", num_devices=8, seed=0).devices[0]
    data = tmp / "device.npz"
    np.savez(data, x=device.x, y=device.y)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cfg = tmp / "coordinator.toml"
    cfg.write_text(coordinator_toml(port, tmp / "store", args.wait_s))
    logs: list[IO[bytes]] = []
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the agent sees only what its interpreter has installed
    try:
        logs.append((tmp / "coordinator.log").open("wb"))
        procs.append(subprocess.Popen(
            [FEDGE, "coordinator", "--config", str(cfg)],
            stdin=subprocess.DEVNULL, stdout=logs[-1], stderr=subprocess.STDOUT, env=env,
        ))
        wait_until("the coordinator", lambda: get_json(f"{url}/healthz"), 60.0, procs)
        logs.append((tmp / "agent.log").open("wb"))
        t_start = time.monotonic()
        agent = subprocess.Popen(
            [args.python, "-c", WRAPPER, "agent", "--coordinator", url, "--data", str(data),
             "--state-dir", str(tmp / "agent-state"), "--device-id", "idle-0", "--insecure"],
            stdin=subprocess.DEVNULL, stdout=logs[-1], stderr=subprocess.STDOUT, env=env, cwd=tmp,
        )
        procs.append(agent)
        wait_until("the agent's first check-in", lambda: get_json(f"{url}/v1/status")["devices"] >= 1,
                   60.0, procs)
        first_check_in_s = time.monotonic() - t_start
        time.sleep(args.settle)
        rss_kib: list[int] = []
        cpu0, t0 = cpu_seconds(agent.pid), time.monotonic()
        end = t0 + args.duration
        while (now := time.monotonic()) < end:
            rss_kib.append(proc_status_kib(agent.pid)["VmRSS"])
            time.sleep(min(args.interval, end - now))
        cpu1, t1 = cpu_seconds(agent.pid), time.monotonic()
        last = proc_status_kib(agent.pid)
        status = get_json(f"{url}/v1/status")
        agent_rc = stop(agent)
    finally:
        for p in reversed(procs):
            stop(p)
        for f in logs:
            f.close()
    log = (tmp / "agent.log").read_text(errors="replace")
    modules = [json.loads(line[len(MARK):]) for line in log.splitlines() if line.startswith(MARK)]
    if agent_rc != 0 or not modules:
        found = "found" if modules else "missing"
        raise SystemExit(f"the agent exited with {agent_rc} (module report {found}):\n{log[-3000:]}")
    if status["state"] != "waiting" or status["rounds_complete"] != 0:
        raise SystemExit(f"the coordinator was not idle: {status}")
    wall = t1 - t0
    return {
        "agent_python": args.python,
        "agent_python_fedge": agent_python_version(args.python),
        "wait_s": args.wait_s,
        "settle_s": args.settle,
        "duration_s": wall,
        "samples": len(rss_kib),
        "first_check_in_s": first_check_in_s,
        "rss_mb_end": last["VmRSS"] / 1024,
        "rss_mb_min": min(rss_kib) / 1024,
        "rss_mb_max": max(rss_kib) / 1024,
        "peak_rss_mb": last["VmHWM"] / 1024,
        "cpu_s": cpu1 - cpu0,
        "cpu_pct_one_core": 100.0 * (cpu1 - cpu0) / wall,
        "cpu_tick_s": 1.0 / os.sysconf("SC_CLK_TCK"),  # /proc's CPU-time resolution
        "heavy_modules": modules[0]["heavy"],
        "modules_count": modules[0]["count"],
        "top_level_modules": modules[0]["top_level"],
        "agent_exit_on_sigterm": agent_rc,
    }


def heavy_summary(modules: list[str]) -> str:
    counts: dict[str, int] = {}
    for m in modules:
        top = m.partition(".")[0]
        counts[top] = counts.get(top, 0) + 1
    return ", ".join(f"{top} ({n} modules)" for top, n in sorted(counts.items())) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds sampled (default 60)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the first check-in before sampling (default 5)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples (default 1)")
    parser.add_argument("--wait-s", type=float, default=5.0,
                        help="the coordinator's wait between check-ins (default 5.0, its default)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs the agent (default: this one); fedge[agent] installed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args, Path(tmp))
    result["machine"] = machine()
    print(json.dumps(result, indent=2))
    verdict = "ok" if result["peak_rss_mb"] <= TARGET_RSS_MB else "over"
    print(
        f"idle agent ({args.python}): RSS {result['rss_mb_end']:.1f} MB at end, "
        f"peak {result['peak_rss_mb']:.1f} MB "
        f"(target <= {TARGET_RSS_MB:.0f}: {verdict}); CPU {result['cpu_pct_one_core']:.3f}% of one core "
        f"over {result['duration_s']:.0f} s (target <= {TARGET_CPU_PCT:.0f}%: "
        f"{'ok' if result['cpu_pct_one_core'] <= TARGET_CPU_PCT else 'over'}); heavy modules imported: "
        f"{heavy_summary(result['heavy_modules'])}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
