"""Simulator speed: the default run and the same workload at 100 and 1,000 devices.

Each run is ``fedge simulate`` in a fresh process, timed from outside, so the
figures include interpreter start-up, data loading and the plot. Peak RSS is
the child's. Framework overhead is everything in the round loop except the
task's train and evaluate calls (inline backend), per device per round.

    .venv/bin/python bench/speed.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time

from _common import FEDGE, machine


def one(args: list[str]) -> tuple[float, float, dict[str, float], float]:
    import json
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["/usr/bin/time", "-f", "%M", FEDGE, "simulate", *args, "--out", tmp, "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
        rss_mb = int(proc.stderr.strip().splitlines()[-1]) / 1024
        s = json.loads((Path(tmp) / "summary.json").read_text())
    return wall, rss_mb, s["timing"], s["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"| workload | wall s (median of {a.repeat}) | peak RSS MB "
          "| overhead ms/device/round | accuracy |")
    print("|---|---|---|---|---|")
    for label, args in [
        ("default (20 devices)", []),
        ("100 devices", ["--devices", "100"]),
        ("1,000 devices", ["--devices", "1000"]),
        ("1,000 devices, processes", ["--devices", "1000", "--backend", "processes"]),
        ("mlp, 20 devices", ["--task", "mlp"]),
        # What measuring every payload's bytes (serialize + zstd) costs:
        ("1,000 devices, --count-bytes off", ["--devices", "1000", "--count-bytes", "off"]),
        ("mlp, 20 devices, --count-bytes off", ["--task", "mlp", "--count-bytes", "off"]),
    ]:
        runs = [one(args) for _ in range(a.repeat)]
        wall = statistics.median(r[0] for r in runs)
        rss = max(r[1] for r in runs)
        over = [r[2].get("overhead_ms_per_device_round") for r in runs]
        over_s = f"{statistics.median(over):.3f}" if None not in over else "n/a"
        print(f"| {label} | {wall:.2f} | {rss:.0f} | {over_s} | {runs[0][3]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
