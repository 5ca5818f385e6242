"""Aggregation strategies and the name registry used by the CLI and configs.

Names: ``fedavg``, ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``,
``fedprox``, and the robust rules of :mod:`fedge.strategies.robust`:
``median``, ``trimmed-mean[:BETA]``, ``krum``, ``multi-krum[:M]``, ``bulyan``,
``norm-bound:M[:INNER]``. A spec ``name:ARG`` sets the rule's main option
(``trimmed-mean:0.1`` is ``beta = 0.1``). Every strategy passes the contract
suite in ``tests/unit/test_strategies_contract.py``.

Every strategy also says two things others read with ``getattr`` defaults:
``needs_every_update`` (its accumulator keeps every update, memory
O(cohort x model); default False) and ``secagg_compatible`` (it can work on
the sum that secure aggregation reveals; default True).
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
from fedge.strategies.robust import (
    NormBound,
    RobustStrategy,
    UpdateStack,
    bulyan,
    krum,
    median,
    multi_krum,
    norm_bound,
    trimmed_mean,
)

__all__ = [
    "STRATEGIES",
    "Accumulator",
    "Aggregate",
    "FedOpt",
    "NormBound",
    "RobustStrategy",
    "ServerState",
    "Strategy",
    "UpdateStack",
    "WeightedMean",
    "build_strategy",
    "bulyan",
    "check_cohort",
    "check_secure_aggregation",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedprox",
    "fedyogi",
    "krum",
    "median",
    "min_updates",
    "multi_krum",
    "norm_bound",
    "parse_spec",
    "strategy_options",
    "trimmed_mean",
]

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": fedavg,
    "fedavgm": fedavgm,
    "fedadagrad": fedadagrad,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
    "fedprox": fedprox,
    "median": median,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "norm-bound": norm_bound,
}

# The option a spec's ``:ARG`` sets, for the names that take one.
_SPEC_ARGUMENT = {"trimmed-mean": "beta", "multi-krum": "m", "norm-bound": "bound"}


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``name[:ARG]`` into the registered name and its argument text.

    Raises:
        UnknownNameError: no strategy of that name.
        ConfigError: an argument given to a name that takes none, or a
            missing one where it is required (``norm-bound:M``).
    """
    name, sep, arg = spec.partition(":")
    if name not in STRATEGIES:
        raise UnknownNameError("strategy", spec if not sep else name, list(STRATEGIES))
    if sep and name not in _SPEC_ARGUMENT:
        raise ConfigError(f"strategy {name!r} takes no ':ARG', got {spec!r}")
    if sep and not arg:
        raise ConfigError(f"strategy {spec!r}: empty argument after ':'")
    if name == "norm-bound" and not sep:
        raise ConfigError("strategy 'norm-bound' needs its bound: norm-bound:M (an L2 norm), "
                          "optionally norm-bound:M:INNER")
    return name, (arg if sep else None)


def _numeric_defaults(factory: Callable[..., Strategy]) -> dict[str, float]:
    sig = inspect.signature(factory)
    return {
        p.name: float(p.default) for p in sig.parameters.values()
        if isinstance(p.default, int | float) and not isinstance(p.default, bool)
    }


def _norm_bound_parts(arg: str) -> tuple[str, str]:
    bound, _, inner = arg.partition(":")
    return bound, inner or "fedavg"


def strategy_options(spec: str) -> dict[str, float]:
    """The keyword options strategy ``spec`` takes, with their defaults.

    An option its ``:ARG`` sets is left out. For ``norm-bound:M:INNER``
    these are its own (``noise``, ``seed``) and the wrapped strategy's.
    """
    name, arg = parse_spec(spec)
    own = _numeric_defaults(STRATEGIES[name])
    if arg is not None:
        own.pop(_SPEC_ARGUMENT[name], None)
    if name == "norm-bound" and arg is not None:
        _, inner = _norm_bound_parts(arg)
        if inner.partition(":")[0] == "norm-bound":
            raise ConfigError("norm-bound cannot wrap another norm-bound")
        return {**strategy_options(inner), **own}
    return own


def _number(spec: str, what: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"strategy {spec!r}: {what} must be a number, got {text!r}") from None


def build_strategy(spec: str, options: Mapping[str, float] | None = None) -> Strategy:
    """Build strategy ``spec`` (``name`` or ``name:ARG``) with keyword ``options``.

    Raises:
        UnknownNameError: no strategy of that name.
        ConfigError: an option the strategy does not take, an option set both
            by ``:ARG`` and by ``options``, or a bad value.
    """
    name, arg = parse_spec(spec)
    options = dict(options or {})
    if arg is not None and _SPEC_ARGUMENT[name] in options:
        raise ConfigError(
            f"strategy {spec!r} sets {_SPEC_ARGUMENT[name]} twice: by ':ARG' and as an option"
        )
    known = strategy_options(spec)
    for key in options:
        if key not in known:
            raise ConfigError(
                f"strategy {spec!r} takes no option {key!r}; its options: {', '.join(known)}"
            )
    if name == "norm-bound":
        bound_text, inner_spec = _norm_bound_parts(arg or "")
        own = _numeric_defaults(norm_bound)
        inner_options = {k: v for k, v in options.items() if k not in own}
        inner = build_strategy(inner_spec, inner_options)
        try:
            return norm_bound(
                bound=_number(spec, "M (the bound)", bound_text), inner=inner,
                **{k: float(v) for k, v in options.items() if k in own},
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"strategy {spec!r}: {e}") from e
    if arg is not None:
        key = _SPEC_ARGUMENT[name]
        options[key] = _number(spec, key, arg)
    try:
        return STRATEGIES[name](**{k: float(v) for k, v in options.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"strategy {name!r}: {e}") from e


def min_updates(strategy: Strategy) -> int:
    """The fewest updates a round of ``strategy`` needs (1 for all but the robust rules)."""
    return int(getattr(strategy, "min_updates", 1))


def check_cohort(strategy: Strategy, n: int, *, what: str = "the cohort") -> None:
    """Refuse ``n`` updates per round if ``strategy``'s condition on malicious devices fails.

    Raises:
        ConfigError: the robust rule's f-condition does not hold for ``n``.
    """
    check = getattr(strategy, "check_cohort", None)
    if check is not None:
        check(n, what=what)


def check_secure_aggregation(strategy: Strategy) -> None:
    """Refuse a strategy that cannot work on the sum secure aggregation reveals.

    Raises:
        ConfigError: the strategy reads individual updates (median, trimmed
            mean, Krum, Multi-Krum, Bulyan), which secure aggregation hides.
    """
    if not getattr(strategy, "secagg_compatible", True):
        raise ConfigError(
            f"strategy {strategy.name!r} cannot be combined with secure aggregation: it needs "
            "every device's individual update, and secure aggregation shows the coordinator "
            "only their sum; of the robust rules only norm-bound:M composes with it"
        )
