"""The strategy interface and its streaming accumulator.

A strategy turns a round's updates into new params in two pure steps, after
the fashion of FedJAX's algorithms (an ``init``/``apply`` pair over a frozen
state): updates stream into an :class:`Accumulator` as they arrive, then
:meth:`Strategy.apply` reads the accumulator's :class:`Aggregate` and returns
the next :class:`ServerState`. The accumulator keeps a running weighted sum,
so aggregation memory is O(model) whatever the cohort size; partial sums from
several workers merge exactly (up to floating-point summation order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from fedge import params as P
from fedge.params import Array, Params

__all__ = ["Accumulator", "Aggregate", "ServerState", "Strategy", "WeightedMean"]


@dataclass(frozen=True)
class ServerState:
    """The coordinator's model and optimizer state after ``round`` rounds.

    Attributes:
        params: the global model.
        opt_state: named slots of the server optimizer (momentum, second
            moment), each shaped like ``params``; empty for plain FedAvg.
        round: how many rounds have been applied.
    """

    params: Params
    opt_state: Mapping[str, Params] = field(default_factory=dict)
    round: int = 0


@dataclass(frozen=True)
class Aggregate:
    """A round's combined update: the weighted mean delta, total weight and count."""

    delta: Params
    total_weight: float
    count: int


@runtime_checkable
class Accumulator(Protocol):
    """Collects updates as they arrive; ``merge`` joins partial accumulators."""

    @property
    def count(self) -> int:
        """How many updates were added (merged ones included)."""
        ...

    def add(self, delta: Mapping[str, Array], weight: float) -> None:
        """Add one device's ``delta`` with weight ``weight`` (its example count)."""
        ...

    def merge(self, other: Accumulator) -> None:
        """Add everything ``other`` accumulated (a partial sum from another worker)."""
        ...

    def result(self) -> Aggregate:
        """The round's combined update; raises ``ValueError`` if nothing was added."""
        ...


class WeightedMean:
    """Running example-weighted sum of deltas: FedAvg's aggregation, in O(model) memory.

    The sum is held in the params' own dtype; every add is one BLAS axpy for
    large tensors (see :func:`fedge.params.add_scaled_`). Deltas are not
    checked for NaN here (that would be a second pass over every update on
    the hot path): whoever receives an update refuses non-finite ones before
    adding it, as the simulator's device runner and the coordinator do.
    """

    def __init__(self, template: Mapping[str, Array]) -> None:
        self._sum: Params = P.zeros_like(template)
        self._weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._weight

    def add(self, delta: Mapping[str, Array], weight: float) -> None:
        """Add one device's ``delta`` with FedAvg weight ``weight`` (its example count).

        Raises:
            ValueError: ``weight`` is not a positive finite number, or
                ``delta`` differs from the template in names or shapes.
        """
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"update weight must be a positive finite number, got {weight!r}")
        P.add_scaled_(self._sum, delta, weight)
        self._weight += float(weight)
        self._count += 1

    def merge(self, other: Accumulator) -> None:
        if not isinstance(other, WeightedMean):
            raise TypeError(f"cannot merge {type(other).__name__} into WeightedMean")
        if other._count:
            P.add_scaled_(self._sum, other._sum, 1.0)
            self._weight += other._weight
            self._count += other._count

    def result(self) -> Aggregate:
        """The weighted mean delta.

        Raises:
            ValueError: no update was added.
        """
        if self._count == 0:
            raise ValueError("cannot aggregate a round with no updates")
        return Aggregate(
            delta=P.scale(self._sum, 1.0 / self._weight),
            total_weight=self._weight,
            count=self._count,
        )


@runtime_checkable
class Strategy(Protocol):
    """A server-side aggregation rule.

    ``device_mu`` is the FedProx proximal coefficient the strategy asks every
    device to train with (0 for all but FedProx).

    Strategies also carry two flags that are not part of this protocol (so
    that a user's own strategy need not define them; read them with
    ``getattr`` defaults): ``needs_every_update`` (default False: the
    accumulator keeps every update, O(cohort x model) memory, as the robust
    rules do) and ``secagg_compatible`` (default True: the strategy works on
    the sum of updates that secure aggregation reveals).
    """

    @property
    def name(self) -> str:
        """The strategy's CLI name."""
        ...

    @property
    def device_mu(self) -> float:
        """The FedProx proximal coefficient devices train with (0: none)."""
        ...

    def init(self, params: Params) -> ServerState:
        """The state before round 1, holding a copy of ``params``."""
        ...

    def accumulator(self, template: Mapping[str, Array]) -> Accumulator:
        """An empty accumulator for updates shaped like ``template``."""
        ...

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        """The state after one round whose combined update is ``aggregate``."""
        ...
