"""Aggregation strategies and the name registry used by the CLI and configs.

Names: ``fedavg``, ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``,
``fedprox``. Every strategy passes the contract suite in
``tests/unit/test_strategies_contract.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

from fedge.errors import ConfigError, UnknownNameError
from fedge.strategies.base import Accumulator, Aggregate, ServerState, Strategy, WeightedMean
from fedge.strategies.fedopt import (
    FedOpt,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedprox,
    fedyogi,
)

__all__ = [
    "STRATEGIES",
    "Accumulator",
    "Aggregate",
    "FedOpt",
    "ServerState",
    "Strategy",
    "WeightedMean",
    "build_strategy",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedyogi",
    "strategy_options",
]

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": fedavg,
    "fedavgm": fedavgm,
    "fedadagrad": fedadagrad,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedprox": fedprox,
}


def strategy_options(name: str) -> dict[str, float]:
    """The keyword options strategy ``name`` takes, with their defaults."""
    if name not in STRATEGIES:
        raise UnknownNameError("strategy", name, list(STRATEGIES))
    sig = inspect.signature(STRATEGIES[name])
    return {p.name: float(p.default) for p in sig.parameters.values()}


def build_strategy(name: str, options: Mapping[str, float] | None = None) -> Strategy:
    """Build strategy ``name`` with keyword ``options`` (e.g. ``{"server_lr": 0.1}``).

    Raises:
        UnknownNameError: no strategy of that name.
        ConfigError: an option the strategy does not take, or a bad value.
    """
    known = strategy_options(name)
    options = dict(options or {})
    for key in options:
        if key not in known:
            raise ConfigError(
                f"strategy {name!r} takes no option {key!r}; its options: {', '.join(known)}"
            )
    try:
        return STRATEGIES[name](**{k: float(v) for k, v in options.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"strategy {name!r}: {e}") from e
