"""Heterogeneity-aware selection against uniform-random selection, in simulated time.

1,000 devices with a 10-fold spread in training speed (lognormal), each
available 12 hours a day (diurnal), a 60 s simulated deadline, 50 devices a
round. For each seed, both selections run the same number of rounds; the
target is the random run's final accuracy, smoothed (the mean of its last
10 rounds' test accuracy, since one round's accuracy is noisy); the report
gives each run's final accuracy, the simulated time each needs to first
reach the target (time-to-accuracy), and how many rounds the slowest tenth
of the fleet took part in (the starvation check). Also the cost of
one monitor reading plus a policy check on this machine.

    .venv/bin/python bench/heterogeneity.py [--seeds 3] [--rounds 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from pathlib import Path
from typing import Any

from _common import machine
from fedge.agent.monitor import Monitor
from fedge.agent.policy import parse_policy, verdict
from fedge.sim.engine import simulate

WORKLOAD: dict[str, Any] = {
    "devices": 1000, "partition": "iid", "cohort": 50, "deadline_s": 60.0,
    "profiles": "lognormal-speed:10:0.1,diurnal:12",
}


def time_to(history: list[Any], target: float) -> float | None:
    for r in history:
        if r.metrics is not None and r.metrics["accuracy"] >= target - 1e-12:
            return float(r.sim_time_s)
    return None


def run(seeds: int, rounds: int) -> None:
    rows = []
    for seed in range(seeds):
        out = {}
        for selection in ("random", "deadline"):
            out[selection] = simulate(rounds=rounds, seed=seed, selection=selection, **WORKLOAD)
        last = [r.metrics["accuracy"] for r in out["random"].history if r.metrics is not None][-10:]
        target = statistics.mean(last)
        for selection, result in out.items():
            s = result.summary()
            rows.append((seed, selection, target, s["accuracy"], time_to(result.history, target),
                         s["simulated_time_s"], s["participation"]["slowest_decile_rounds"],
                         s["participation"]["fastest_decile_rounds"]))
    print("| seed | selection | target | final accuracy | simulated time to the target (s) "
          "| simulated time, all rounds (s) | rounds per device, slowest tenth | fastest tenth |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, sel, target, acc, tta, total, slow, fast in rows:
        reached = "not reached" if tta is None else f"{tta:.0f}"
        print(f"| {seed} | {sel} | {target:.4f} | {acc:.4f} | {reached} | {total:.0f} "
              f"| {slow:.2f} | {fast:.2f} |")
    for sel in ("random", "deadline"):
        tta = [r[4] for r in rows if r[1] == sel and r[4] is not None]
        mean = f"{statistics.mean(tta):.0f} s" if tta else "-"
        print(f"{sel}: mean time-to-target {mean}, reached in {len(tta)} of {seeds} seeds; slowest tenth "
              f"{statistics.mean(r[6] for r in rows if r[1] == sel):.2f} rounds per device")


def policy_cost(n: int = 2000) -> None:
    monitor = Monitor(Path("/"), disk_path=Path("/"))
    policy = parse_policy({"require_ac": True, "max_cpu_load": 0.5, "min_memory_mb": 128,
                           "max_temperature_c": 80, "windows": ["00:00-24:00"]})
    monitor.read()
    t0 = time.perf_counter()
    for _ in range(n):
        verdict(policy, monitor.read(), now=dt.datetime.now(), rounds_today=0)
    print(f"monitor reading + policy check: {1e3 * (time.perf_counter() - t0) / n:.3f} ms (mean of {n})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=100)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"workload: {WORKLOAD}, {a.rounds} rounds")
    policy_cost()
    run(a.seeds, a.rounds)


if __name__ == "__main__":
    main()
