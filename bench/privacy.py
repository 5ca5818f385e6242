"""Utility against privacy for DP-FedAvg on digits, and what accounting costs.

Two federations, each run without DP (epsilon = inf) and with DP calibrated
to epsilon 8, 3 and 1 at delta 1e-5 over the run's rounds
(``--target-epsilon``, which is also the budget), central and distributed:

- ``digits, 100 devices``: the bundled digits data over 100 devices
  (Dirichlet(0.5) label skew), Poisson sample rate 0.2 (20 devices a round
  on average), 100 rounds.
- ``digits, 1,000 devices``: the same data over 1,000 devices (iid; 1 or 2
  examples each), sample rate 0.05 (50 a round on average), 100 rounds.

Both use logistic regression, local lr 0.1, one local epoch, FedAvg at
server lr 1. Rows: central DP with the fixed clip norm (``--clip``, default
0.5), central DP with adaptive clipping, and distributed DP (``--secagg --dp
distributed``, the same fixed clip; adaptive clipping is central-only) with
each device's noise share sized for the secure-aggregation threshold (the
default: any sum SecAgg+ reveals carries the whole noise) and, second, for
the expected cohort (``--dp-min-contributors``: as much noise as central DP
when nobody drops out, and a round with fewer uploads is abandoned). Each
cell is the mean final test accuracy over ``--seeds`` seeds; the accuracies
are deterministic for a seed.

Then the accounting time: epsilon after each of 1,000 rounds (q = 0.01,
z = 1, RDP and PLD), with dp-accounting's import timed apart.

    .venv/bin/python bench/privacy.py              # about 10 minutes on 2 cores
    .venv/bin/python bench/privacy.py --seeds 1 --rounds 30 --modes central
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import machine
from fedge.errors import ConfigError
from fedge.sim.config import SimConfig
from fedge.sim.engine import simulate

EPSILONS = (None, 8.0, 3.0, 1.0)
POPULATIONS = (
    ("digits, 100 devices", dict(devices=100, sample_rate=0.2), 20),
    ("digits, 1,000 devices", dict(devices=1000, sample_rate=0.05, partition="iid"), 50),
)


def accuracy(base: dict[str, Any], epsilon: float | None, dp: dict[str, Any],
             seeds: int) -> tuple[float, float, float]:
    """Mean final accuracy, its spread over seeds, and the epsilon spent."""
    accs, spent = [], 0.0
    for seed in range(seeds):
        settings = dict(base, seed=seed)
        if epsilon is not None:
            settings.update(dp, target_epsilon=epsilon)
        result = simulate(SimConfig(**settings))
        accs.append(result.metrics["accuracy"])
        spent = result.privacy["epsilon"] if result.privacy else float("inf")
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return statistics.mean(accs), spread, spent


def accounting_times() -> dict[str, float]:
    """Seconds for dp-accounting's import and for the per-round epsilons of 1,000 rounds."""
    code = (
        "import time; t=time.perf_counter(); import dp_accounting; "
        "print(time.perf_counter()-t)"
    )
    out: dict[str, float] = {
        "import_s": float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout)
    }
    import dp_accounting  # noqa: F401 - timed above, in a fresh process

    from fedge.privacy.accounting import Accountant, RoundEvent
    from fedge.privacy.session import PrivacyConfig, PrivacySession

    event = RoundEvent(1.0, sample_rate=0.01)
    for kind in ("rdp", "pld"):
        t0 = time.perf_counter()
        Accountant(kind, delta=1e-5).epsilon([event] * 1000)
        out[f"{kind}_total_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    curve = Accountant("rdp", delta=1e-5).epsilons([event] * 1000)
    out["rdp_every_round_s"] = time.perf_counter() - t0
    out["rdp_epsilon_1000"] = curve[-1]
    # What a run does: check the budget, then charge, every round.
    session = PrivacySession(PrivacyConfig(noise_multiplier=1.0, budget=10.0), sampling="poisson",
                             sample_rate=0.01, expected_reports=10.0, planned_rounds=1000, seed=0)
    t0 = time.perf_counter()
    for r in range(1, 1001):
        session.check_budget()
        session.charge(r)
    out["session_1000_rounds_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clip", default="0.5", help="the fixed clip norm (adaptive is run as well)")
    parser.add_argument("--modes", default="central,distributed",
                        help="which DP rows: central, distributed or both")
    args = parser.parse_args()
    modes = args.modes.split(",")
    print(f"machine: {machine()}\n")
    t0 = time.perf_counter()
    print("| population | DP | clip | " + " | ".join(
        "no DP (eps = inf)" if e is None else f"eps = {e:g}" for e in EPSILONS) + " |")
    print("|---|---|---|" + "---|" * len(EPSILONS))
    for label, population, expected in POPULATIONS:
        base = dict(population, rounds=args.rounds)
        rows: list[tuple[str, str, dict[str, Any]]] = []
        if "central" in modes:
            rows += [("central", args.clip, dict(dp="central", clip_norm=args.clip)),
                     ("central", "adaptive", dict(dp="central", clip_norm="adaptive"))]
        if "distributed" in modes:
            dist = dict(dp="distributed", secagg=True, clip_norm=args.clip)
            rows += [("distributed, shares for the threshold", args.clip, dist),
                     (f"distributed, shares for {expected} (expected cohort)", args.clip,
                      dict(dist, dp_min_contributors=expected))]
        first = True
        for kind, clip, dp in rows:
            cells = []
            for eps in EPSILONS:
                if eps is None and not first:
                    cells.append("(as above)")
                    continue
                try:
                    mean, spread, spent = accuracy(base, eps, dp, args.seeds)
                except ConfigError:  # adaptive clipping: z >= 2 sigma_b, the count noise cannot fit
                    cells.append("refused (z >= 2 sigma_b)")
                    continue
                cells.append(f"{mean:.3f} +- {spread:.3f}" + ("" if eps is None else f" (spent {spent:.3g})"))
            first = False
            print(f"| {label} | {kind} | {clip} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nutility runs: {time.perf_counter() - t0:.0f} s\n")
    times = accounting_times()
    print("| accounting, 1,000 rounds (q = 0.01, z = 1, delta 1e-5) | seconds |")
    print("|---|---|")
    print(f"| import dp_accounting (fresh process) | {times['import_s']:.2f} |")
    print(f"| RDP, epsilon after round 1,000 ({times['rdp_epsilon_1000']:.3f}) | "
          f"{times['rdp_total_s']:.3f} |")
    print(f"| RDP, epsilon after every round | {times['rdp_every_round_s']:.3f} |")
    print(f"| RDP, budget check + ledger entry every round (PrivacySession) | "
          f"{times['session_1000_rounds_s']:.3f} |")
    print(f"| PLD, epsilon after round 1,000 | {times['pld_total_s']:.3f} |")


if __name__ == "__main__":
    main()
