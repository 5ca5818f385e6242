"""Scale-out: the inline, processes and ray backends at 10,000 devices, Ray's start-up, parallel efficiency.

Every run is ``fedge simulate ... --no-plot --quiet --out TMP`` in a fresh
child process, as a user runs it. While it runs, the script samples every
0.25 s, from /proc via psutil:

- the driver's peak RSS (the kernel's high-water mark, VmHWM, of the
  ``fedge`` process itself);
- the whole process tree's memory: the sum of PSS (proportional set size:
  shared pages, such as Ray's object store in /dev/shm, counted once in
  total, not once per process that maps them) over the driver and every
  descendant (worker processes; with a local Ray instance also its GCS,
  raylet and actors). A sampled peak can miss a short spike.

Workloads (``--only NAME`` runs one; default all):

- ``10k``: synthetic:0.5,0.5,10000 (10,000 devices), cohort 1,000, 30 rounds
  of logreg, for inline, processes and ray (2 workers each).
- ``1k``: synthetic:0.5,0.5,1000, every device every round, 30 rounds of
  logreg on ray, wall time including Ray's start-up (target <= 30 s), and the
  driver's peak RSS at cohorts 100 and 1,000 of the same 1,000 devices (the
  driver should not grow with the cohort).
- ``mlp``: an MLP of 64*13000 + 13000 + 13000*10 + 10 = 975,010 parameters
  on digits, 20 devices, 10 rounds of 2 local epochs (evaluation every
  round, the default), ray and processes with 1 and with 2 workers: parallel
  efficiency from the rounds' time (start-up excluded; target >= 1.6x), and
  the same from CPU accounting (``backend.profile`` in summary.json, see
  docs/scale.md, "Where the time goes"), which a busy machine distorts far
  less than wall time. ``--repeat N`` alternates 1 and 2 workers N times.
  After each pair, ``bench/ceiling.py`` runs the workers' own job in two
  plain processes: the speed-up the machine itself gives that work, against
  which the backend's is read.
- ``startup``: a 1-round, 2-device run on each backend: ``backend_start_s``
  from summary.json is the fixed cost of starting its workers.

    .venv/bin/python bench/scale.py [--only 10k|1k|mlp|startup] [--repeat N] [--backend ray|processes]
                                    [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from _common import FEDGE, machine

SAMPLE_S = 0.25


def _tree_pss_mb(root: psutil.Process) -> float:
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total / 2**20


def _hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(args: list[str]) -> dict[str, Any]:
    """One ``fedge simulate`` run: wall time, driver peak RSS, tree peak PSS, summary.json."""
    load_before = _load()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [FEDGE, "simulate", *args, "--no-plot", "--quiet", "--out", tmp]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        root = psutil.Process(proc.pid)
        driver_mb = tree_mb = 0.0
        while proc.poll() is None:
            driver_mb = max(driver_mb, _hwm_mb(proc.pid))
            try:
                tree_mb = max(tree_mb, _tree_pss_mb(root))
            except psutil.NoSuchProcess:
                break
            time.sleep(SAMPLE_S)
        _, err = proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
        summary = json.loads((Path(tmp) / "summary.json").read_text())
    return {
        "args": " ".join(args),
        "wall_s": round(wall, 2),
        "rounds_s": round(summary["timing"]["rounds_s"], 2),
        "backend_start_s": round(summary["timing"].get("backend_start_s", 0.0), 2),
        "driver_peak_mb": round(driver_mb),
        "tree_peak_pss_mb": round(tree_mb),
        "accuracy": summary["accuracy"],
        "backend": summary.get("backend"),
        "load": [load_before, _load()],
    }


def _show(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def bench_10k() -> list[dict[str, Any]]:
    base = ["--data", "synthetic:0.5,0.5,10000", "--cohort", "1000", "--rounds", "30",
            "--task", "logreg", "--workers", "2"]
    rows = []
    for backend in ("inline", "processes", "ray"):
        rows.append(run([*base, "--backend", backend]))
        _show(rows[-1])
    return rows


def bench_1k() -> list[dict[str, Any]]:
    rows = []
    for cohort in ("1000", "100"):
        rows.append(run(["--data", "synthetic:0.5,0.5,1000", "--cohort", cohort, "--rounds", "30",
                         "--task", "logreg", "--backend", "ray", "--workers", "2"]))
        _show(rows[-1])
    return rows


MLP = ["--task", "mlp:13000", "--devices", "20", "--rounds", "10", "--local-epochs", "2"]


def _background_cpu_s(profile: dict[str, Any]) -> float:
    """CPU spent beside the round's own work: Ray's processes, the driver's and workers' other threads."""
    driver = profile["driver_process_cpu_s"] - profile["engine_cpu_s"] - profile["driver_backend_cpu_s"]
    workers = sum((p or 0.0) - r for p, r in
                  zip(profile["worker_process_cpu_s"], profile["worker_run_cpu_s"], strict=True))
    return profile.get("system_cpu_s", 0.0) + max(0.0, driver) + max(0.0, workers)


def _accounting(one: dict[str, Any], two: dict[str, Any]) -> dict[str, float]:
    """The speed-up of 2 workers over 1 from CPU time, and its Amdahl decomposition.

    A round's critical path is the driver's serial work (``serial``: the
    engine between rounds and the backend's own part of run_round, in the
    driver thread's CPU) plus its busiest worker's CPU. With 1 worker all
    the training ``P1`` is on it; with 2 it would be ``P1 / 2`` if the work
    split evenly and each worker ran as fast as alone. Two factors say how
    far from that it is: ``imbalance`` (the busiest worker over the mean)
    and ``contention`` (both workers' CPU over the single worker's: cache
    and memory bandwidth shared, and the machine's other work).
    ``speedup_cpu`` compares the CPU critical paths alone; ``speedup_estimate``
    adds what a quiet machine would still see: the hand-offs' wall time
    (params out, partials back) and, with 2 workers on 2 cores, half the
    background CPU (Ray's processes and threads), which then competes with
    the workers (with 1 worker it has the other core to itself).
    Medians over rounds, times the rounds, resist bursts of other work.
    """
    p1, p2 = one["backend"]["profile"], two["backend"]["profile"]
    m1, m2, n = p1["median_round"], p2["median_round"], p1["rounds"]
    s1, w1 = m1["serial_cpu_s"] * n, m1["critical_worker_cpu_s"] * n
    s2, c2, both = m2["serial_cpu_s"] * n, m2["critical_worker_cpu_s"] * n, m2["worker_cpu_s"] * n
    h1, h2 = (m1["start_s"] + m1["collect_s"]) * n, (m2["start_s"] + m2["collect_s"]) * n
    background = _background_cpu_s(p2)
    serial_fraction = s1 / (s1 + w1)
    quiet_1, quiet_2 = s1 + w1 + h1, s2 + c2 + h2 + background / 2
    return {
        "cpu_path_1_s": round(s1 + w1, 3),
        "cpu_path_2_s": round(s2 + c2, 3),
        "speedup_cpu": round((s1 + w1) / (s2 + c2), 3),
        "estimate_1_s": round(quiet_1, 3),
        "estimate_2_s": round(quiet_2, 3),
        "speedup_estimate": round(quiet_1 / quiet_2, 3),
        "serial_1_s": round(s1, 3),
        "serial_2_s": round(s2, 3),
        "serial_fraction_1": round(serial_fraction, 4),
        "amdahl_bound_2": round(1 / (serial_fraction + (1 - serial_fraction) / 2), 3),
        "imbalance_2": round(c2 / (both / 2), 4),
        "contention_2": round(both / w1, 4),
        # Wall-clock latencies of the round's hand-offs (inflated by load, not CPU).
        "handoff_1_s": round(h1, 3),
        "handoff_2_s": round(h2, 3),
        "background_cpu_2_s": round(background, 3),
    }


def _ceiling() -> dict[str, Any]:
    """bench/ceiling.py: the workers' own job in two plain processes, the machine's speed-up for it."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ceiling.py"))],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench/ceiling.py failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_mlp(repeat: int = 1, backends: tuple[str, ...] = ("ray", "processes")) -> list[dict[str, Any]]:
    rows = []
    for backend in backends:
        for _ in range(repeat):
            pair = []
            for workers in ("1", "2"):
                pair.append(run([*MLP, "--backend", backend, "--workers", workers]))
                _show(pair[-1])
            wall = pair[0]["rounds_s"] / pair[1]["rounds_s"]
            cpu = _accounting(*pair)
            ceiling = _ceiling()
            print(f"{backend}: speed-up, 2 workers over 1: {wall:.2f}x wall (loads "
                  f"{pair[0]['load']} and {pair[1]['load']}), {cpu['speedup_cpu']:.2f}x from CPU "
                  f"critical paths, {cpu['speedup_estimate']:.2f}x estimated for a quiet machine; "
                  f"the same work in two plain processes right after: {ceiling['speedup']:.2f}x, "
                  f"so {backend} reached {wall / ceiling['speedup']:.0%} of it; "
                  f"{json.dumps(cpu)}; ceiling {json.dumps(ceiling)}", flush=True)
            rows.extend({**r, "accounting": cpu, "speedup_wall": round(wall, 3), "ceiling": ceiling}
                        for r in pair)
    return rows


def bench_startup() -> list[dict[str, Any]]:
    rows = []
    for backend in ("inline", "processes", "ray"):
        rows.append(run(["--devices", "2", "--rounds", "1", "--backend", backend, "--workers", "2"]))
        _show(rows[-1])
    return rows


BENCHES = {"startup": bench_startup, "1k": bench_1k, "mlp": bench_mlp, "10k": bench_10k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", choices=sorted(BENCHES))
    parser.add_argument("--json", type=Path, help="also write every row here")
    parser.add_argument("--repeat", type=int, default=1, help="mlp: pairs of runs per backend")
    parser.add_argument("--backend", choices=("ray", "processes"), help="mlp: this backend only")
    opts = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    results = {}
    for name, fn in BENCHES.items():
        if opts.only in (None, name):
            print(f"== {name}", flush=True)
            if name == "mlp":
                backends = (opts.backend,) if opts.backend else ("ray", "processes")
                results[name] = bench_mlp(opts.repeat, backends)
            else:
                results[name] = fn()
    if opts.json:
        opts.json.write_text(json.dumps({"machine": machine(), **results}, indent=2))


if __name__ == "__main__":
    main()
