"""The candidates tried for the robust rules' gap under label skew and NOT adopted in fedge.

``bench/robust.py --part candidates`` measures them next to the adopted ones
(nearest-neighbour mixing and bucketing, which live in
``fedge.strategies.mixing``), so that every figure in docs/benchmarks.md can
be made again. These are plain numpy reference versions, one function per
rule, written from the papers' descriptions; they are not part of fedge:

* weighted median / weighted trimmed mean over reported example counts, with
  each count capped at the largest ``c`` for which even the ``f`` heaviest
  devices claiming ``c`` stay within what the rule tolerates:
  ``f * c <= share * sum(min(w_i, c))`` with ``share`` 1/2 (strictly less)
  for the median and ``beta`` for the trimmed mean. With equal counts this
  is the rules' own ``n >= 2f + 1`` and ``beta * n >= f``. (Weighted
  variants are standard, e.g. the weighted geometric median of Pillutla et
  al., "Robust Aggregation for Federated Learning", 2022; the cap is this
  bench's.)
* centered clipping (Karimireddy, He, Jaggi, "Learning from History for
  Byzantine Robust Optimization", ICML 2021): ``v += mean_i clip_tau(x_i - v)``
  for ``L`` iterations, starting from the previous round's aggregate. It keeps
  that aggregate between rounds inside the strategy object, which a real
  fedge strategy must not do (state belongs in ``ServerState``); fine for a
  bench run that builds a fresh object per run.

Server momentum over a robust rule needs no prototype: it is fedge's own
``RobustStrategy`` with the ``fedavgm`` server optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedge import params as P
from fedge.params import Array, Params, ParamsSpec
from fedge.strategies import Aggregate, FedOpt, ServerState

Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows n x d, weights n) -> d


def capped_weights(w: np.ndarray, f: int, share: float) -> np.ndarray:
    """Cap every weight at the largest c with f * c <= share * sum(min(w, c)) (bisection)."""
    if f == 0:
        return w
    def slack(c: float) -> float:
        return share * float(np.minimum(w, c).sum()) - f * c
    lo, hi = 0.0, float(w.max())
    if slack(hi) >= 0:
        return w
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slack(mid) >= 0 else (lo, mid)
    return np.minimum(w, lo)


def weighted_median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per coordinate, the value where the cumulative weight crosses half (midpoint on a tie)."""
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, 0)
    cw = np.cumsum(w[order], axis=0)
    half = w.sum() / 2
    lo = np.argmax(cw >= half * (1 - 1e-12), axis=0)
    hi = np.argmax(cw > half * (1 + 1e-12), axis=0)
    cols = np.arange(x.shape[1])
    return 0.5 * (xs[lo, cols] + xs[hi, cols])


def weighted_trimmed_mean(x: np.ndarray, w: np.ndarray, beta: float) -> np.ndarray:
    """Per coordinate, drop weight beta * W at each end (fractionally at the edges), average the rest."""
    order = np.argsort(x, axis=0, kind="stable")
    xs = np.take_along_axis(x, order, 0)
    ws = w[order]
    total, cut = w.sum(), beta * w.sum()
    hi = np.cumsum(ws, axis=0)
    keep = np.clip(np.minimum(hi, total - cut) - np.maximum(hi - ws, cut), 0, None)
    return (keep * xs).sum(axis=0) / (total - 2 * cut)


def weighted_median_rule(f: int) -> Combine:
    return lambda x, w: weighted_median(x, capped_weights(w, f, 0.5 * (1 - 1e-9)))


def weighted_trimmed_mean_rule(f: int, beta: float = 0.2) -> Combine:
    return lambda x, w: weighted_trimmed_mean(x, capped_weights(w, f, beta), beta)


def centered_clipping_rule(tau: float, iterations: int = 3) -> Combine:
    """Centered clipping around the previous round's aggregate (kept in the closure)."""
    last: dict[str, np.ndarray] = {}

    def combine(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        v = last.get("v", np.zeros(x.shape[1]))
        for _ in range(iterations):
            diff = x - v
            norms = np.linalg.norm(diff, axis=1)
            v = v + (diff * np.minimum(1.0, tau / np.maximum(norms, 1e-12))[:, None]).mean(axis=0)
        last["v"] = v
        return v

    return combine


class _Rows:
    """Keeps every update and its weight, in float64 (a bench model is small)."""

    def __init__(self, template: Mapping[str, Array], combine: Combine) -> None:
        self.spec = ParamsSpec.of(template)
        self.dtype = np.result_type(*template.values())
        self.rows: list[np.ndarray] = []
        self.weights: list[float] = []
        self.combine = combine

    @property
    def count(self) -> int:
        return len(self.rows)

    def add(self, delta: Mapping[str, Array], weight: float) -> None:
        self.rows.append(P.flatten(delta, dtype=np.float64))
        self.weights.append(float(weight))

    def merge(self, other: Any) -> None:
        self.rows += other.rows
        self.weights += other.weights

    def result(self) -> Aggregate:
        flat = self.combine(np.stack(self.rows), np.asarray(self.weights))
        return Aggregate(P.unflatten(flat.astype(self.dtype), self.spec), sum(self.weights),
                         len(self.rows))


@dataclass(frozen=True)
class Candidate:
    """A bench strategy: a combine function, then the server optimizer's step."""

    name: str
    combine: Combine
    server: FedOpt
    f: int = 0
    needs_every_update: ClassVar[bool] = True
    secagg_compatible: ClassVar[bool] = False
    min_updates: int = field(default=1)

    @property
    def device_mu(self) -> float:
        return 0.0

    def init(self, params: Params) -> ServerState:
        return self.server.init(params)

    def accumulator(self, template: Mapping[str, Array]) -> _Rows:
        return _Rows(template, self.combine)

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        return self.server.apply(state, aggregate)
