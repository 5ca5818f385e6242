"""The Task protocol: what a user's learning problem must provide.

A task owns the model: it makes initial params, trains them on one device's
data and evaluates them. fedge owns everything around it (selection,
aggregation, encoding, transport), so a task never sees another device's data
or the network. Tasks are pure: randomness comes in as a generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from fedge.data.dataset import Dataset
from fedge.params import Params

__all__ = ["Task", "TrainConfig", "TrainResult"]


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyperparameters sent to a device for one round.

    Attributes:
        local_epochs: passes over the device's data.
        batch_size: examples per SGD step.
        lr: local learning rate.
        mu: FedProx proximal coefficient; the local objective gains
            ``mu / 2 * ||w - w_global||^2`` (Li et al., MLSys 2020). 0 is plain SGD.
    """

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    mu: float = 0.0

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not (np.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"mu must be a finite number >= 0, got {self.mu}")


@dataclass(frozen=True)
class TrainResult:
    """What local training returns: new params, the example count (the FedAvg weight), metrics."""

    params: Params
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """A learning problem. Built-in tasks live in :mod:`fedge.tasks`; users name theirs ``module:attr``."""

    def init_params(self, rng: np.random.Generator) -> Params:
        """Fresh model params, drawn from ``rng``."""
        ...

    def train(
        self, params: Params, data: Dataset, config: TrainConfig, rng: np.random.Generator
    ) -> TrainResult:
        """Train from ``params`` on ``data``; must not modify ``params`` in place.

        ``rng`` is this device's stream for this round and is valid only during
        the call (the simulator reuses one generator across devices): draw
        from it here, do not keep it.
        """
        ...

    def evaluate(self, params: Params, data: Dataset) -> dict[str, float]:
        """Metrics of ``params`` on ``data``; must include ``loss`` and ``accuracy``."""
        ...
