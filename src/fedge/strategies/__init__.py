"""Aggregation strategies and the name registry used by the CLI and configs.

Names: ``fedavg``, ``fedavgm``, ``fedadagrad``, ``fedadam``, ``fedyogi``,
``fedprox``, and the robust rules of :mod:`fedge.strategies.robust`:
``median``, ``trimmed-mean[:BETA]``, ``krum``, ``multi-krum[:M]``, ``bulyan``,
``norm-bound:M[:INNER]``. A spec ``name:ARG`` sets the rule's main option
(``trimmed-mean:0.1`` is ``beta = 0.1``), and ``:KEY=VALUE`` parts after it
set any other option, as ``--strategy-option KEY=VALUE`` would
(``fedavgm:momentum=0.5``, ``median:bucket=2``). The robust rules' ``mix``
option takes a word, so it is only written in the spec: ``median:mix=nnm``,
``trimmed-mean:0.1:mix=nnm``. In ``norm-bound:M:INNER`` every part after
``M`` belongs to ``INNER`` (``norm-bound:1:median:mix=nnm``). Every strategy
passes the contract suite in ``tests/unit/test_strategies_contract.py``.

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


def parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """Split ``name[:ARG][:KEY=VALUE]...`` into the name, its argument text and its options.

    For ``norm-bound`` the argument is everything after the name
    (``M[:INNER]``, the inner spec with its own options) and the options are
    empty.

    Raises:
        UnknownNameError: no strategy of that name.
        ConfigError: an argument given to a name that takes none, an argument
            after an option, an empty part, an option without a name or a
            value, an option given twice, or a missing argument where one is
            required (``norm-bound:M``).
    """
    name, sep, rest = spec.partition(":")
    if name not in STRATEGIES:
        raise UnknownNameError("strategy", spec if not sep else name, list(STRATEGIES))
    if name == "norm-bound":
        if not sep:
            raise ConfigError("strategy 'norm-bound' needs its bound: norm-bound:M (an L2 norm), "
                              "optionally norm-bound:M:INNER")
        if not rest:
            raise ConfigError(f"strategy {spec!r}: empty argument after ':'")
        return name, rest, {}
    arg: str | None = None
    options: dict[str, str] = {}
    for i, part in enumerate(rest.split(":") if sep else []):
        if not part:
            raise ConfigError(f"strategy {spec!r}: empty argument after ':'")
        key, eq, value = part.partition("=")
        if not eq:
            if name not in _SPEC_ARGUMENT:
                raise ConfigError(f"strategy {name!r} takes no ':ARG', got {spec!r}; options are "
                                  "written KEY=VALUE")
            if i:
                raise ConfigError(f"strategy {spec!r}: the argument {part!r} must come first, "
                                  "before any KEY=VALUE")
            arg = part
            continue
        key = key.strip().replace("-", "_")
        if not key or not value:
            raise ConfigError(f"strategy {spec!r}: {part!r} is not KEY=VALUE")
        if key in options:
            raise ConfigError(f"strategy {spec!r} sets {key} twice")
        options[key] = value
    return name, arg, options


def _numeric_defaults(factory: Callable[..., Strategy]) -> dict[str, float]:
    sig = inspect.signature(factory)
    return {
        p.name: float(p.default) for p in sig.parameters.values()
        if isinstance(p.default, int | float) and not isinstance(p.default, bool)
    }


def _word_defaults(factory: Callable[..., Strategy]) -> dict[str, str]:
    """The options that take a word (``mix``): given only in the spec."""
    sig = inspect.signature(factory)
    return {p.name: p.default for p in sig.parameters.values() if isinstance(p.default, str)}


def _norm_bound_parts(arg: str) -> tuple[str, str]:
    bound, _, inner = arg.partition(":")
    return bound, inner or "fedavg"


def _check_inner(spec: str, inner: str) -> None:
    head = inner.partition(":")[0]
    if head == "norm-bound":
        raise ConfigError("norm-bound cannot wrap another norm-bound")
    if "=" in head:
        raise ConfigError(f"strategy {spec!r}: the part after M is the wrapped strategy, got "
                          f"{head!r}; norm-bound's own options (noise, seed) are strategy options")


def strategy_options(spec: str) -> dict[str, float]:
    """The numeric keyword options strategy ``spec`` takes, with their defaults.

    An option the spec itself sets (its ``:ARG`` or a ``:KEY=VALUE``) is left
    out, and so are the word options (``mix``), which only the spec sets. For
    ``norm-bound:M:INNER`` these are its own (``noise``, ``seed``) and the
    wrapped strategy's.
    """
    name, arg, in_spec = parse_spec(spec)
    own = _numeric_defaults(STRATEGIES[name])
    if arg is not None:
        own.pop(_SPEC_ARGUMENT[name], None)
    for key in in_spec:
        own.pop(key, None)
    if name == "norm-bound" and arg is not None:
        _, inner = _norm_bound_parts(arg)
        _check_inner(spec, inner)
        return {**strategy_options(inner), **own}
    return own


def _number(spec: str, what: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"strategy {spec!r}: {what} must be a number, got {text!r}") from None


def build_strategy(spec: str, options: Mapping[str, float] | None = None) -> Strategy:
    """Build strategy ``spec`` (``name[:ARG][:KEY=VALUE]...``) with keyword ``options``.

    Raises:
        UnknownNameError: no strategy of that name.
        ConfigError: an option the strategy does not take, an option set twice
            (by the spec and by ``options``), or a bad value.
    """
    name, arg, in_spec = parse_spec(spec)
    options = dict(options or {})
    if arg is not None and _SPEC_ARGUMENT[name] in options:
        raise ConfigError(
            f"strategy {spec!r} sets {_SPEC_ARGUMENT[name]} twice: by ':ARG' and as an option"
        )
    factory = STRATEGIES[name]
    numeric, words = _numeric_defaults(factory), _word_defaults(factory)
    for key in in_spec:
        if arg is not None and key == _SPEC_ARGUMENT[name]:
            raise ConfigError(f"strategy {spec!r} sets {key} twice: by ':ARG' and as {key}=")
        if key in options:
            raise ConfigError(f"strategy {spec!r} sets {key} twice: in the spec and as an option")
        if key not in numeric and key not in words:
            raise ConfigError(f"strategy {spec!r} takes no option {key!r}; its options: "
                              f"{', '.join([*numeric, *words])}")
    known = strategy_options(spec)
    for key in options:
        if key in words:
            raise ConfigError(f"strategy {spec!r}: option {key!r} takes a word, so it is written "
                              f"in the spec: {name}:{key}=...")
        if key not in known:
            raise ConfigError(
                f"strategy {spec!r} takes no option {key!r}; its options: {', '.join(known)}"
            )
    if name == "norm-bound":
        bound_text, inner_spec = _norm_bound_parts(arg or "")
        own = _numeric_defaults(norm_bound)
        inner_options = {k: v for k, v in options.items() if k not in own}
        if "seed" in options and "seed" in strategy_options(inner_spec):
            # One seed keys the run's randomness: the noise here, the inner rule's bucketing.
            inner_options["seed"] = options["seed"]
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
    kwargs: dict[str, float | str] = {}
    for key, text in in_spec.items():
        kwargs[key] = text if key in words else _number(spec, key, text)
    if arg is not None:
        key = _SPEC_ARGUMENT[name]
        kwargs[key] = _number(spec, key, arg)
    try:
        kwargs.update({k: float(v) for k, v in options.items()})
        return factory(**kwargs)
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
