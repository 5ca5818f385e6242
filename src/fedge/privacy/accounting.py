"""Privacy accounting over Google's ``dp-accounting``: what a sequence of rounds has cost.

Every round that ran a DP mechanism is one immutable :class:`RoundEvent`;
:class:`Accountant` composes them with ``dp_accounting``'s RDP accountant
(the default: Mironov 2017; Poisson subsampling by Mironov, Talwar, Zhang
2019) or its PLD accountant (tighter, slower) and reports epsilon at a delta.
An event the chosen accountant cannot compose is an error, never zero cost.

How a round's devices were chosen decides which event describes it (see
docs/privacy.md, "Sampling honesty"):

``poisson``
    every device joined independently with probability ``sample_rate``:
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, add-or-remove-one
    neighbours. The sum of clipped updates has L2 sensitivity ``C``.
``fixed``
    exactly ``cohort`` of ``population`` devices, uniformly without
    replacement: ``SampledWithoutReplacementDpEvent`` (Wang, Balle,
    Kasiviswanathan 2019), which ``dp-accounting`` supports only for
    replace-one neighbours; replacing a device moves the sum by up to ``2C``,
    so the Gaussian's multiplier is ``z / 2``. RDP only.
``full``
    every device in every round (the simulator without ``--cohort`` or
    ``--sample-rate``): ``GaussianDpEvent(z)``, add or remove one.
``availability``
    a cohort of fixed size drawn from whichever devices are available (the
    coordinator): no amplification can be claimed, since nobody knows a
    device's chance of being picked, and a device that joins the pool can
    take the place of another in the cohort, moving the sum by up to ``2C``.
    So ``GaussianDpEvent(z / 2)`` every round, add or remove one: valid
    whatever availability does, and conservative.
``local``
    the device's own noised update seen by the coordinator: any two clipped
    updates differ by up to ``2C``, so ``GaussianDpEvent(z / 2)`` per round,
    replace-one, and no amplification (the coordinator sees who reported).

``dp_accounting`` costs about 1.5 s to import (it loads SciPy), so it is
imported inside the functions that need it, never at module import; the
agent never imports this module.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedge.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "SAMPLINGS",
    "Accountant",
    "LedgerEntry",
    "RoundEvent",
    "calibrate_noise_multiplier",
    "epsilon_for",
]

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed", "full", "availability", "local")
_REPLACE_ONE = frozenset({"fixed", "local"})
_NO_AMPLIFICATION = frozenset({"full", "availability", "local"})
#: PLD discretization of the privacy loss (dp-accounting's default is 1e-4); coarser is faster
#: and still a valid upper bound (the PLD accountant rounds pessimistically).
_PLD_DISCRETIZATION = 1e-3


@dataclass(frozen=True)
class RoundEvent:
    """One round's DP mechanism as the accountant sees it.

    Attributes:
        noise_multiplier: noise stddev over the clip norm (the nominal ``z``:
            adaptive clipping's correction is inside it, see
            :mod:`fedge.privacy.adaptive`).
        sampling: one of :data:`SAMPLINGS`.
        sample_rate: ``q`` for ``poisson``; ``cohort / population`` for
            ``fixed``; 1 for ``full`` and ``local``.
        population: devices selection drew from (``fixed`` only).
        cohort: devices drawn (``fixed`` only).
    """

    noise_multiplier: float
    sampling: str = "poisson"
    sample_rate: float = 1.0
    population: int | None = None
    cohort: int | None = None

    def __post_init__(self) -> None:
        z, q = self.noise_multiplier, self.sample_rate
        if isinstance(z, bool) or not isinstance(z, int | float) or not (math.isfinite(z) and z > 0):
            raise ConfigError(f"noise multiplier must be a positive finite number, got {z!r}")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"unknown sampling {self.sampling!r}; known: {', '.join(SAMPLINGS)}")
        if isinstance(q, bool) or not isinstance(q, int | float) or not (math.isfinite(q) and 0 < q <= 1):
            raise ConfigError(f"sample rate must be in (0, 1], got {q!r}")
        if self.sampling == "fixed":
            n, m = self.population, self.cohort
            if not (isinstance(n, int) and isinstance(m, int) and 1 <= m <= n):
                raise ConfigError(
                    f"fixed-size sampling needs 1 <= cohort <= population, got {m!r} of {n!r}"
                )
            object.__setattr__(self, "sample_rate", m / n)
        elif self.sampling in _NO_AMPLIFICATION and q != 1.0:
            raise ConfigError(f"{self.sampling!r} sampling claims no amplification: sample rate must be 1")

    @property
    def neighbours(self) -> str:
        """``replace_one`` or ``add_or_remove_one``: the neighbouring relation the event is valid for."""
        return "replace_one" if self.sampling in _REPLACE_ONE else "add_or_remove_one"

    def _key(self) -> tuple[Any, ...]:
        return (self.sampling, float(self.noise_multiplier), float(self.sample_rate),
                self.population, self.cohort)


@dataclass(frozen=True)
class LedgerEntry:
    """One round's line in the privacy ledger: the mechanism it ran and epsilon after it.

    The session writes these and the store keeps them (the completing transaction);
    :attr:`event` is what the accountant composes again after a restart.
    """

    round: int
    mode: str
    noise_multiplier: float
    sampling: str
    sample_rate: float
    population: int | None
    cohort: int | None
    clip_norm: float
    next_clip_norm: float
    epsilon: float
    delta: float

    @property
    def event(self) -> RoundEvent:
        return RoundEvent(self.noise_multiplier, sampling=self.sampling,
                          sample_rate=1.0 if self.sampling == "fixed" else self.sample_rate,
                          population=self.population, cohort=self.cohort)


def _dp_event(key: tuple[Any, ...]) -> Any:
    import dp_accounting

    sampling, z, q, population, cohort = key
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    if sampling == "fixed":
        return dp_accounting.SampledWithoutReplacementDpEvent(
            population, cohort, dp_accounting.GaussianDpEvent(z / 2.0)
        )
    if sampling == "full":
        return dp_accounting.GaussianDpEvent(z)
    return dp_accounting.GaussianDpEvent(z / 2.0)  # availability and local: sensitivity 2C


def _relation(neighbours: str) -> Any:
    import dp_accounting

    rel = dp_accounting.NeighboringRelation
    return rel.REPLACE_ONE if neighbours == "replace_one" else rel.ADD_OR_REMOVE_ONE


class _QuietNonConvergence(logging.Filter):
    """Drops dp-accounting's warning that a low RDP order did not converge.

    That order is then left out of the epsilon computation (the remaining
    orders still give a valid bound), and the warning repeats for every
    order of every calibration step: noise for the user, nothing to act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


_QUIET = _QuietNonConvergence()


@functools.lru_cache(maxsize=256)
def _rdp_of(key: tuple[Any, ...], neighbours: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """RDP orders and values of one event: composing T equal rounds is T times this vector."""
    from dp_accounting.rdp import RdpAccountant

    absl = logging.getLogger("absl")
    if _QUIET not in absl.filters:
        absl.addFilter(_QUIET)
    acc = RdpAccountant(neighboring_relation=_relation(neighbours))
    acc.compose(_dp_event(key))
    return tuple(acc.orders.tolist()), tuple(acc.rdp.tolist())


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


class Accountant:
    """Composes :class:`RoundEvent` s and answers epsilon at ``delta``.

    Repeated equal rounds are composed as one event with a count, and each
    distinct event's RDP vector is computed once, so epsilon after every
    one of 1,000 equal rounds costs well under a second (docs/benchmarks.md).

    Raises (from the constructor):
        ConfigError: an unknown accountant or a delta outside (0, 1).
    """

    def __init__(self, kind: str = "rdp", *, delta: float) -> None:
        if kind not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {kind!r}; known: {', '.join(ACCOUNTANTS)}")
        self.kind = kind
        self.delta = _check_delta(delta)

    def epsilon(self, events: Iterable[RoundEvent]) -> float:
        """Epsilon at :attr:`delta` after every event in ``events`` (0 for none).

        Raises:
            ConfigError: events mix neighbouring relations, or the accountant
                cannot compose one of them (PLD and fixed-size sampling).
        """
        return self.epsilon_of_counts(Counter(events))

    def epsilon_of_counts(self, counts: Mapping[RoundEvent, int]) -> float:
        """Epsilon after ``counts[e]`` rounds of each event ``e`` (what a running ledger keeps)."""
        return self._epsilon(Counter({e._key(): n for e, n in counts.items() if n}),
                             {e.neighbours for e, n in counts.items() if n})

    def epsilons(self, events: Sequence[RoundEvent]) -> list[float]:
        """Epsilon after each prefix of ``events``: the per-round curve."""
        counts: Counter[tuple[Any, ...]] = Counter()
        relations: set[str] = set()
        out = []
        for e in events:
            counts[e._key()] += 1
            relations.add(e.neighbours)
            out.append(self._epsilon(counts, relations))
        return out

    def _epsilon(self, counts: Counter[tuple[Any, ...]], relations: set[str]) -> float:
        if not counts:
            return 0.0
        if len(relations) > 1:
            raise ConfigError("a privacy ledger cannot mix add-or-remove and replace-one rounds")
        neighbours = next(iter(relations))
        if self.kind == "rdp":
            return self._rdp_epsilon(counts, neighbours)
        return self._pld_epsilon(counts, neighbours)

    def _rdp_epsilon(self, counts: Counter[tuple[Any, ...]], neighbours: str) -> float:
        from dp_accounting.rdp import rdp_privacy_accountant

        total: np.ndarray[Any, Any] | None = None
        orders: tuple[float, ...] = ()
        for key, n in counts.items():
            orders, rdp = _rdp_of(key, neighbours)
            vec = n * np.asarray(rdp)
            total = vec if total is None else total + vec
        eps, _ = rdp_privacy_accountant.compute_epsilon(orders, total, self.delta)
        return float(eps)

    def _pld_epsilon(self, counts: Counter[tuple[Any, ...]], neighbours: str) -> float:
        import dp_accounting
        from dp_accounting.pld import PLDAccountant

        acc = PLDAccountant(_relation(neighbours), value_discretization_interval=_PLD_DISCRETIZATION)
        for key, n in counts.items():
            event = _dp_event(key)
            try:
                acc.compose(event, n)
            except dp_accounting.UnsupportedEventError as e:
                raise ConfigError(
                    f"the PLD accountant cannot compose {key[0]!r} rounds; use the RDP accountant"
                ) from e
        return float(acc.get_epsilon(self.delta))



def epsilon_for(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                accountant: str = "rdp", sampling: str = "poisson") -> float:
    """Epsilon after ``rounds`` equal Poisson-subsampled Gaussian rounds (``fedge privacy epsilon``).

    Raises:
        ConfigError: any argument out of range.
    """
    _check_rounds(rounds)
    event = RoundEvent(noise_multiplier, sampling=sampling, sample_rate=sample_rate)
    return Accountant(accountant, delta=delta).epsilon([event] * rounds)


def _check_rounds(rounds: int) -> None:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an integer >= 1, got {rounds!r}")


def calibrate_noise_multiplier(*, target_epsilon: float, sample_rate: float, rounds: int, delta: float,
                               accountant: str = "rdp", sampling: str = "poisson",
                               population: int | None = None, cohort: int | None = None,
                               tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``tolerance``, relative) whose epsilon is <= ``target_epsilon``.

    Bisection in log space over ``[0.01, 1000]``; the answer errs on the
    noisy side, so its epsilon never exceeds the target.

    Raises:
        ConfigError: an argument out of range, or a target no multiplier in
            that range reaches.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, int | float) or not (
        math.isfinite(target_epsilon) and target_epsilon > 0
    ):
        raise ConfigError(f"target epsilon must be a positive finite number, got {target_epsilon!r}")
    if not (math.isfinite(tolerance) and 0 < tolerance < 1):
        raise ConfigError(f"tolerance must be in (0, 1), got {tolerance!r}")
    _check_rounds(rounds)
    acc = Accountant(accountant, delta=delta)
    rate = 1.0 if sampling in _NO_AMPLIFICATION else sample_rate

    def eps(z: float) -> float:
        event = RoundEvent(z, sampling=sampling, sample_rate=rate, population=population, cohort=cohort)
        return acc.epsilon([event] * rounds)

    lo, hi = 0.01, 1000.0
    if eps(hi) > target_epsilon:
        raise ConfigError(
            f"no noise multiplier up to {hi:g} reaches epsilon {target_epsilon:g} in {rounds} rounds "
            f"at delta {delta:g}"
        )
    if eps(lo) <= target_epsilon:
        return lo
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
