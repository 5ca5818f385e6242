"""Simulator memory: peak RSS with 1,000 devices and a ~1.1M-parameter model, all devices every round.

The workload is ``fedge simulate --task mlp:15000 --devices 1000`` on the
bundled digits data: an MLP with 64*15000 + 15000 + 15000*10 + 10 = 1,125,010
float32 parameters (4.5 MB), every device invited every round. Aggregation
streams each device's delta into one running sum, so memory should stay
O(model), not O(model x devices): 1,000 deltas held at once would be 4.5 GB.
Target: peak RSS <= 1 GB.

Each run is ``fedge simulate ... --no-plot --quiet --out TMP`` in a fresh
child process. Its peak RSS comes from ``os.wait4`` (the kernel's ru_maxrss
for that child: the largest single process among it and the workers it
reaped). With ``--backend processes`` the workers' memory adds up, so the
script also samples the summed RSS of the child's whole process tree from
/proc every 50 ms (a sampled peak can miss a short spike). Wall time per
round is ``rounds_s / rounds`` from summary.json, which also gives the params
count. ``fedge simulate`` itself defaults to one BLAS thread (each device's
matmuls are tiny, and BLAS threads cost more than they save) unless the
environment sets OMP/OPENBLAS/MKL_NUM_THREADS; ``--blas-threads N`` sets them
for the child to compare.

    .venv/bin/python bench/memory.py [--rounds 3] [--repeat 3] [--backend processes|both]
    .venv/bin/python bench/memory.py --blas-threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import FEDGE, machine

TARGET_MB = 1024.0
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _tree_rss_kib(root: int) -> int:
    """Summed RSS of ``root`` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid ... rss is field 24.
        fields = stat.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * _PAGE_KIB
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def one(args: list[str], *, sample_tree: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``fedge simulate ARGS`` once; peak RSS (MB), timings and summary."""
    with tempfile.TemporaryDirectory() as tmp:
        err_path = Path(tmp, "stderr.txt")
        out_dir = Path(tmp, "run")
        cmd = [FEDGE, "simulate", *args, "--no-plot", "--quiet", "--out", str(out_dir)]
        t0 = time.perf_counter()
        with err_path.open("w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        tree_peak_kib = 0
        while True:
            # wait4 reaps the child and hands back its own rusage; Popen.wait() would not.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if sample_tree:
                tree_peak_kib = max(tree_peak_kib, _tree_rss_kib(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err_path.read_text()}")
        summary = json.loads((out_dir / "summary.json").read_text())
    t = summary["timing"]
    return {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "tree_peak_mb": tree_peak_kib / 1024 if sample_tree else None,
        "round_s": t["rounds_s"] / summary["rounds"],
        "setup_s": t["setup_s"],
        "overhead_ms": t.get("overhead_ms_per_device_round"),
        "params": summary["params"],
        "devices": summary["devices"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--hidden", type=int, default=15000, help="MLP hidden width (default 15000)")
    ap.add_argument("--backend", choices=["inline", "processes", "both"], default="inline")
    ap.add_argument("--repeat", type=int, default=3, help="runs per backend; medians reported")
    ap.add_argument("--blas-threads", type=int, metavar="N",
                    help="set OPENBLAS_NUM_THREADS/OMP_NUM_THREADS=N for the run (default: inherit)")
    a = ap.parse_args()
    env = None
    if a.blas_threads is not None:
        env = {**os.environ, **dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                              "MKL_NUM_THREADS"), str(a.blas_threads))}
    backends = ["inline", "processes"] if a.backend == "both" else [a.backend]

    print(f"machine: {machine()}")
    print(f"workload: fedge simulate --task mlp:{a.hidden} --devices {a.devices} "
          f"--rounds {a.rounds} (digits, every device every round), "
          f"BLAS threads: {a.blas_threads or 'inherited'}\n")
    print(f"| backend | params | devices | peak RSS MB (max of {a.repeat}) | tree RSS MB (sampled) "
          f"| s/round (median) | overhead ms/device/round | wall s (median) | <= 1 GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for backend in backends:
        args = ["--task", f"mlp:{a.hidden}", "--data", "digits", "--devices", str(a.devices),
                "--rounds", str(a.rounds), "--backend", backend]
        runs = [one(args, sample_tree=backend == "processes", env=env) for _ in range(a.repeat)]
        peak = max(r["peak_rss_mb"] for r in runs)
        trees = [r["tree_peak_mb"] for r in runs if r["tree_peak_mb"] is not None]
        tree = f"{max(trees):.0f}" if trees else "n/a (one process)"
        over = [r["overhead_ms"] for r in runs if r["overhead_ms"] is not None]
        over_s = f"{statistics.median(over):.1f}" if over else "n/a"
        worst = max([peak, *trees])
        print(f"| {backend} | {runs[0]['params']:,} | {runs[0]['devices']} | {peak:.0f} | {tree} "
              f"| {statistics.median(r['round_s'] for r in runs):.2f} | {over_s} "
              f"| {statistics.median(r['wall_s'] for r in runs):.1f} "
              f"| {'yes' if worst <= TARGET_MB else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
