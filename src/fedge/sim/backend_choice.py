"""``--backend auto``: the backend a run should use, from its estimated cost.

The rule, from costs measured on a 2-core machine (docs/benchmarks.md,
"Scale-out"):

1. ``--ray-address`` given: ``ray`` (joining a cluster is an explicit choice).
2. One usable core: ``inline`` (nothing to run in parallel).
3. Otherwise train one device once in this process (a real call of the
   task's train, the run's own device 0 and local epochs) and estimate the
   run's training time inline as
   ``T = probe_s * (mean examples / device 0's examples) * expected cohort * rounds``.
   ``processes`` with ``W`` workers saves about ``T * (1 - 1/W)`` and costs
   :data:`PROCESS_START_S` to start plus :data:`PROCESS_ROUND_S` per round
   (shipping params, gathering partials) and the time to ship the data once;
   it is chosen when the saving is at least twice that cost, ``inline``
   otherwise.

A local Ray instance is never chosen automatically: on one machine it runs on
the same cores as ``processes`` and starts an order of magnitude slower
(:data:`RAY_LOCAL_START_S`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from fedge.data.dataset import FederatedData
from fedge.sim.backends import _usable_cores
from fedge.sim.config import SimConfig
from fedge.tasks.base import Task, TrainConfig

__all__ = ["PROCESS_ROUND_S", "PROCESS_START_S", "RAY_LOCAL_START_S", "BackendChoice", "choose_backend"]

logger = logging.getLogger(__name__)

#: Starting the processes backend's workers (spawn, imports), in seconds; measured.
PROCESS_START_S = 0.6
#: Its per-round cost beyond training (params out, partials back), in seconds; measured.
PROCESS_ROUND_S = 0.004
#: Shipping data to the workers once, bytes per second; measured.
PROCESS_SHIP_BYTES_PER_S = 400e6
#: Starting a local Ray instance and its actors, in seconds; measured (not used by the rule).
RAY_LOCAL_START_S = 9.0


@dataclass(frozen=True)
class BackendChoice:
    """The chosen backend and why: the estimate it rests on, for the log and summary.json."""

    backend: str
    reason: str
    estimated_train_s: float | None = None


def choose_backend(
    config: SimConfig, data: FederatedData, task: Task, train_config: TrainConfig
) -> BackendChoice:
    """Resolve ``config.backend``; anything but ``auto`` is returned as it is."""
    if config.backend != "auto":
        return BackendChoice(config.backend, "asked for")
    if config.ray_address is not None:
        return BackendChoice("ray", "--ray-address given")
    cores = _usable_cores()
    workers = min(config.workers or cores, len(data.devices))
    if cores < 2 or workers < 2:
        return BackendChoice("inline", f"{cores} usable core(s), {workers} worker(s)")
    try:
        estimate = _estimate_inline_train_s(config, data, task, train_config)
    except Exception as e:
        return BackendChoice("inline", f"the probe training call failed ({type(e).__name__})")
    shipped = sum(d.x.nbytes + d.y.nbytes for d in data.devices)
    cost = PROCESS_START_S + config.rounds * PROCESS_ROUND_S + shipped / PROCESS_SHIP_BYTES_PER_S
    saving = estimate * (1.0 - 1.0 / workers)
    backend = "processes" if saving >= 2.0 * cost else "inline"
    reason = (f"estimated training {estimate:.2f} s inline; {workers} workers would save "
              f"{saving:.2f} s at a cost of {cost:.2f} s")
    logger.info("--backend auto chose %s: %s", backend, reason)
    return BackendChoice(backend, reason, estimate)


def _expected_cohort(config: SimConfig, num_devices: int) -> float:
    if config.cohort is not None:
        return float(config.cohort)
    if config.sample_rate is not None:
        return config.sample_rate * num_devices
    return float(num_devices)


def _estimate_inline_train_s(
    config: SimConfig, data: FederatedData, task: Task, train_config: TrainConfig
) -> float:
    """One real train call on device 0, scaled to the run's device-rounds."""
    params = task.init_params(np.random.default_rng([config.seed, 99]))
    first = data.devices[0]
    t0 = time.perf_counter()
    task.train(params, first, train_config, np.random.default_rng([config.seed, 98]))
    probe_s = time.perf_counter() - t0
    mean_examples = data.num_examples / len(data.devices)
    per_device = probe_s * mean_examples / max(1, len(first))
    return per_device * _expected_cohort(config, len(data.devices)) * config.rounds
