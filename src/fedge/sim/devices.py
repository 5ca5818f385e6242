"""Running a batch of simulated devices: the work every backend shares.

A backend decides *where* devices train (this process, worker processes,
later a Ray cluster); :class:`DeviceRunner` is *what* each of them does for a
round: train from the round's params with a generator keyed by
(seed, round, device), check the result, and stream the delta into a partial
accumulator. Because every device's randomness depends only on that key, a
device trains identically whichever backend or worker runs it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedge import params as P
from fedge.data.dataset import Dataset
from fedge.encoding import EncodingConfig
from fedge.errors import TaskError
from fedge.params import Params
from fedge.privacy.mechanisms import DevicePrivacy, privatize_update
from fedge.sim.attacks import Attack
from fedge.sim.traffic import UpdateEncoder
from fedge.strategies.base import Accumulator, Strategy
from fedge.tasks.base import Task, TrainConfig

if TYPE_CHECKING:
    from fedge.sim.secagg import SecAggJob

__all__ = ["DeviceJob", "DeviceRunner", "PartialRound", "device_rng"]


def device_rng(seed: int, round_id: int, device_id: int) -> np.random.Generator:
    """The generator device ``device_id`` trains with in round ``round_id``.

    Philox is counter-based: distinct keys give independent streams, and a key
    is cheap to set up (no seed hashing), which matters at thousands of
    devices per round.
    """
    key = np.array([seed, (round_id << 32) | device_id], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


class _DeviceRng:
    """:func:`device_rng`'s streams from one reused generator, for a runner's loop over devices.

    Building a Philox generator costs ~20 us, more than a small device's
    training step; resetting one's key (counter at zero, buffer empty) gives
    the same stream in a fraction of that. The generator handed out is only
    valid until the next :meth:`reset`: a runner uses it for one device at a time.
    """

    def __init__(self) -> None:
        self._bits = np.random.Philox(key=0)
        self._generator = np.random.Generator(self._bits)

    def reset(self, seed: int, round_id: int, device_id: int) -> np.random.Generator:
        self._bits.state = {
            "bit_generator": "Philox",
            "state": {"counter": np.zeros(4, dtype=np.uint64),
                      "key": np.array([seed, (round_id << 32) | device_id], dtype=np.uint64)},
            "buffer": np.zeros(4, dtype=np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0,
        }
        return self._generator


@dataclass(frozen=True)
class DeviceJob:
    """One device's work in a round: who, how many local epochs, and its DP step (if any)."""

    device_id: int
    local_epochs: int
    privacy: DevicePrivacy | None = None
    secagg: SecAggJob | None = None  # set: the device uploads only a masked vector


@dataclass
class PartialRound:
    """What a batch of devices produced: the partial accumulator and bookkeeping.

    ``reports`` are (device, weight) for accepted updates; ``rejected`` are
    devices whose update was refused (non-finite values), as a coordinator
    would refuse them.
    """

    accumulator: Accumulator
    reports: list[tuple[int, float]] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    train_loss_sum: float = 0.0
    train_loss_weight: float = 0.0
    train_s: float = 0.0
    bytes_up: int = 0  # the devices' update payloads as they would go over the wire
    unclipped: int = 0  # DP: updates whose norm was within the clip (adaptive clipping's count)
    masked_sum: np.ndarray | None = None  # secure aggregation: sum of masked vectors mod 2^32


class DeviceRunner:
    """Trains the devices whose data it holds."""

    def __init__(
        self,
        *,
        task: Task,
        strategy: Strategy,
        datasets: Mapping[int, Dataset],
        base_config: TrainConfig,
        seed: int,
        attack: Attack | None = None,
        encoding: EncodingConfig | None = None,
        count_bytes: str = "wire",
    ) -> None:
        self._task = task
        self._attack = attack
        self._strategy = strategy
        self._datasets = datasets
        self._base = base_config
        self._seed = seed
        self._rng = _DeviceRng()
        self._configs: dict[int, TrainConfig] = {}
        self._encoder = UpdateEncoder(encoding or EncodingConfig(), count=count_bytes)

    def _config(self, epochs: int) -> TrainConfig:
        cfg = self._configs.get(epochs)
        if cfg is None:
            b = self._base
            cfg = TrainConfig(local_epochs=epochs, batch_size=b.batch_size, lr=b.lr, mu=b.mu)
            self._configs[epochs] = cfg
        return cfg

    def run(self, round_id: int, params: Params, jobs: Sequence[DeviceJob]) -> PartialRound:
        """Train ``jobs`` from ``params`` and accumulate their deltas.

        Raises:
            TaskError: the task raised, or returned params of another structure
                or a non-positive example count.
        """
        out = PartialRound(accumulator=self._strategy.accumulator(params))
        train = self._task.train
        clock = time.perf_counter
        for job in jobs:
            data = self._datasets[job.device_id]
            rng = self._rng.reset(self._seed, round_id, job.device_id)
            t0 = clock()
            try:
                result = train(params, data, self._config(job.local_epochs), rng)
            except TaskError:
                raise
            except Exception as e:
                raise TaskError(
                    f"task train failed on device {job.device_id} in round {round_id}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            out.train_s += clock() - t0
            weight = result.num_examples
            if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or weight < 1:
                raise TaskError(
                    f"task train returned num_examples={weight!r} on device {job.device_id}; "
                    "it must be a positive integer"
                )
            if not isinstance(result.params, Mapping) or not isinstance(result.metrics, Mapping):
                raise TaskError(
                    f"task train on device {job.device_id} must return params and metrics as "
                    f"mappings, got {type(result.params).__name__} and "
                    f"{type(result.metrics).__name__}"
                )
            try:
                delta = P.subtract(result.params, params)
            except (ValueError, TypeError, AttributeError) as e:
                raise TaskError(f"task train returned malformed params: {e}") from e
            if self._attack is not None:  # a malicious device's update (sim/attacks.py)
                delta = self._attack.apply(job.device_id, delta, rng)
            if not all(np.isfinite(v).all() for v in delta.values()):
                out.rejected.append(job.device_id)
                continue
            if job.secagg is not None and job.secagg.dp_clip_norm is not None:
                weight = 1  # distributed DP: the clip and the noise are in the masked upload
            elif job.privacy is not None:
                delta, weight = self._privatize(job.privacy, delta, round_id, job.device_id, out)
            if job.secagg is not None:  # secure aggregation: only the masked vector leaves
                out.masked_sum = job.secagg.add_masked(out.masked_sum, delta, int(weight), rng)
                # Counted as sent: the masked vector (and the weight coordinate), packed to the
                # bits the sum needs; the key and share messages are not counted here.
                out.bytes_up += -(-(P.num_values(delta) + 1) * job.secagg.grid.wire_bits // 8)
            else:
                sent, nbytes = self._encoder.encode(
                    job.device_id, round_id, delta, num_examples=int(result.num_examples),
                    metrics=_upload_metrics(result.metrics, clock() - t0), rng=rng,
                )
                out.bytes_up += nbytes
                if sent is None:
                    out.rejected.append(job.device_id)
                    continue
                delta = sent
                out.accumulator.add(delta, float(weight))
            out.reports.append((job.device_id, float(weight)))
            loss = result.metrics.get("train_loss")
            if isinstance(loss, int | float | np.floating) and np.isfinite(loss):
                out.train_loss_sum += float(loss) * float(weight)
                out.train_loss_weight += float(weight)
        return out

    @staticmethod
    def _privatize(how: DevicePrivacy, delta: Params, round_id: int, device_id: int,
                   out: PartialRound) -> tuple[Params, int]:
        """Clip (and locally noise) a DP update; under DP every update weighs 1 (docs/privacy.md)."""
        private, within = privatize_update(delta, how, round_id=round_id, device_id=device_id)
        out.unclipped += int(within)
        return private, 1


def _upload_metrics(metrics: Mapping[str, object], train_s: float) -> dict[str, float]:
    """The metrics an agent sends with its update: the finite numeric ones, and its train time."""
    out = {
        str(k): float(v) for k, v in metrics.items()
        if isinstance(v, int | float | np.floating) and not isinstance(v, bool) and np.isfinite(v)
    }
    out["train_s"] = train_s
    return out
