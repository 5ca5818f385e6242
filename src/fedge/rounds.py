"""The round state machine: cohort selection, deadlines, dropouts. No I/O.

One round: select a cohort from the available devices, open the round, accept
each invited device's update at most once and only before the deadline, then
close it. A round closes *complete* when at least ``min_updates`` arrived and
*abandoned* otherwise; the devices that never reported are its dropouts. The
simulator and the coordinator drive this same code; they differ only in
where updates come from and what clock ``now`` is read from (both are
arguments, never read here).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError, RoundError

__all__ = [
    "SELECTIONS",
    "DeviceId",
    "Round",
    "RoundOutcome",
    "RoundState",
    "choose_stragglers",
    "select_cohort",
    "select_within_deadline",
]

#: Cohort selection rules: uniformly at random, or preferring devices that can finish in time.
SELECTIONS = ("random", "deadline")

IntArray = npt.NDArray[np.int64]
#: A device as the round logic sees it: an index in the simulator, an enrolled
#: device's id string on the coordinator. One round never mixes the two.
DeviceId: TypeAlias = int | str
D = TypeVar("D", int, str)


def select_cohort(
    population: IntArray | Iterable[int],
    *,
    rng: np.random.Generator,
    cohort_size: int | None = None,
    sample_rate: float | None = None,
) -> IntArray:
    """Choose the devices invited to a round, sorted by id.

    Exactly one of ``cohort_size`` (that many devices, uniformly without
    replacement) and ``sample_rate`` (each device independently with that
    probability: Poisson sampling, the assumption DP accounting makes) may be
    set; with neither, every device is invited.

    Raises:
        ConfigError: both are set, ``cohort_size`` is outside ``[1, population]``,
            or ``sample_rate`` is outside ``(0, 1]``.
    """
    ids = np.fromiter(population, dtype=np.int64) if not isinstance(population, np.ndarray) \
        else population.astype(np.int64, copy=False)
    n = int(ids.size)
    if cohort_size is not None and sample_rate is not None:
        raise ConfigError("set a cohort size or a sample rate, not both")
    if cohort_size is not None:
        if isinstance(cohort_size, bool) or not isinstance(cohort_size, int | np.integer):
            raise ConfigError(f"cohort size must be an integer, got {cohort_size!r}")
        if not 1 <= cohort_size <= n:
            raise ConfigError(f"cohort size must be between 1 and the {n} devices, got {cohort_size}")
        if cohort_size == n:
            return np.sort(ids)
        return np.sort(rng.choice(ids, size=cohort_size, replace=False))
    if sample_rate is not None:
        if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
            raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate}")
        return np.sort(ids[rng.random(n) < sample_rate])
    return np.sort(ids)


def select_within_deadline(
    candidates: Sequence[D],
    *,
    estimate_s: Mapping[D, float | None],
    deadline_s: float,
    size: int,
    rng: np.random.Generator,
    last_round: Mapping[D, int],
    fairness: float = 0.2,
    margin: float = 0.8,
) -> tuple[list[D], list[D]]:
    """Heterogeneity-aware selection: prefer devices expected to finish before the deadline.

    Each candidate's round time (training and transfer) is estimated by the
    caller; a device with no estimate yet is given the median of the known
    ones (so a new device is neither favoured nor shut out). Devices expected
    to take more than ``margin * deadline_s`` are left out: invited, they
    would only drop out. Among the others:

    - ``fairness`` of the ``size`` places go to the devices that waited
      longest since their last round (``last_round``; never selected counts as
      longest), whatever their speed, so slow-but-feasible devices are not
      starved;
    - the other places are drawn without replacement with probability
      proportional to ``1 / estimate``: fast devices more often, slow ones
      still sometimes.

    Returns:
        (the cohort, sorted; the devices left out as too slow for the deadline).

    Raises:
        ConfigError: ``size`` < 1, ``fairness`` outside [0, 1], ``margin`` outside (0, 1],
            or a non-positive deadline.
    """
    if size < 1:
        raise ConfigError(f"cohort size must be at least 1, got {size}")
    if not (math.isfinite(fairness) and 0 <= fairness <= 1):
        raise ConfigError(f"fairness must be in [0, 1], got {fairness}")
    if not (math.isfinite(margin) and 0 < margin <= 1):
        raise ConfigError(f"margin must be in (0, 1], got {margin}")
    if not (math.isfinite(deadline_s) and deadline_s > 0):
        raise ConfigError(f"the deadline must be a positive number of seconds, got {deadline_s}")
    known = [float(t) for d in candidates if (t := estimate_s.get(d)) is not None and t > 0]
    fallback = float(np.median(known)) if known else 1.0
    est = {d: (t if (t := estimate_s.get(d)) is not None and t > 0 else fallback) for d in candidates}
    feasible = [d for d in candidates if est[d] <= margin * deadline_s]
    too_slow = [d for d in candidates if est[d] > margin * deadline_s]
    if len(feasible) <= size:
        return sorted(feasible, key=_order), too_slow
    # Fair places: the longest-waiting feasible devices (ties broken at random).
    n_fair = min(size, math.floor(fairness * size + 1e-9))
    order = rng.permutation(len(feasible))
    waited = sorted((last_round.get(feasible[i], -1), k) for k, i in enumerate(order))
    fair = [feasible[order[k]] for _, k in waited[:n_fair]]
    rest = [d for d in feasible if d not in set(fair)]
    weights = np.array([1.0 / est[d] for d in rest])
    picked = rng.choice(len(rest), size=size - n_fair, replace=False, p=weights / weights.sum())
    cohort = fair + [rest[i] for i in picked.tolist()]
    return sorted(cohort, key=_order), too_slow


def _order(d: DeviceId) -> tuple[int, str]:
    """Ids in their natural order (numbers by value); the simulator's are ints, the coordinator's strings."""
    return (0, f"{d:020d}") if isinstance(d, int) else (1, d)


def choose_stragglers(
    cohort: IntArray, fraction: float, rng: np.random.Generator
) -> IntArray:
    """The ``round(fraction * len(cohort))`` devices of ``cohort`` that straggle this round.

    Raises:
        ConfigError: ``fraction`` is outside ``[0, 1]``.
    """
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ConfigError(f"stragglers fraction must be in [0, 1], got {fraction}")
    k = round(fraction * cohort.size)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    return np.sort(rng.choice(cohort, size=k, replace=False))


class RoundState(enum.Enum):
    OPEN = "open"
    COMPLETE = "complete"
    ABANDONED = "abandoned"


@dataclass(frozen=True)
class RoundOutcome:
    """How a round ended: who reported, who dropped, with what total weight."""

    round_id: int
    state: RoundState
    reported: tuple[DeviceId, ...]
    dropped: tuple[DeviceId, ...]
    total_weight: float


@dataclass
class Round:
    """One round's bookkeeping. ``deadline`` is an instant on the caller's clock.

    Raises (from the constructor):
        ConfigError: an empty cohort, ``min_updates`` outside ``[1, cohort]``.
    """

    round_id: int
    cohort: frozenset[DeviceId]
    min_updates: int
    deadline: float = math.inf
    state: RoundState = RoundState.OPEN
    _weights: dict[DeviceId, float] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.cohort:
            raise ConfigError(f"round {self.round_id}: the cohort is empty")
        if not 1 <= self.min_updates <= len(self.cohort):
            raise ConfigError(
                f"round {self.round_id}: min_updates must be between 1 and the cohort size "
                f"{len(self.cohort)}, got {self.min_updates}"
            )

    @classmethod
    def open(
        cls, round_id: int, cohort: Iterable[DeviceId] | IntArray, *, min_updates: int | None = None,
        deadline: float = math.inf,
    ) -> Round:
        """A round open to ``cohort``; ``min_updates`` defaults to the whole cohort."""
        members = frozenset(d if isinstance(d, str) else int(d) for d in cohort)
        return cls(round_id, members, len(members) if min_updates is None else min_updates, deadline)

    @property
    def reported(self) -> frozenset[DeviceId]:
        return frozenset(self._weights)

    @property
    def complete_cohort(self) -> bool:
        """True once every invited device has reported."""
        return len(self._weights) == len(self.cohort)

    def accept(self, device_id: DeviceId, weight: float, now: float) -> None:
        """Record ``device_id``'s update, or refuse it.

        Raises:
            RoundError: ``closed`` (the round has ended), ``late`` (past the
                deadline), ``not_invited``, ``duplicate`` or ``bad_weight``.
        """
        if self.state is not RoundState.OPEN:
            raise RoundError("closed", f"round {self.round_id} is {self.state.value}")
        if now > self.deadline:
            raise RoundError("late", f"round {self.round_id}'s deadline has passed")
        if device_id not in self.cohort:
            raise RoundError("not_invited", f"device {device_id} is not in round {self.round_id}")
        if device_id in self._weights:
            raise RoundError("duplicate", f"device {device_id} already reported to round {self.round_id}")
        if not (math.isfinite(weight) and weight > 0):
            raise RoundError("bad_weight", f"device {device_id} sent weight {weight!r}")
        self._weights[device_id] = float(weight)

    def close(self) -> RoundOutcome:
        """End the round: complete with enough updates, abandoned without.

        Raises:
            RoundError: ``closed`` if the round has already ended.
        """
        if self.state is not RoundState.OPEN:
            raise RoundError("closed", f"round {self.round_id} is already {self.state.value}")
        enough = len(self._weights) >= self.min_updates
        self.state = RoundState.COMPLETE if enough else RoundState.ABANDONED
        return RoundOutcome(
            round_id=self.round_id,
            state=self.state,
            reported=tuple(sorted(self._weights)),
            dropped=tuple(sorted(self.cohort - self._weights.keys())),
            total_weight=sum(self._weights.values()),
        )
