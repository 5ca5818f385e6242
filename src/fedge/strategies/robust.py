"""Robust aggregation: rules that bound what a few malicious devices can do to a round.

FedAvg's mean lets one device move the model anywhere: a single update
scaled by 1e6 is the whole aggregate. The rules here replace the mean:

* ``median``: the coordinate-wise median (Yin et al., "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML 2018).
* ``trimmed-mean[:BETA]``: per coordinate, drop the ``floor(BETA * n)``
  largest and smallest values and average the rest (Yin et al. 2018).
* ``krum``: the update closest to its ``n - f - 2`` nearest neighbours
  (Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent", NeurIPS 2017).
* ``multi-krum[:M]``: the mean of the ``M`` updates of best Krum score
  (Blanchard et al. 2017; ``M = n - f`` by default).
* ``bulyan``: Krum applied again and again to pick ``n - 2f`` updates, then
  per coordinate the mean of the ``n - 4f`` values closest to their median
  (El Mhamdi et al., "The Hidden Vulnerability of Distributed Learning in
  Byzantium", ICML 2018).
* ``norm-bound:M``: clip every update to L2 norm ``M`` before another
  strategy (FedAvg by default) aggregates it, optionally adding a little
  Gaussian noise to the aggregate (Sun et al., "Can You Really Backdoor
  Federated Learning?", 2019).

**Mixing first.** Every rule but norm bounding takes an optional
pre-aggregation step from :mod:`fedge.strategies.mixing`: ``mix=nnm``
(nearest-neighbour mixing, Allouah et al. 2023) or ``bucket=S`` (bucketing,
Karimireddy et al. 2022), written in the spec (``median:mix=nnm``,
``trimmed-mean:0.4:bucket=2``). The rule then combines mixtures of the
updates instead of the updates; the step adds its own condition on ``f``
(:attr:`RobustRule.condition` states both). Rules read updates through one
view (:class:`_Updates`), which mixes a block of coordinates when the rule
reads it, so mixing never holds a second copy of every update. Neither step
is on by default: see :mod:`fedge.strategies.mixing` for why.

**The number of malicious devices f.** Each rule but norm bounding holds
only while the malicious devices in a round are few enough; the rule takes
``f`` (how many it must tolerate per round) as an option, states its
condition on the number of updates ``n`` (:attr:`RobustStrategy.condition`)
and refuses a cohort that breaks it: :meth:`RobustStrategy.check_cohort` at
configuration time, and :meth:`UpdateStack.result` on a round that ended with
too few updates. The simulator and the coordinator also ask each round for
:attr:`RobustStrategy.min_updates` updates, so such a round is abandoned
rather than aggregated without its guarantee.

**Example weights.** Devices report their own example counts, so a malicious
device can claim any weight it likes. The rules that keep every update
therefore give each device one equal vote and ignore the weights (the
aggregate's ``total_weight`` is still their sum, for the record); norm
bounding keeps the wrapped strategy's weighting (FedAvg: weighted by example
count), which the docs point out.

**Memory.** The rules that need every update at once keep them:
:class:`UpdateStack` holds O(cohort x model) values (one flat copy of each
update in the params' dtype), unlike FedAvg's O(model) running sum. Partial
stacks from several workers merge by concatenation, so the ``processes``
backend works unchanged. The coordinate-wise rules then work on column
blocks of a few MB, so aggregation adds O(cohort x block) memory, not a
second copy of every update.

**Secure aggregation.** These rules read individual updates, which secure
aggregation hides from the coordinator; only norm bounding composes with it
(``secagg_compatible``), by clipping on the device before masking.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from fedge import params as P
from fedge.errors import ConfigError
from fedge.params import Array, Params, ParamsSpec
from fedge.strategies.base import Accumulator, Aggregate, ServerState, Strategy
from fedge.strategies.fedopt import FedOpt, fedavg
from fedge.strategies.mixing import Bucketing, Mixing, NearestNeighbourMixing, Weights

__all__ = [
    "MIX_CHOICES",
    "Bulyan",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBound",
    "RobustRule",
    "RobustStrategy",
    "TrimmedMean",
    "UpdateStack",
    "bulyan",
    "krum",
    "median",
    "multi_krum",
    "norm_bound",
    "trimmed_mean",
]

Flat = npt.NDArray[np.floating[Any]]

# Coordinate-wise rules work on blocks of this many coordinates at a time:
# a block of 100 updates is 6.4 MB in float32, which stays in cache-friendly
# sizes and bounds the extra memory whatever the model size.
_BLOCK = 1 << 14


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _map_blocks(fn: Callable[[int, int], Any], size: int, block: int = _BLOCK) -> list[Any]:
    """``fn(start, stop)`` over consecutive blocks of ``range(size)``, on up to 4 threads.

    numpy releases the GIL in partition, sort, copies and matmul, so blocks
    run in parallel on a multi-core coordinator; each block writes only its
    own slice of the output.
    """
    bounds = [(s, min(s + block, size)) for s in range(0, size, block)]
    threads = min(_usable_cores(), 4, len(bounds))
    if threads <= 1:
        return [fn(a, b) for a, b in bounds]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda ab: fn(*ab), bounds))


def _check_f(f: float) -> int:
    if not (math.isfinite(f) and f >= 0 and f == int(f)):
        raise ValueError(f"f (malicious devices to tolerate) must be an integer >= 0, got {f!r}")
    return int(f)


# --- the updates, as the rules see them --------------------------------------------------


def _gram(rows: Sequence[Flat]) -> npt.NDArray[np.float64]:
    """The Gram matrix of the rows, each block centred on its coordinate mean first.

    One matrix product (BLAS) per block instead of n^2 / 2 passes over the
    model. Centring does not change distances, and keeps the subtraction in
    ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` from cancelling away the digits that
    matter when updates share a large common part.
    """
    n = len(rows)

    def block(a: int, b: int) -> npt.NDArray[np.float64]:
        m = np.stack([r[a:b] for r in rows])
        m -= m.mean(axis=0, dtype=np.float64).astype(m.dtype)
        return (m @ m.T).astype(np.float64)

    gram = np.zeros((n, n), dtype=np.float64)
    for part in _map_blocks(block, rows[0].size, block=_BLOCK * 4):
        gram += part
    return gram


class _Updates:
    """The updates a rule combines: the kept rows, or mixtures of them (``weights @ rows``).

    Every rule reads updates only through this view. Without mixing it hands
    out the rows themselves. With a mixing matrix ``weights`` (``k x n``, rows
    summing to 1) it stands for the ``k`` mixtures without holding them: a
    block of coordinates is mixed (one small matrix product) when a rule
    reads it, and distances between mixtures come from the rows' Gram matrix
    (``W G W^T``), so mixing adds O(k x block) memory, not a copy per update.
    """

    def __init__(self, rows: Sequence[Flat], weights: Weights | None = None,
                 cache: dict[str, npt.NDArray[np.float64]] | None = None) -> None:
        self.rows = rows
        self.weights = weights
        # The rows' Gram matrix, shared by every view of the same rows: mixing
        # and then a distance rule (krum:mix=nnm) pass over the model once.
        self._cache = {} if cache is None else cache

    @property
    def count(self) -> int:
        return len(self.rows) if self.weights is None else int(self.weights.shape[0])

    @property
    def size(self) -> int:
        return int(self.rows[0].size)

    def mixed(self, weights: Weights) -> _Updates:
        """The ``weights.shape[0]`` mixtures of these updates that ``weights`` defines."""
        return _Updates(self.rows, weights if self.weights is None else weights @ self.weights,
                        self._cache)

    def select(self, chosen: Sequence[int]) -> _Updates:
        """Only the updates ``chosen`` (indices into this view)."""
        if self.weights is None:
            return _Updates([self.rows[i] for i in chosen])
        return _Updates(self.rows, self.weights[list(chosen)], self._cache)

    def columns(self, start: int, stop: int) -> Flat:
        """Coordinates ``start:stop`` of every update, one coordinate per row.

        Shape (stop - start, count), a fresh array in the rows' dtype, which
        the caller may sort in place.
        """
        m = np.stack([r[start:stop] for r in self.rows], axis=1)
        if self.weights is None:
            return m
        return m @ np.ascontiguousarray(self.weights.T, dtype=m.dtype)

    def sorted_columns(self, start: int, stop: int) -> Flat:
        """:meth:`columns`, each row sorted.

        A full sort of short rows beats ``partition`` here: numpy sorts float
        rows with SIMD kernels, while partitioning at two positions (the two
        middle values) runs a scalar selection twice per row (1M rows of 100:
        0.1 s against 1.3 s of CPU).
        """
        m = self.columns(start, stop)
        m.sort(axis=1)
        return m

    def sq_distances(self) -> npt.NDArray[np.float64]:
        """Squared L2 distances between every two updates, from the Gram matrix.

        The result is made exactly symmetric, so two updates that are each
        other's nearest neighbours get identical scores.
        """
        if "gram" not in self._cache:
            self._cache["gram"] = _gram(self.rows)
        gram = self._cache["gram"]
        if self.weights is not None:
            # Rows of W sum to 1, so W (X - mean) = W X - mean: still centred.
            gram = self.weights @ gram @ self.weights.T
        sq = np.diag(gram).copy()
        d = sq[:, None] + sq[None, :] - 2.0 * gram
        d = (d + d.T) * 0.5
        np.maximum(d, 0.0, out=d)
        np.fill_diagonal(d, 0.0)
        return d

    def _part(self, i: int, start: int, stop: int) -> Flat:
        if self.weights is None:
            return self.rows[i][start:stop]
        w = self.weights[i]
        out = np.zeros(stop - start, dtype=np.float64)
        for j in np.flatnonzero(w).tolist():
            out += w[j] * self.rows[j][start:stop]
        return out

    def compare(self, i: int, j: int) -> int:
        """Updates ``i`` and ``j`` in lexicographic order of their values (-1, 0 or 1)."""
        for a in range(0, self.size, _BLOCK):
            b = min(a + _BLOCK, self.size)
            x, y = self._part(i, a, b), self._part(j, a, b)
            diff = np.flatnonzero(x != y)
            if diff.size:
                return -1 if x[diff[0]] < y[diff[0]] else 1
        return 0

    def digests(self) -> list[bytes]:
        """BLAKE2b of each row's bytes (hashlib releases the GIL: rows hash in parallel)."""
        if self.weights is not None:
            raise ValueError("digests are of the kept updates, not of mixtures")
        threads = min(_usable_cores(), 4, len(self.rows))

        def one(row: Flat) -> bytes:
            return hashlib.blake2b(np.ascontiguousarray(row).data, digest_size=16).digest()

        if threads <= 1:
            return [one(r) for r in self.rows]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(one, self.rows))

    def mean_of(self, chosen: Sequence[int]) -> npt.NDArray[np.float64]:
        """The mean of the updates ``chosen``, as float64."""
        out = np.zeros(self.size, dtype=np.float64)
        if self.weights is None:
            for i in chosen:
                out += self.rows[i]
            out /= len(chosen)
            return out
        coef = self.weights[list(chosen)].mean(axis=0)
        for j in np.flatnonzero(coef).tolist():
            out += coef[j] * self.rows[j]
        return out


# --- the rules -----------------------------------------------------------------------


class RobustRule:
    """A rule that combines every update at once: its f-condition and its math.

    A rule may take a mixing step (``mixing``, from :mod:`fedge.strategies.mixing`):
    it then combines the mixtures, and its condition is the step's together
    with its own, counted on the mixtures (a bucketed median needs ``2f + 1``
    buckets). Each rule states its own condition in :meth:`_condition`,
    :meth:`_fewest` and :meth:`_holds`; this class composes them with the step's.
    """

    name: ClassVar[str]
    f: int
    mixing: Mixing | None

    def _condition(self) -> str:
        """The rule's own condition on the ``n`` values it combines."""
        raise NotImplementedError

    def _fewest(self) -> int:
        """The fewest values for which the rule's own condition holds."""
        raise NotImplementedError

    def _holds(self, n: int) -> bool:
        return n >= self._fewest()

    def _combine(self, updates: _Updates) -> npt.NDArray[np.float64]:
        """The rule applied to ``updates`` (kept updates or mixtures), as float64."""
        raise NotImplementedError

    @property
    def condition(self) -> str:
        """The condition on ``n`` (updates) and ``f``, the mixing step's included, as shown in errors."""
        own = self._condition()
        return own if self.mixing is None else self.mixing.condition(own)

    @property
    def min_updates(self) -> int:
        """The fewest updates for which :attr:`condition` holds."""
        if self.mixing is None:
            return self._fewest()
        return max(self.mixing.min_inputs(self.f), self.mixing.inputs_for(self._fewest()))

    def holds(self, n: int) -> bool:
        """Whether the condition holds for ``n`` updates."""
        if self.mixing is None:
            return self._holds(n)
        return n >= self.mixing.min_inputs(self.f) and self._holds(self.mixing.outputs(n))

    def combine(self, rows: Sequence[Flat]) -> npt.NDArray[np.float64]:
        """The robust aggregate of ``rows`` (flat updates), mixed first if the rule says so."""
        updates = _Updates(rows)
        if self.mixing is not None:
            updates = updates.mixed(self.mixing.weights(updates, self.f))
        return self._combine(updates)


@dataclass(frozen=True)
class Median(RobustRule):
    """Coordinate-wise median: holds while malicious devices are a minority, n >= 2f + 1."""

    f: int = 0
    mixing: Mixing | None = None
    name: ClassVar[str] = "median"

    def _condition(self) -> str:
        return "n >= 2f + 1 (malicious devices a minority of every coordinate's values)"

    def _fewest(self) -> int:
        return 2 * self.f + 1

    def _combine(self, updates: _Updates) -> npt.NDArray[np.float64]:
        n = updates.count
        out = np.empty(updates.size, dtype=np.float64)
        lo, hi = (n - 1) // 2, n // 2

        def block(a: int, b: int) -> None:
            m = updates.sorted_columns(a, b)
            np.add(m[:, lo], m[:, hi], out=out[a:b], dtype=np.float64)
            out[a:b] *= 0.5

        _map_blocks(block, out.size)
        return out


@dataclass(frozen=True)
class TrimmedMean(RobustRule):
    """Coordinate-wise trimmed mean: drop ``k = floor(beta * n)`` values at each end.

    The f malicious values of a coordinate may all sit at one end, so the
    rule needs ``k >= f`` at each end: ``floor(beta * n) >= f``.
    """

    beta: float = 0.2
    f: int = 0
    mixing: Mixing | None = None
    name: ClassVar[str] = "trimmed-mean"

    def trimmed(self, n: int) -> int:
        # The epsilon keeps 0.29 * 100 = 28.999999999999996 at 29.
        return math.floor(self.beta * n + 1e-9)

    def _condition(self) -> str:
        return f"floor(beta * n) >= f (beta {self.beta:g}: at least f values trimmed at each end)"

    def _fewest(self) -> int:
        if self.f == 0:
            return 1
        n = max(1, math.ceil(self.f / self.beta - 1e-9))
        while self.trimmed(n) < self.f:
            n += 1
        return n

    def _holds(self, n: int) -> bool:
        return self.trimmed(n) >= self.f

    def _combine(self, updates: _Updates) -> npt.NDArray[np.float64]:
        n = updates.count
        k = self.trimmed(n)
        out = np.empty(updates.size, dtype=np.float64)

        def block(a: int, b: int) -> None:
            m = updates.sorted_columns(a, b) if k else updates.columns(a, b)
            np.sum(m[:, k : n - k], axis=1, dtype=np.float64, out=out[a:b])

        _map_blocks(block, out.size)
        out /= n - 2 * k
        return out


def _ranked(scores: npt.NDArray[np.float64], updates: _Updates, among: Sequence[int]) -> list[int]:
    """``among`` sorted by score; equal scores by the updates' values, so order never matters."""

    def compare(i: int, j: int) -> int:
        if scores[i] != scores[j]:
            return -1 if scores[i] < scores[j] else 1
        return updates.compare(i, j)

    return sorted(among, key=functools.cmp_to_key(compare))


def _krum_scores(d: npt.NDArray[np.float64], among: Sequence[int], f: int) -> npt.NDArray[np.float64]:
    """Krum scores over the updates ``among``: the sum of squared distances to the
    ``len(among) - f - 2`` nearest others (none left: every score is 0)."""
    idx = np.asarray(among)
    sub = d[np.ix_(idx, idx)].copy()
    np.fill_diagonal(sub, np.inf)
    k = min(max(len(idx) - f - 2, 0), len(idx) - 1)
    scores = np.zeros(d.shape[0], dtype=np.float64)
    if k:
        # Sorted before summing, so a score does not depend on the updates' order.
        scores[idx] = np.sort(sub, axis=1)[:, :k].sum(axis=1)
    return scores


@dataclass(frozen=True)
class Krum(RobustRule):
    """Krum: the one update whose ``n - f - 2`` nearest neighbours are closest; n >= 2f + 3."""

    f: int = 0
    mixing: Mixing | None = None
    name: ClassVar[str] = "krum"

    def _condition(self) -> str:
        return "n >= 2f + 3"

    def _fewest(self) -> int:
        return 2 * self.f + 3

    def _combine(self, updates: _Updates) -> npt.NDArray[np.float64]:
        among = range(updates.count)
        scores = _krum_scores(updates.sq_distances(), among, self.f)
        return updates.mean_of(_ranked(scores, updates, among)[:1])


@dataclass(frozen=True)
class MultiKrum(RobustRule):
    """Multi-Krum: the mean of the ``m`` updates of best Krum score; n >= 2f + 3, m <= n - f.

    ``m = 0`` means ``n - f``, the most updates that can all be honest. More
    than ``n - f`` would average at least ``m - (n - f)`` malicious updates in
    the worst case, so it is refused.
    """

    m: int = 0
    f: int = 0
    mixing: Mixing | None = None
    name: ClassVar[str] = "multi-krum"

    def chosen(self, n: int) -> int:
        return self.m or n - self.f

    def _condition(self) -> str:
        return "n >= 2f + 3" + (f" and n >= m + f (m {self.m})" if self.m else "")

    def _fewest(self) -> int:
        return max(2 * self.f + 3, self.m + self.f)

    def _combine(self, updates: _Updates) -> npt.NDArray[np.float64]:
        among = range(updates.count)
        scores = _krum_scores(updates.sq_distances(), among, self.f)
        best = _ranked(scores, updates, among)[: self.chosen(updates.count)]
        return updates.mean_of(sorted(best))


@dataclass(frozen=True)
class Bulyan(RobustRule):
    """Bulyan: Krum picks ``theta = n - 2f`` updates one by one, then per coordinate
    the mean of the ``theta - 2f`` values closest to the median; n >= 4f + 3."""

    f: int = 0
    mixing: Mixing | None = None
    name: ClassVar[str] = "bulyan"

    def _condition(self) -> str:
        return "n >= 4f + 3"

    def _fewest(self) -> int:
        return 4 * self.f + 3

    def _combine(self, updates: _Updates) -> npt.NDArray[np.float64]:
        n, f = updates.count, self.f
        d = updates.sq_distances()
        left = list(range(n))
        picked: list[int] = []
        for _ in range(n - 2 * f):
            scores = _krum_scores(d, left, f)
            best = _ranked(scores, updates, left)[0]
            picked.append(best)
            left.remove(best)
        # The coordinate step sorts each coordinate's values, so the order of
        # the picked updates does not matter.
        sel = updates.select(picked)
        theta = sel.count
        beta = theta - 2 * f
        lo, hi = (theta - 1) // 2, theta // 2
        out = np.empty(updates.size, dtype=np.float64)

        def block(a: int, b: int) -> None:
            s = sel.sorted_columns(a, b).astype(np.float64)
            med = (s[:, lo] + s[:, hi]) * 0.5
            # The beta values nearest the median are a run of beta neighbours
            # in sorted order: of the theta - beta + 1 runs, the one whose
            # farthest value is nearest the median (ties: the lower run).
            runs = theta - beta + 1
            reach = np.maximum(med[:, None] - s[:, :runs], s[:, beta - 1 :] - med[:, None])
            start = np.argmin(reach, axis=1)
            sums = np.zeros((s.shape[0], theta + 1), dtype=np.float64)
            np.cumsum(s, axis=1, out=sums[:, 1:])
            rows_at = np.arange(s.shape[0])
            out[a:b] = (sums[rows_at, start + beta] - sums[rows_at, start]) / beta

        _map_blocks(block, out.size)
        return out


# --- the accumulator that keeps every update -------------------------------------------


class UpdateStack:
    """Keeps every update (memory O(count x model)) for a rule that needs them all at once.

    Each update is stored once, flattened into the params' common dtype and
    made read-only; :meth:`merge` concatenates another stack's updates (they
    are shared, never modified). :meth:`result` gives each device an equal
    vote: example weights are summed for the record but do not weigh the
    updates (see the module docstring for why).
    """

    def __init__(self, template: Mapping[str, Array], rule: RobustRule) -> None:
        self._spec = ParamsSpec.of(template)
        # Shape-only stand-ins (no memory) to check each update's structure against.
        self._shapes = {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) for k, v in template.items()}
        self._dtype = np.result_type(*template.values()) if template else np.dtype(np.float32)
        self._rows: list[Flat] = []
        self._weight = 0.0
        self.rule = rule

    @property
    def count(self) -> int:
        return len(self._rows)

    @property
    def total_weight(self) -> float:
        return self._weight

    def add(self, delta: Mapping[str, Array], weight: float) -> None:
        """Keep one device's ``delta``; ``weight`` is recorded, not used to weigh it.

        Raises:
            ValueError: ``weight`` is not a positive finite number, or
                ``delta`` differs from the template in names or shapes.
        """
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"update weight must be a positive finite number, got {weight!r}")
        P.check_same_structure(self._shapes, delta)
        row = P.flatten(delta, dtype=self._dtype)
        row.flags.writeable = False
        self._rows.append(row)
        self._weight += float(weight)

    def merge(self, other: Accumulator) -> None:
        """Append every update ``other`` kept (concatenation; ``other`` is left as it was)."""
        if not isinstance(other, UpdateStack):
            raise TypeError(f"cannot merge {type(other).__name__} into UpdateStack")
        if other._spec != self._spec:
            raise ValueError("cannot merge updates of another params structure")
        self._rows.extend(other._rows)
        self._weight += other._weight

    def result(self) -> Aggregate:
        """The rule's aggregate of every kept update.

        Raises:
            ValueError: no update was added, or fewer than the rule's
                f-condition needs.
        """
        n = len(self._rows)
        if n == 0:
            raise ValueError("cannot aggregate a round with no updates")
        rule = self.rule
        if not rule.holds(n):
            raise ValueError(
                f"{rule.name} with f={rule.f} needs {rule.condition}: at least "
                f"{rule.min_updates} updates, got {n}"
            )
        flat = rule.combine(self._rows)
        return Aggregate(delta=P.unflatten(flat, self._spec), total_weight=self._weight, count=n)


# --- strategies ----------------------------------------------------------------------


@dataclass(frozen=True)
class RobustStrategy:
    """A robust rule, then FedAvg's server step ``x += server_lr * aggregate``."""

    rule: RobustRule
    server: FedOpt

    needs_every_update: ClassVar[bool] = True
    secagg_compatible: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def device_mu(self) -> float:
        return 0.0

    @property
    def f(self) -> int:
        return self.rule.f

    @property
    def condition(self) -> str:
        return self.rule.condition

    @property
    def min_updates(self) -> int:
        """The fewest updates a round needs for the rule to hold with its ``f``."""
        return self.rule.min_updates

    def check_cohort(self, n: int, *, what: str = "the cohort") -> None:
        """Refuse ``n`` updates per round if the rule's f-condition fails for them.

        Raises:
            ConfigError: the condition does not hold, saying what would fix it.
        """
        if not self.rule.holds(n):
            raise ConfigError(
                f"strategy {self.name} tolerates f={self.f} malicious devices only when "
                f"{self.condition}; {what} gives n={n} updates per round, it needs at least "
                f"{self.min_updates}: use a larger cohort or a smaller f"
            )

    def init(self, params: Params) -> ServerState:
        return self.server.init(params)

    def accumulator(self, template: Mapping[str, Array]) -> UpdateStack:
        return UpdateStack(template, self.rule)

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        return self.server.apply(state, aggregate)


#: The values of the robust rules' ``mix`` option (given in the spec: ``median:mix=nnm``).
MIX_CHOICES = ("none", "nnm")


def _mixing(mix: str, bucket: float, seed: float, f: int) -> Mixing | None:
    """The pre-aggregation step the options ``mix``, ``bucket`` and ``seed`` ask for."""
    if mix not in MIX_CHOICES:
        raise ValueError(f"mix (the pre-aggregation step) must be one of {', '.join(MIX_CHOICES)}, "
                         f"got {mix!r}")
    if not (math.isfinite(bucket) and bucket >= 1 and bucket == int(bucket)):
        raise ValueError(f"bucket (updates averaged per bucket; 1 for none) must be an integer "
                         f">= 1, got {bucket!r}")
    if not (math.isfinite(seed) and seed >= 0 and seed == int(seed)):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if mix == "nnm" and bucket > 1:
        raise ValueError("mix=nnm and bucket are two pre-aggregation steps: choose one")
    if mix == "nnm":
        if f == 0:
            # n - 0 neighbours are all of them: every mixture would be the
            # plain mean, and the rule would protect against nothing.
            raise ValueError("mix=nnm averages each update with its n - f nearest: with f = 0 "
                             "that is every update (the plain mean); set f")
        return NearestNeighbourMixing()
    return Bucketing(size=int(bucket), seed=int(seed)) if bucket > 1 else None


def median(*, f: float = 0.0, server_lr: float = 1.0, bucket: float = 1.0, seed: float = 0.0,
           mix: str = "none") -> RobustStrategy:
    """Coordinate-wise median (Yin et al. 2018); tolerates ``f`` malicious devices while n >= 2f + 1.

    ``mix="nnm"`` or ``bucket`` > 1 mixes the updates first
    (:mod:`fedge.strategies.mixing`; ``seed`` keys the bucketing shuffle).
    Example weights are not used: every device's update counts once.
    """
    fi = _check_f(f)
    return RobustStrategy(Median(f=fi, mixing=_mixing(mix, bucket, seed, fi)),
                          fedavg(server_lr=server_lr))


def trimmed_mean(*, beta: float = 0.2, f: float = 0.0, server_lr: float = 1.0,
                 bucket: float = 1.0, seed: float = 0.0, mix: str = "none") -> RobustStrategy:
    """Coordinate-wise ``beta``-trimmed mean (Yin et al. 2018); needs floor(beta * n) >= f.

    With bucketing, ``n`` is the number of buckets. Mixing options as for
    :func:`median`. Example weights are not used: the kept values are
    averaged with equal weight.
    """
    if not (math.isfinite(beta) and 0 <= beta < 0.5):
        raise ValueError(f"beta (fraction trimmed at each end) must be in [0, 0.5), got {beta!r}")
    fi = _check_f(f)
    if beta == 0 and fi:
        raise ValueError(f"beta 0 trims nothing, so it tolerates no malicious device; f is {fi}")
    return RobustStrategy(TrimmedMean(beta=float(beta), f=fi, mixing=_mixing(mix, bucket, seed, fi)),
                          fedavg(server_lr=server_lr))


def krum(*, f: float = 0.0, server_lr: float = 1.0, bucket: float = 1.0, seed: float = 0.0,
         mix: str = "none") -> RobustStrategy:
    """Krum (Blanchard et al. 2017); tolerates ``f`` malicious devices while n >= 2f + 3.

    Mixing options as for :func:`median`. Example weights are not used: the
    chosen update (or mixture) is taken as it is.
    """
    fi = _check_f(f)
    return RobustStrategy(Krum(f=fi, mixing=_mixing(mix, bucket, seed, fi)),
                          fedavg(server_lr=server_lr))


def multi_krum(*, m: float = 0.0, f: float = 0.0, server_lr: float = 1.0, bucket: float = 1.0,
               seed: float = 0.0, mix: str = "none") -> RobustStrategy:
    """Multi-Krum (Blanchard et al. 2017): mean of the ``m`` best-scored updates (0: n - f).

    Needs n >= 2f + 3 and m <= n - f. Mixing options as for :func:`median`.
    Example weights are not used: the chosen updates are averaged with
    equal weight.
    """
    if not (math.isfinite(m) and m >= 0 and m == int(m)):
        raise ValueError(f"m (updates averaged; 0 for n - f) must be an integer >= 0, got {m!r}")
    fi = _check_f(f)
    return RobustStrategy(MultiKrum(m=int(m), f=fi, mixing=_mixing(mix, bucket, seed, fi)),
                          fedavg(server_lr=server_lr))


def bulyan(*, f: float = 0.0, server_lr: float = 1.0, bucket: float = 1.0, seed: float = 0.0,
           mix: str = "none") -> RobustStrategy:
    """Bulyan (El Mhamdi et al. 2018) over Krum; tolerates ``f`` malicious devices while n >= 4f + 3.

    Mixing options as for :func:`median`. Example weights are not used.
    """
    fi = _check_f(f)
    return RobustStrategy(Bulyan(f=fi, mixing=_mixing(mix, bucket, seed, fi)),
                          fedavg(server_lr=server_lr))


# --- norm bounding ---------------------------------------------------------------------


class _ClippingAccumulator:
    """Clips each update to L2 norm ``bound`` and hands it to the wrapped strategy's accumulator."""

    def __init__(self, inner: Accumulator, bound: float) -> None:
        self.inner = inner
        self.bound = bound
        self.clipped = 0

    @property
    def count(self) -> int:
        return self.inner.count

    def add(self, delta: Mapping[str, Array], weight: float) -> None:
        if not (np.isfinite(weight) and weight > 0):
            raise ValueError(f"update weight must be a positive finite number, got {weight!r}")
        clipped, norm = P.clip_by_l2(delta, self.bound)
        self.inner.add(clipped, weight)
        self.clipped += norm > self.bound

    def merge(self, other: Accumulator) -> None:
        if not isinstance(other, _ClippingAccumulator):
            raise TypeError(f"cannot merge {type(other).__name__} into a norm-bound accumulator")
        self.inner.merge(other.inner)
        self.clipped += other.clipped

    def result(self) -> Aggregate:
        return self.inner.result()


@dataclass(frozen=True)
class NormBound:
    """Norm bounding (Sun et al. 2019): every update clipped to L2 norm ``bound``, then ``inner``.

    With ``noise > 0``, Gaussian noise of that standard deviation is added to
    every coordinate of the aggregate before the wrapped strategy's step
    (Sun et al.'s "weak differential privacy", a defence against backdoors,
    not a privacy guarantee). The noise is drawn from a generator keyed by
    (``seed``, round), so a run is reproducible. It needs no condition on f:
    f malicious devices of n move an unweighted mean by at most f * bound / n.
    Example weights are the wrapped strategy's business (FedAvg: a device's
    clipped update weighs by its reported example count, so a device that
    lies about its count gains influence up to that share of ``bound``).
    """

    bound: float
    inner: Strategy
    noise: float = 0.0
    seed: int = 0

    @property
    def name(self) -> str:
        return "norm-bound"

    @property
    def device_mu(self) -> float:
        return self.inner.device_mu

    @property
    def needs_every_update(self) -> bool:
        return bool(getattr(self.inner, "needs_every_update", False))

    @property
    def secagg_compatible(self) -> bool:
        return bool(getattr(self.inner, "secagg_compatible", True))

    @property
    def min_updates(self) -> int:
        return int(getattr(self.inner, "min_updates", 1))

    def check_cohort(self, n: int, *, what: str = "the cohort") -> None:
        check = getattr(self.inner, "check_cohort", None)
        if check is not None:
            check(n, what=what)

    def init(self, params: Params) -> ServerState:
        return self.inner.init(params)

    def accumulator(self, template: Mapping[str, Array]) -> _ClippingAccumulator:
        return _ClippingAccumulator(self.inner.accumulator(template), self.bound)

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        if self.noise:
            rng = np.random.default_rng([self.seed, state.round + 1])
            noisy = {
                k: (v + rng.normal(0.0, self.noise, v.shape)).astype(v.dtype, copy=False)
                for k, v in aggregate.delta.items()
            }
            aggregate = Aggregate(noisy, aggregate.total_weight, aggregate.count)
        return self.inner.apply(state, aggregate)


def norm_bound(
    *, bound: float, inner: Strategy | None = None, noise: float = 0.0, seed: float = 0.0
) -> NormBound:
    """Clip every update to L2 norm ``bound``, then aggregate with ``inner`` (FedAvg by default).

    Raises:
        ValueError: ``bound`` not positive, ``noise`` negative, ``seed`` not
            an integer >= 0, or ``inner`` itself a norm bound.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound (the L2 norm updates are clipped to) must be positive, got {bound!r}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise (standard deviation) must be a finite number >= 0, got {noise!r}")
    if not (math.isfinite(seed) and seed >= 0 and seed == int(seed)):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(inner, NormBound):
        raise ValueError("norm-bound cannot wrap another norm-bound")
    return NormBound(
        bound=float(bound), inner=inner if inner is not None else fedavg(), noise=float(noise),
        seed=int(seed),
    )
