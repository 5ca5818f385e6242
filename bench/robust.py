"""Robust aggregation: accuracy under attack, and aggregation speed.

(a) ``--part table``: digits, logistic regression, 20 devices, Dirichlet(0.5)
label skew, every device every round, 30 rounds (the simulator's defaults),
with 20% of devices (4 of 20) sign-flipping their update at scale 10. For
every rule: final central test accuracy with the attack, the same rule
without it, and the gap to clean FedAvg, over ``--seeds`` seeds (the seed
changes the data split, the malicious devices and training). The robust
rules tolerate f = 4 malicious devices (the simulator's default from
``--malicious``). Norm bounding's ``M`` is ``--norm-bound`` (default 0.5:
about the median L2 norm of an honest round-1 update in this setting,
0.56; chosen from the clean run, not from the attacked one).

Target (issue 10): FedAvg collapses; trimmed mean, median and Multi-Krum
stay within 3 points of the clean accuracy.

(b) ``--part speed``: 100 updates of 1,048,576 float32 values (one tensor)
into each rule's accumulator, then ``result()``; median of ``--repeat``
runs. BLAS runs one thread, as under ``fedge coordinator``; the rules' own
block loop uses every core it may (2 here). Targets: median <= 2 s,
Krum <= 5 s on 2 cores.

    PYTHONPATH=src .venv/bin/python bench/robust.py [--part table|speed|both]
        [--seeds 0 1 2] [--repeat 3]
"""

from __future__ import annotations

import os

# Single-threaded BLAS, as the coordinator sets it (before numpy is imported).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from _common import machine  # noqa: E402
from fedge.sim.config import SimConfig  # noqa: E402
from fedge.sim.engine import simulate  # noqa: E402
from fedge.strategies import build_strategy  # noqa: E402

ATTACK = "sign-flip:10"
MALICIOUS = 0.2


def table(seeds: list[int], norm_bound: float, partition: str) -> None:
    rules = ["fedavg", "trimmed-mean", "median", "multi-krum", "krum", "bulyan",
             f"norm-bound:{norm_bound:g}"]
    base = SimConfig(partition=partition)
    clean_avg: dict[int, float] = {}
    rows = []
    for rule in rules:
        clean, attacked = [], []
        for seed in seeds:
            c = simulate(base.replace(strategy=rule, seed=seed)).metrics["accuracy"]
            a = simulate(base.replace(strategy=rule, seed=seed, attack=ATTACK,
                                      malicious=MALICIOUS)).metrics["accuracy"]
            if rule == "fedavg":
                clean_avg[seed] = c
            clean.append(c)
            attacked.append(a)
        gaps = [100 * (a - clean_avg[s]) for a, s in zip(attacked, seeds, strict=True)]
        own = [100 * (c - clean_avg[s]) for c, s in zip(clean, seeds, strict=True)]
        rows.append((rule, clean, attacked, gaps, own))
    print(f"machine: {machine()}")
    print(f"digits, logreg, 20 devices, {partition}, 30 rounds; attack {ATTACK} on "
          f"{MALICIOUS:.0%} of devices; seeds {seeds}")
    print("| rule | accuracy, no attack | accuracy, attacked | attacked - clean FedAvg (points) | "
          "per seed | rule without attack - clean FedAvg (points) |")
    print("|---|---|---|---|---|---|")
    for rule, clean, attacked, gaps, own in rows:
        print(f"| {rule} | {statistics.mean(clean):.4f} | {statistics.mean(attacked):.4f} | "
              f"{statistics.mean(gaps):+.1f} | {', '.join(f'{g:+.1f}' for g in gaps)} | "
              f"{statistics.mean(own):+.1f} |")


def speed(repeat: int, num_updates: int = 100, num_values: int = 1 << 20) -> None:
    rng = np.random.default_rng(0)
    updates = [{"w": rng.standard_normal(num_values, dtype=np.float32)} for _ in range(num_updates)]
    template = {"w": np.zeros(num_values, dtype=np.float32)}
    cases = [("median", {"f": 10}), ("trimmed-mean:0.2", {"f": 10}), ("krum", {"f": 10}),
             ("multi-krum", {"f": 10}), ("bulyan", {"f": 24}), ("norm-bound:1", {}),
             ("fedavg", {})]
    print(f"machine: {machine()}")
    print(f"{num_updates} updates of {num_values:,} float32 values; median of {repeat} runs")
    print("| rule | add 100 updates (s) | result (s) | total (s) | total CPU, all threads (s) |")
    print("|---|---|---|---|---|")
    for spec, options in cases:
        s = build_strategy(spec, options)
        adds, results, cpus = [], [], []
        for _ in range(repeat):
            acc = s.accumulator(template)
            c0 = time.process_time()
            t0 = time.perf_counter()
            for u in updates:
                acc.add(u, 1.0)
            t1 = time.perf_counter()
            acc.result()
            t2 = time.perf_counter()
            cpus.append(time.process_time() - c0)
            adds.append(t1 - t0)
            results.append(t2 - t1)
            del acc
        a, r = statistics.median(adds), statistics.median(results)
        label = spec + "".join(f" {k}={v:g}" for k, v in options.items())
        print(f"| {label} | {a:.2f} | {r:.2f} | {a + r:.2f} | {statistics.median(cpus):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["table", "speed", "both"], default="both")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--norm-bound", type=float, default=0.5)
    p.add_argument("--partition", default="dirichlet:0.5",
                   help="iid shows how much of a rule's gap is the label skew's")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    if args.part in ("table", "both"):
        table(args.seeds, args.norm_bound, args.partition)
    if args.part in ("speed", "both"):
        speed(args.repeat)


if __name__ == "__main__":
    main()
