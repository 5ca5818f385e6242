"""What 2 cores give two plain processes doing the ray workers' own work: the ceiling for a backend.

A parallel backend's speed-up over 1 worker can be no better than the
machine's for the workers' job alone. This runs exactly that job, with no
framework: the same workload as ``bench/scale.py --only mlp`` (digits,
Dirichlet 0.5, 20 devices, an MLP of 975,010 parameters, 2 local epochs),
the same device split over 2 workers (``assign_devices``), the same
:class:`~fedge.sim.devices.DeviceRunner` (train, check, encode and count the
upload, accumulate), in two forked processes that stay alive. Each trial
times one round of all 20 devices in one process, then one round of each
worker's half in both processes at once (started together at a barrier);
the trials alternate, so both sides see the same machine. It prints the
median times, the median speed-up and every trial's ratio, as JSON.

No driver, no hand-offs, no evaluation, no scheduler: what is left between
1.0x and 2.0x is the hardware (two cores' shared caches, memory bandwidth
and, on a virtual machine, what the host gives two busy vCPUs against one).

    .venv/bin/python bench/ceiling.py [--trials N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from fedge.params import Params
from fedge.sim.backends import _WORKER_ENV, assign_devices, tune_malloc
from fedge.sim.config import SimConfig
from fedge.sim.devices import DeviceJob, DeviceRunner
from fedge.sim.engine import Simulation

WORKLOAD = dict(task="mlp:13000", devices=20, rounds=10, local_epochs=2)

_state: dict[str, Any] = {}  # each forked process's runner and device split


def _setup() -> Simulation:
    tune_malloc()
    sim = Simulation(SimConfig(**WORKLOAD))
    _state["owner"] = assign_devices([len(d) for d in sim.data.devices], 2,
                                     batch_size=sim.train_config.batch_size)
    _state["runner"] = DeviceRunner(
        task=sim.task, strategy=sim.strategy, datasets=dict(enumerate(sim.data.devices)),
        base_config=sim.train_config, seed=sim.config.seed,
    )
    _state["epochs"] = sim.config.local_epochs
    return sim


def _round(worker: int | None, round_id: int, params: Params, barrier: Any = None) -> tuple[float, Any]:
    """One round of ``worker``'s devices (all of them for None): its wall time, and for all, the aggregate."""
    jobs = [DeviceJob(d, _state["epochs"], None)
            for d, w in enumerate(_state["owner"]) if worker is None or w == worker]
    own = {k: np.array(v) for k, v in params.items()}  # as a Ray actor copies its params
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    part = _state["runner"].run(round_id, own, jobs)
    took = time.perf_counter() - t0
    return took, part.accumulator.result() if worker is None else None


def measure(trials: int) -> dict[str, Any]:
    """Alternate one process alone and two together, ``trials`` times each.

    The model moves on as in a run: each trial's single-process round is
    aggregated and applied (FedAvg), and the next trial starts from it. That
    matters: a trained model's deltas are sparser (units that a device's data
    never activates) and take zstd about twice as long as the first round's.
    """
    ctx = mp.get_context("fork")
    manager = ctx.Manager()
    alone: list[float] = []
    pair: list[float] = []
    sim = _setup()
    state = sim.strategy.init(sim._init_params())
    with ctx.Pool(2) as pool:
        pool.starmap(_round, [(0, 0, state.params), (1, 0, state.params)])  # warm both
        for r in range(1, trials + 1):
            took, aggregate = pool.apply(_round, (None, r, state.params))
            alone.append(took)
            barrier = manager.Barrier(2)
            pair.append(max(t for t, _ in pool.starmap(
                _round, [(0, r, state.params, barrier), (1, r, state.params, barrier)])))
            state = sim.strategy.apply(state, aggregate)
    manager.shutdown()
    return {
        "alone_s": round(statistics.median(alone), 4),
        "pair_s": round(statistics.median(pair), 4),
        "speedup": round(statistics.median(alone) / statistics.median(pair), 3),
        "trial_speedups": sorted(round(a / p, 3) for a, p in zip(alone, pair, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=12, help="alternations (default 12)")
    opts = parser.parse_args()
    if opts.trials < 1:
        parser.error(f"--trials must be at least 1, got {opts.trials}")
    if any(os.environ.get(k) != v for k, v in _WORKER_ENV.items()):
        # The backends' workers' environment (one BLAS thread each, their malloc
        # thresholds) must be there before numpy loads: start again with it.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_WORKER_ENV})
    print(json.dumps(measure(opts.trials)), flush=True)


if __name__ == "__main__":
    main()
