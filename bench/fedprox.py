"""FedProx reproduction: Li et al., MLSys 2020, Figure 1, synthetic(1,1) with 90% stragglers.

Three runs of the same federation (30 devices of FedProx synthetic(1,1) data,
multinomial logistic regression, local lr 0.01, batch 10, 20 local epochs,
10 devices per round, 9 of them stragglers that manage a uniform [1, 20)
epochs, 200 rounds):

- ``fedavg``: FedAvg as the paper runs it; stragglers' partial work is dropped.
- ``fedprox mu=0``: partial work kept, no proximal term.
- ``fedprox mu=1``: partial work kept, proximal term mu = 1.

Per round it records the central test accuracy and loss, the training loss
the devices report (``RoundRecord.train_loss``: the example-weighted mean of
each reporting device's loss over its last local epoch) and the paper's
training loss, the global objective ``f(w) = sum_k n_k/n F_k(w)``, i.e. the
loss of the round's global model on every device's training data.

The paper's claim: mu = 1 makes training stable and ends above FedAvg, which
discards the stragglers' work and oscillates. Stability here is the standard
deviation of the round-to-round change in training loss and the number of
rounds in which the test loss rose by more than 10%.

Writes docs/img/fedprox_synthetic_1_1.png and .csv (for the first seed) and
prints a markdown table. With ``--seeds N`` it runs seeds 0..N-1 and adds
mean +- std of the final and last-50-round accuracies.

    .venv/bin/python bench/fedprox.py                 # seed 0, about 2 minutes
    .venv/bin/python bench/fedprox.py --seeds 3 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from _common import ROOT, machine

IMG = ROOT / "docs" / "img"
STEM = "fedprox_synthetic_1_1"
LAST = 50  # rounds averaged for the "last 50" accuracy

# label -> SimConfig overrides; the shared settings are in _base().
CONFIGS: dict[str, dict[str, Any]] = {
    "FedAvg (drop stragglers)": {"strategy": "fedavg", "drop_stragglers": True},
    "FedProx mu=0": {"strategy": "fedprox", "mu": 0.0},
    "FedProx mu=1": {"strategy": "fedprox", "mu": 1.0},
}


def _base(rounds: int, seed: int) -> dict[str, Any]:
    return {
        "data": "synthetic:1,1", "task": "logreg", "lr": 0.01, "rounds": rounds, "cohort": 10,
        "batch_size": 10, "local_epochs": 20, "stragglers": 0.9, "seed": seed,
    }


@dataclass(frozen=True)
class Curves:
    """One run's per-round series (NaN where a round produced no value)."""

    label: str
    seed: int
    train_loss: np.ndarray
    global_train_loss: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    wall_s: float


class _Watch:
    """Wraps a strategy and remembers the newest global params.

    The round record carries no params, so this is how the bench sees the
    model after each round to compute the paper's training loss. Everything
    but ``init`` and ``apply`` goes straight to the wrapped strategy.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.params: Mapping[str, np.ndarray] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def init(self, params: Any) -> Any:
        state = self.inner.init(params)
        self.params = state.params
        return state

    def apply(self, state: Any, aggregate: Any) -> Any:
        state = self.inner.apply(state, aggregate)
        self.params = state.params
        return state


def run_one(label: str, rounds: int, seed: int) -> Curves:
    """Run configuration ``label`` for ``rounds`` rounds with ``seed``."""
    from fedge.data.dataset import Dataset
    from fedge.sim import RoundRecord, SimConfig, Simulation

    sim = Simulation(SimConfig(**_base(rounds, seed), **CONFIGS[label]))
    watch = _Watch(sim.strategy)
    sim.strategy = watch
    train_all = Dataset(
        x=np.concatenate([d.x for d in sim.data.devices]),
        y=np.concatenate([d.y for d in sim.data.devices]),
    )
    nan = float("nan")
    rows: list[tuple[float, float, float, float]] = []

    def on_round(rec: RoundRecord) -> None:
        assert watch.params is not None
        global_loss = sim.task.evaluate(dict(watch.params), train_all)["loss"]
        m = rec.metrics or {}
        rows.append((
            nan if rec.train_loss is None else rec.train_loss,
            global_loss,
            m.get("loss", nan),
            m.get("accuracy", nan),
        ))

    t0 = time.perf_counter()
    sim.run(on_round=on_round)
    wall = time.perf_counter() - t0
    cols = np.array(rows, dtype=np.float64).T
    return Curves(label, seed, cols[0], cols[1], cols[2], cols[3], wall)


def _stability(c: Curves) -> tuple[float, int]:
    """Std of the round-to-round change in device-reported training loss; test-loss jumps > 10%."""
    d_train = np.diff(c.train_loss)
    d_train = d_train[np.isfinite(d_train)]
    sd = float(np.std(d_train)) if d_train.size else float("nan")
    t = c.test_loss
    jumps = int(np.sum(t[1:] > 1.1 * t[:-1]))
    return sd, jumps


def _std_diff(x: np.ndarray) -> float:
    d = np.diff(x)
    d = d[np.isfinite(d)]
    return float(np.std(d)) if d.size else float("nan")


def write_csv(path: Path, runs: list[Curves]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["round", "config", "train_loss", "test_loss", "test_accuracy", "global_train_loss"])
        for c in runs:
            for i in range(c.test_loss.size):
                w.writerow([i + 1, c.label, *(f"{v:.6g}" for v in (
                    c.train_loss[i], c.test_loss[i], c.test_accuracy[i], c.global_train_loss[i]))])


def write_png(path: Path, runs: list[Curves]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = [
        ("training loss (devices' report)", "train_loss", "loss"),
        ("training loss (global objective, paper's Fig. 1)", "global_train_loss", "loss"),
        ("test accuracy", "test_accuracy", "accuracy"),
    ]
    for ax, (title, attr, ylabel) in zip(axes, panels, strict=True):
        for c in runs:
            y = getattr(c, attr)
            ax.plot(np.arange(1, y.size + 1), y, label=c.label, linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"synthetic(1,1), 90% stragglers, seed {runs[0].seed}", fontsize=11)
    fig.savefig(path, dpi=110)


def _pm(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="seed of the single run (with --seeds 1)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run seeds 0..N-1 and report mean ± std (default 1: just --seed)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/img files")
    a = ap.parse_args()
    if a.rounds < LAST:
        ap.error(f"--rounds must be >= {LAST}")
    seeds = [a.seed] if a.seeds == 1 else list(range(a.seeds))

    print(f"machine: {machine()}")
    jobs = [(label, a.rounds, s) for s in seeds for label in CONFIGS]
    if a.jobs > 1:
        with ProcessPoolExecutor(max_workers=a.jobs) as pool:
            runs = list(pool.map(run_one, *zip(*jobs, strict=True)))
    else:
        runs = [run_one(*j) for j in jobs]

    first = [c for c in runs if c.seed == seeds[0]]
    if not a.no_write:
        IMG.mkdir(parents=True, exist_ok=True)
        write_csv(IMG / f"{STEM}.csv", first)
        write_png(IMG / f"{STEM}.png", first)
        print(f"wrote {IMG / STEM}.png and .csv (seed {seeds[0]})")

    print(f"\nseed {seeds[0]}, {a.rounds} rounds\n")
    print(f"| config | final acc | mean acc last {LAST} | best acc | final train loss "
          "| final global train loss | std Δ train loss | std Δ global train loss "
          "| test-loss rises > 10% | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in first:
        sd, jumps = _stability(c)
        print(f"| {c.label} | {c.test_accuracy[-1]:.4f} | {np.nanmean(c.test_accuracy[-LAST:]):.4f} "
              f"| {np.nanmax(c.test_accuracy):.4f} | {c.train_loss[-1]:.4f} "
              f"| {c.global_train_loss[-1]:.4f} | {sd:.4f} | {_std_diff(c.global_train_loss):.4f} "
              f"| {jumps} | {c.wall_s:.1f} |")

    if len(seeds) > 1:
        print(f"\nper seed: final accuracy / mean accuracy over the last {LAST} rounds\n")
        print("| seed | " + " | ".join(CONFIGS) + " |")
        print("|---|" + "---|" * len(CONFIGS))
        for s in seeds:
            cells = []
            for label in CONFIGS:
                (c,) = [c for c in runs if c.label == label and c.seed == s]
                cells.append(f"{c.test_accuracy[-1]:.4f} / {np.nanmean(c.test_accuracy[-LAST:]):.4f}")
            print(f"| {s} | " + " | ".join(cells) + " |")
        print(f"\nseeds {seeds[0]}..{seeds[-1]} (mean ± std over {len(seeds)} seeds)\n")
        print(f"| config | final acc | mean acc last {LAST} | std Δ train loss "
              "| std Δ global train loss | test-loss rises > 10% |")
        print("|---|---|---|---|---|---|")
        for label in CONFIGS:
            cs = [c for c in runs if c.label == label]
            stab = [_stability(c) for c in cs]
            print(f"| {label} | {_pm([float(c.test_accuracy[-1]) for c in cs])} "
                  f"| {_pm([float(np.nanmean(c.test_accuracy[-LAST:])) for c in cs])} "
                  f"| {_pm([s[0] for s in stab])} "
                  f"| {_pm([_std_diff(c.global_train_loss) for c in cs])} "
                  f"| {_pm([float(s[1]) for s in stab], 1)} |")

if __name__ == "__main__":
    main()
