"""Ray with 2 workers against 1, round by round in one Ray instance: a paired measurement.

``bench/scale.py --only mlp`` times whole ``fedge simulate`` runs, a 1-worker
run and then a 2-worker run; on a shared or virtual machine the cores'
speed drifts between the two by more than the effect measured (single
pairs gave 1.28x to 1.73x in a row). This pairs them instead: one local Ray
instance holds both set-ups at once (one actor with every device, and two
actors with half each: the ray backend's own ``RayBackend``, placed by
``assign_devices``), and the rounds alternate, 1 worker then 2, each round
being the engine's own round code (``Simulation._round``: cohort, params
out, training, partials back and merged, the strategy applied, the
download's bytes counted) followed by its evaluation. Both runs see the
same machine within a second of each other, and the speed-up is the median
over rounds of (1-worker round) / (2-worker round). An idle actor costs
nothing; the instance declares 3 CPUs so that both sets can be placed on 2
cores, of which only one set is busy at a time.

The workload is ``bench/scale.py``'s ``mlp``: digits, Dirichlet 0.5, 20
devices, an MLP of 975,010 parameters, 2 local epochs, every device every
round. Round 1 of each is a warm-up and is not counted.

    .venv/bin/python bench/ray_paired.py [--rounds N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import machine
from fedge.sim.backends import _WORKER_ENV, tune_malloc
from fedge.sim.config import SimConfig
from fedge.sim.engine import Simulation

WORKLOAD = dict(task="mlp:13000", devices=20, local_epochs=2, backend="ray")


def _round_s(sim: Simulation, backend: Any, state: Any, r: int) -> tuple[Any, float, float]:
    """One engine round and its evaluation; (new state, wall seconds, accuracy)."""
    population = np.arange(len(sim.data.devices), dtype=np.int64)
    t0 = time.perf_counter()
    state, _, _ = sim._round(r, state, population, backend, t0)
    accuracy = sim._evaluate(state.params)["accuracy"]
    return state, time.perf_counter() - t0, accuracy


def measure(rounds: int) -> dict[str, Any]:
    import ray

    tune_malloc()  # as `fedge simulate` does for its driver
    env = {**_WORKER_ENV, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": env}, _system_config={"enable_metrics_collection": False})
    try:
        sims = {w: Simulation(SimConfig(**WORKLOAD, rounds=rounds, workers=w)) for w in (1, 2)}
        backends = {w: sims[w]._build_backend() for w in (1, 2)}
        states = {w: sims[w].strategy.init(sims[w]._init_params()) for w in (1, 2)}
        times: dict[int, list[float]] = {1: [], 2: []}
        accuracy: dict[int, float] = {}
        for r in range(1, rounds + 1):
            for w in (1, 2):
                states[w], took, accuracy[w] = _round_s(sims[w], backends[w], states[w], r)
                if r > 1:
                    times[w].append(took)
        for b in backends.values():
            b.close()
    finally:
        ray.shutdown()
    ratios = [a / b for a, b in zip(times[1], times[2], strict=True)]
    return {
        "rounds_counted": len(ratios),
        "round_1_worker_s": round(statistics.median(times[1]), 4),
        "round_2_workers_s": round(statistics.median(times[2]), 4),
        "speedup_median": round(statistics.median(ratios), 3),
        "speedup_of_totals": round(sum(times[1]) / sum(times[2]), 3),
        "ratios": sorted(round(x, 3) for x in ratios),
        "final_accuracy": {str(w): round(a, 4) for w, a in accuracy.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=21,
                        help="rounds of each (default 21; the first is not counted)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    opts = parser.parse_args()
    if opts.rounds < 2:
        parser.error(f"--rounds must be at least 2 (round 1 is a warm-up), got {opts.rounds}")
    print(f"machine: {machine()}", flush=True)
    result = measure(opts.rounds)
    print(json.dumps(result), flush=True)
    if opts.json:
        opts.json.write_text(json.dumps({"machine": machine(), **result}, indent=2))


if __name__ == "__main__":
    main()
