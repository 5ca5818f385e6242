"""Pre-aggregation: mix a round's updates before a robust rule combines them.

The coordinate-wise rules (median, trimmed mean) and the distance rules
(Krum, Multi-Krum, Bulyan) were analysed for honest updates that agree up to
noise. Under label skew they do not: honest devices disagree coordinate by
coordinate, so the rules discard what devices with rare classes contribute,
and the few malicious values shift the order statistics across a wide honest
spread. Both published remedies here replace the ``n`` updates by ``k``
mixtures before the rule runs; a mixture is a weighted mean of updates, so
the whole step is one ``k x n`` matrix ``W`` with rows summing to 1:

* **Nearest-neighbour mixing**, ``mix=nnm`` (Allouah, Farhadkhani,
  Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A Recipe for Optimal
  Byzantine ML under Heterogeneity", AISTATS 2023, Algorithm 1): each update
  is replaced by the mean of its ``n - f`` nearest updates in L2 distance,
  itself included. While ``f < n / 2`` every mixture averages a majority of
  honest updates, so honest mixtures are much closer together than honest
  updates are, while a malicious update far from everyone is outvoted inside
  the mixtures. The paper proves this makes median, trimmed mean, Krum and
  the others reach the optimal error order under heterogeneity. Its
  condition: ``n >= 2f + 1``, on top of the rule's own. Deterministic.
* **Bucketing**, ``bucket=S`` (Karimireddy, He, Jaggi, "Byzantine-Robust
  Learning on Heterogeneous Datasets via Bucketing", ICLR 2022, Algorithm
  1): the updates are shuffled and cut into ``ceil(n / S)`` buckets of ``S``
  (the last may hold fewer), and the rule combines the bucket means. Each
  malicious device spoils at most one bucket, so the rule must tolerate
  ``f`` malicious values among ``ceil(n / S)``: its condition is checked on
  the bucket count. A bucket's mixture is the mean of its actual members,
  so a short last bucket is not shrunk towards zero.

**f must be right for nearest-neighbour mixing.** With fewer malicious
devices than ``f`` it only averages a little more than needed. With more,
every honest mixture takes some of the extra ones in, and a large malicious
update then reaches every mixture: the rule no longer protects anything
(``docs/benchmarks.md`` measures this). A plain median's output does not
depend on ``f`` at all, which is why mixing is an option, not the default.

**The bucketing shuffle is reproducible and order-free.** Strategies are
pure, and the updates reach the accumulator in an order that depends on the
backend and the network. So the shuffle is drawn from a generator keyed by
(``seed``, a digest of the round's updates): the updates are first put in
the order of their own digests (BLAKE2b of their bytes), then permuted.
Every backend, and a coordinator that re-runs a round after a restart, gets
the same buckets for the same updates; another round (other updates) gets
another shuffle. A malicious device that knows the seed could try variants
of its update to steer the shuffle; that cannot break the condition (each
malicious device spoils one bucket whatever the shuffle), and a coordinator
that keeps its ``seed`` secret leaves it nothing to steer by.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

__all__ = ["Bucketing", "Mixing", "MixingInput", "NearestNeighbourMixing"]

Weights = npt.NDArray[np.float64]


class MixingInput(Protocol):
    """What a mixing step reads of the round's updates (the robust rules' view of them)."""

    @property
    def count(self) -> int:
        """How many updates there are (``n``)."""
        ...

    def sq_distances(self) -> npt.NDArray[np.float64]:
        """Squared L2 distances between every two updates (``n x n``, zero diagonal)."""
        ...

    def compare(self, i: int, j: int) -> int:
        """Order of updates ``i`` and ``j`` by their values (-1, 0, 1): breaks ties by content."""
        ...

    def digests(self) -> list[bytes]:
        """A digest of each update's bytes."""
        ...


class Mixing(Protocol):
    """A pre-aggregation step: ``n`` updates in, ``outputs(n)`` mixtures out."""

    @property
    def spec(self) -> str:
        """How the step is written in a strategy spec (``mix=nnm``, ``bucket=2``)."""
        ...

    def outputs(self, n: int) -> int:
        """How many mixtures ``n`` updates give (the ``n`` the rule then sees)."""
        ...

    def inputs_for(self, k: int) -> int:
        """The fewest updates that give ``k`` mixtures."""
        ...

    def min_inputs(self, f: int) -> int:
        """The fewest updates the step itself needs to tolerate ``f`` malicious devices."""
        ...

    def condition(self, rule_condition: str) -> str:
        """The condition of the step and the rule together, as shown in errors."""
        ...

    def weights(self, updates: MixingInput, f: int) -> Weights:
        """The ``outputs(n) x n`` mixing matrix (each row sums to 1) for ``updates``."""
        ...


@dataclass(frozen=True)
class NearestNeighbourMixing:
    """Each update replaced by the mean of its ``n - f`` nearest updates (Allouah et al. 2023)."""

    @property
    def spec(self) -> str:
        return "mix=nnm"

    def outputs(self, n: int) -> int:
        return n

    def inputs_for(self, k: int) -> int:
        return k

    def min_inputs(self, f: int) -> int:
        return 2 * f + 1

    def condition(self, rule_condition: str) -> str:
        return (f"n >= 2f + 1 (mix=nnm: each update mixed with its n - f nearest, a majority "
                f"of them honest) and {rule_condition}")

    def weights(self, updates: MixingInput, f: int) -> Weights:
        n = updates.count
        k = n - f
        if k < 1:
            raise ValueError(f"mix=nnm needs more updates than f: n={n}, f={f}")
        d = updates.sq_distances()
        w = np.zeros((n, n), dtype=np.float64)
        for i in range(n):
            order = np.argsort(d[i], kind="stable")
            cut = d[i, order[k - 1]]
            if k < n and d[i, order[k]] == cut:
                # The cut falls inside a group of equally distant updates: take
                # the group's members by their values, so that which ones are
                # chosen does not depend on the order the updates arrived in.
                nearer = np.flatnonzero(d[i] < cut)
                tied = sorted(np.flatnonzero(d[i] == cut).tolist(),
                              key=functools.cmp_to_key(updates.compare))
                chosen = np.concatenate([nearer, np.asarray(tied[: k - nearer.size], dtype=np.intp)])
            else:
                chosen = order[:k]
            w[i, chosen] = 1.0 / k
        return w


@dataclass(frozen=True)
class Bucketing:
    """Shuffle, cut into buckets of ``size``, and average each (Karimireddy et al. 2022).

    ``seed`` keys the shuffle together with a digest of the round's updates
    (see the module docstring).
    """

    size: int
    seed: int = 0

    @property
    def spec(self) -> str:
        return f"bucket={self.size}"

    def outputs(self, n: int) -> int:
        return math.ceil(n / self.size)

    def inputs_for(self, k: int) -> int:
        return self.size * (k - 1) + 1

    def min_inputs(self, f: int) -> int:
        return 1

    def condition(self, rule_condition: str) -> str:
        return (f"the rule's condition holds for the ceil(n / {self.size}) bucket means, "
                f"counted as n (each malicious device spoils at most one bucket): {rule_condition}")

    def weights(self, updates: MixingInput, f: int) -> Weights:
        digests = updates.digests()
        n = len(digests)
        canonical = sorted(range(n), key=functools.cmp_to_key(_by(digests, updates.compare)))
        round_key = hashlib.blake2b(b"".join(digests[i] for i in canonical), digest_size=16).digest()
        rng = np.random.default_rng([self.seed, int.from_bytes(round_key, "little")])
        shuffled = [canonical[j] for j in rng.permutation(n).tolist()]
        w = np.zeros((self.outputs(n), n), dtype=np.float64)
        for b, start in enumerate(range(0, n, self.size)):
            members = shuffled[start : start + self.size]
            w[b, members] = 1.0 / len(members)
        return w


def _by(digests: Sequence[bytes], compare: Callable[[int, int], int]) -> Callable[[int, int], int]:
    """Order of two updates: by digest; equal digests (equal bytes) by value, to be exact."""

    def cmp(i: int, j: int) -> int:
        if digests[i] != digests[j]:
            return -1 if digests[i] < digests[j] else 1
        return compare(i, j)

    return cmp
