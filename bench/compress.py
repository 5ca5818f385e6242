"""Accuracy against bytes up for each update encoding, on digits (issue 10's compression targets).

Every run is ``fedge simulate`` through the Python API with the defaults
(digits, 20 devices, Dirichlet 0.5, every device every round, 30 rounds of
FedAvg) and one ``--compress`` setting; the same seeds for every setting, so
accuracy differences are paired. Bytes are the simulator's measured wire
payloads (safetensors + zstd, as the agent uploads them), not estimates.
"none" is the float32 baseline (zstd included); "% of float32" is a run's
bytes up over that baseline's, same task and seed.

    .venv/bin/python bench/compress.py [--tasks logreg,mlp] [--seeds 0,1,2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import machine
from fedge.sim import simulate

SETTINGS = ["none", "fp16", "q8", "q4", "topk:0.01"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", default="logreg,mlp")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--compress", default=",".join(SETTINGS), help="settings to compare (none first)")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    settings = a.compress.split(",")
    if settings[0] != "none":
        ap.error("the first setting must be none (the float32 baseline)")
    print(f"machine: {machine()}")
    print(f"rounds {a.rounds}, seeds {seeds}")
    print("| task (params) | --compress | bytes up per run (mean) | % of float32 (range over seeds) "
          "| accuracy mean (per seed) | accuracy lost vs none, points (mean; worst seed) | s/run |")
    print("|---|---|---|---|---|---|---|")
    for task in a.tasks.split(","):
        base: dict[int, tuple[int, float]] = {}
        for compress in settings:
            ups, accs, ratios, lost, walls = [], [], [], [], []
            for seed in seeds:
                t0 = time.perf_counter()
                r = simulate(task=task, rounds=a.rounds, seed=seed, compress=compress)
                walls.append(time.perf_counter() - t0)
                s = r.summary()
                up, acc = int(s["bytes_up"]), float(s["accuracy"])
                if compress == "none":
                    base[seed] = (up, acc)
                    params = s["params"]
                ups.append(up)
                accs.append(acc)
                ratios.append(100 * up / base[seed][0])
                lost.append(100 * (base[seed][1] - acc))
            per_seed = " ".join(f"{x:.4f}" for x in accs)
            print(
                f"| {task} ({params:,}) | {compress} | {statistics.mean(ups):,.0f} "
                f"| {statistics.mean(ratios):.1f} ({min(ratios):.1f}-{max(ratios):.1f}) "
                f"| {statistics.mean(accs):.4f} ({per_seed}) "
                f"| {statistics.mean(lost):+.2f}; {max(lost):+.2f} | {statistics.mean(walls):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
