"""Partitioners: split one dataset's examples over simulated devices.

Each partitioner takes the labels of a dataset, a number of devices and a
seeded generator, and returns one array of example indices per device. Every
example is assigned to exactly one device and every device gets at least one
example. Four shapes of heterogeneity are offered:

* ``iid``: a uniform random split into near-equal parts.
* ``dirichlet:ALPHA``: label skew. For each class, the share of its examples
  held by each device is drawn from a symmetric Dirichlet(ALPHA) distribution;
  small ALPHA gives each device few classes, large ALPHA approaches iid. This is
  the label-skew model of Hsu, Qi and Brown, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification" (2019),
  in the per-class form used by most benchmarks since, which assigns every
  example exactly once.
* ``shards:K``: pathological label skew as in McMahan et al., "Communication-
  Efficient Learning of Deep Networks from Decentralized Data" (AISTATS 2017):
  each device holds examples of exactly K distinct classes where the data allow.
* ``powerlaw:A``: quantity skew. Device sizes are proportional to
  ``rank ** -A`` (ranks shuffled over devices); labels are iid.

A dirichlet or power-law draw may leave a device empty; such a device then
receives one example from the currently largest device, a deterministic fix-up
rather than a redraw, so partitioning always terminates.

All work is vectorised over examples (sorts, ``repeat`` and ``bincount``); the
only Python loop runs over the devices left empty by a draw.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError, UnknownNameError

__all__ = [
    "PARTITIONER_NAMES",
    "Partitioner",
    "parse_partitioner",
    "partition_dirichlet",
    "partition_iid",
    "partition_powerlaw",
    "partition_shards",
]

IndexArray = npt.NDArray[np.int64]

#: The partitioner specs :func:`parse_partitioner` understands, as shown to users.
PARTITIONER_NAMES: tuple[str, ...] = ("iid", "dirichlet:ALPHA", "shards:K", "powerlaw:A")


# ---------------------------------------------------------------------------
# Public partitioners
# ---------------------------------------------------------------------------


def partition_iid(
    labels: npt.NDArray[np.integer[Any]], num_devices: int, rng: np.random.Generator
) -> list[IndexArray]:
    """Split examples uniformly at random into ``num_devices`` near-equal parts.

    Args:
        labels: class label of each example, shape ``(n,)``; only its length is used.
        num_devices: number of devices, ``1 <= num_devices <= n``.
        rng: the generator every random choice is drawn from.

    Returns:
        One sorted array of example indices per device; sizes differ by at most one.

    Raises:
        ConfigError: ``labels`` is not a 1-D integer array, ``num_devices < 1``,
            or there are more devices than examples.
    """
    y = _check_labels(labels, num_devices, "partition 'iid'")
    n = y.shape[0]
    order = rng.permutation(n).astype(np.int64)
    counts = _even_counts(n, num_devices)
    return _split_by_counts(order, np.arange(num_devices), counts, n, num_devices)


def partition_dirichlet(
    labels: npt.NDArray[np.integer[Any]],
    num_devices: int,
    rng: np.random.Generator,
    *,
    alpha: float,
) -> list[IndexArray]:
    """Label skew: each class's examples are shared out by a Dirichlet(``alpha``) draw.

    For every class ``c`` a vector ``p_c ~ Dir(alpha, ..., alpha)`` over devices is
    drawn, and the class's (shuffled) examples are cut at the rounded cumulative
    shares ``n_c * cumsum(p_c)`` (Hsu et al. 2019). Devices left empty then take
    one example each from the largest devices.

    Args:
        labels: class label of each example, shape ``(n,)``, integers.
        num_devices: number of devices, ``1 <= num_devices <= n``.
        rng: the generator every random choice is drawn from.
        alpha: Dirichlet concentration, ``> 0``; smaller is more skewed.

    Returns:
        One sorted array of example indices per device.

    Raises:
        ConfigError: ``alpha`` is not a finite number ``> 0``, or a check of
            :func:`partition_iid` fails.
    """
    what = f"partition 'dirichlet:{_fmt(alpha)}'"
    _check_positive(what, "alpha", alpha)
    y = _check_labels(labels, num_devices, what)
    n = y.shape[0]
    classes, order = _group_by_class(y, rng)
    class_sizes = np.bincount(classes, minlength=int(classes.max()) + 1)
    num_classes = class_sizes.shape[0]
    shares = rng.dirichlet(np.full(num_devices, float(alpha)), size=num_classes)
    # Rounded cumulative shares give per-(class, device) counts that sum to
    # each class's size exactly; the last cut is pinned to guard against
    # cumulative sums that end a hair below 1.
    cuts = np.rint(np.cumsum(shares, axis=1) * class_sizes[:, None]).astype(np.int64)
    cuts[:, -1] = class_sizes
    cuts = np.maximum.accumulate(cuts, axis=1)
    counts = np.diff(cuts, axis=1, prepend=0)
    slot_device = np.tile(np.arange(num_devices), num_classes)
    return _split_by_counts(order, slot_device, counts.ravel(), n, num_devices)


def partition_shards(
    labels: npt.NDArray[np.integer[Any]],
    num_devices: int,
    rng: np.random.Generator,
    *,
    classes_per_device: int,
) -> list[IndexArray]:
    """Pathological label skew: each device holds ``classes_per_device`` distinct classes.

    The classes present in ``labels`` are shuffled and laid out cyclically over
    ``num_devices * classes_per_device`` slots; device ``d`` takes the K
    consecutive slots ``d*K .. d*K+K-1`` (distinct classes, since ``K`` does not
    exceed the number of classes), and device order is then shuffled. Every
    class is held by some device once ``num_devices * K >= num_classes``, and
    each class's examples are split evenly among the devices holding it. A
    class with fewer examples than holders leaves some holders without it;
    a device left with no example at all then takes one from the largest device.

    Args:
        labels: class label of each example, shape ``(n,)``, integers.
        num_devices: number of devices, ``1 <= num_devices <= n``.
        rng: the generator every random choice is drawn from.
        classes_per_device: K, with ``1 <= K <= number of distinct labels``.

    Returns:
        One sorted array of example indices per device.

    Raises:
        ConfigError: K is not an integer in range, or a check of
            :func:`partition_iid` fails.
    """
    what = f"partition 'shards:{_fmt(classes_per_device)}'"
    k = _check_classes_per_device(what, classes_per_device)
    y = _check_labels(labels, num_devices, what)
    n = y.shape[0]
    classes, order = _group_by_class(y, rng)
    class_sizes = np.bincount(classes)
    num_classes = class_sizes.shape[0]
    if k > num_classes:
        raise ConfigError(
            f"{what}: classes_per_device must be <= the number of classes "
            f"in the data ({num_classes}), got {k}"
        )
    class_cycle = rng.permutation(num_classes)
    device_order = rng.permutation(num_devices)
    # With fewer slots than classes (num_devices * K < num_classes) the layout
    # wraps round the devices again so that every class still has a holder;
    # devices then hold more than K classes, the only way to place every example.
    num_slots = max(num_devices * k, num_classes)
    slot = np.arange(num_slots)
    slot_class = class_cycle[slot % num_classes]
    slot_device = device_order[(slot // k) % num_devices]
    # Group slots by class so they line up with ``order`` (examples by class).
    by_class = np.argsort(slot_class, kind="stable")
    slot_class = slot_class[by_class]
    slot_device = slot_device[by_class]
    holders = np.bincount(slot_class, minlength=num_classes)
    first_slot = np.cumsum(holders) - holders
    rank = slot - first_slot[slot_class]
    size = class_sizes[slot_class]
    h = holders[slot_class]
    slot_counts = size // h + (rank < size % h)
    return _split_by_counts(order, slot_device, slot_counts, n, num_devices)


def partition_powerlaw(
    labels: npt.NDArray[np.integer[Any]],
    num_devices: int,
    rng: np.random.Generator,
    *,
    exponent: float,
) -> list[IndexArray]:
    """Quantity skew: device sizes proportional to ``rank ** -exponent``, labels iid.

    The ranks ``1 .. num_devices`` are shuffled over devices, sizes are the
    rounded cumulative shares of ``n``, and a uniformly shuffled order of the
    examples is cut at those sizes. Devices left empty then take one example
    each from the largest devices.

    Args:
        labels: class label of each example, shape ``(n,)``; only its length is used.
        num_devices: number of devices, ``1 <= num_devices <= n``.
        rng: the generator every random choice is drawn from.
        exponent: the power-law exponent, ``> 0``; larger is more skewed.

    Returns:
        One sorted array of example indices per device.

    Raises:
        ConfigError: ``exponent`` is not a finite number ``> 0``, or a check of
            :func:`partition_iid` fails.
    """
    what = f"partition 'powerlaw:{_fmt(exponent)}'"
    _check_positive(what, "exponent", exponent)
    y = _check_labels(labels, num_devices, what)
    n = y.shape[0]
    ranks = rng.permutation(num_devices) + 1
    weights = ranks.astype(np.float64) ** -float(exponent)
    cuts = np.rint(np.cumsum(weights) / weights.sum() * n).astype(np.int64)
    cuts[-1] = n
    cuts = np.maximum.accumulate(cuts)
    counts = np.diff(cuts, prepend=0)
    order = rng.permutation(n).astype(np.int64)
    return _split_by_counts(order, np.arange(num_devices), counts, n, num_devices)


# ---------------------------------------------------------------------------
# The parsed form of ``--partition``
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Partitioner:
    """A partitioner chosen by name, with its one parameter (``None`` for ``iid``).

    Attributes:
        name: ``"iid"``, ``"dirichlet"``, ``"shards"`` or ``"powerlaw"``.
        parameter: alpha, K or the exponent; ``None`` for ``iid``.
    """

    name: str
    parameter: float | None = None

    def __post_init__(self) -> None:
        _check_partitioner(f"partition {self.spec!r}", self.name, self.parameter)

    @property
    def spec(self) -> str:
        """The canonical text form, e.g. ``dirichlet:0.5``, that :func:`parse_partitioner` reads."""
        if self.parameter is None:
            return self.name
        return f"{self.name}:{_fmt(self.parameter)}"

    def split(
        self,
        labels: npt.NDArray[np.integer[Any]],
        num_devices: int,
        rng: np.random.Generator,
    ) -> list[IndexArray]:
        """Split ``labels``'s examples over ``num_devices`` devices.

        Args:
            labels: class label of each example, shape ``(n,)``, integers.
            num_devices: number of devices, ``1 <= num_devices <= n``.
            rng: the generator every random choice is drawn from.

        Returns:
            One sorted array of example indices per device.

        Raises:
            ConfigError: see the ``partition_*`` function of this name.
        """
        p = self.parameter
        if self.name == "iid" or p is None:
            return partition_iid(labels, num_devices, rng)
        if self.name == "dirichlet":
            return partition_dirichlet(labels, num_devices, rng, alpha=p)
        if self.name == "shards":
            return partition_shards(labels, num_devices, rng, classes_per_device=int(p))
        return partition_powerlaw(labels, num_devices, rng, exponent=p)


def parse_partitioner(spec: str) -> Partitioner:
    """Read a partitioner spec: ``iid``, ``dirichlet:ALPHA``, ``shards:K`` or ``powerlaw:A``.

    Args:
        spec: the text, as given to ``--partition``.

    Returns:
        The validated :class:`Partitioner`.

    Raises:
        UnknownNameError: the name before ``:`` is not a known partitioner.
        ConfigError: the parameter is missing, surplus, not a number, or out
            of range (alpha and exponent ``> 0``, K an integer ``>= 1``).
    """
    name, sep, raw = spec.strip().partition(":")
    name = name.strip().lower()
    raw = raw.strip()
    if name not in _PARAMETER_NAME:
        raise UnknownNameError("partitioner", spec, list(PARTITIONER_NAMES))
    what = f"partition {spec!r}"
    param_name = _PARAMETER_NAME[name]
    if param_name is None:
        if sep:
            raise ConfigError(f"{what}: iid takes no parameter, got {raw!r}")
        return Partitioner(name)
    if not raw:
        form = next(f for f in PARTITIONER_NAMES if f.startswith(f"{name}:"))
        raise ConfigError(f"{what}: {param_name} is missing; write {form}")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{what}: {param_name} must be a number, got {raw!r}") from None
    _check_partitioner(what, name, value)
    if name == "shards":
        return Partitioner(name, int(value))
    return Partitioner(name, value)


_PARAMETER_NAME: dict[str, str | None] = {
    "iid": None,
    "dirichlet": "alpha",
    "shards": "classes_per_device",
    "powerlaw": "exponent",
}


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


def _fmt(value: float) -> str:
    """A parameter as a spec writes it: ``0.5``, ``2``, ``-1``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_partitioner(what: str, name: str, parameter: float | None) -> None:
    if name not in _PARAMETER_NAME:
        raise UnknownNameError("partitioner", name, list(PARTITIONER_NAMES))
    param_name = _PARAMETER_NAME[name]
    if param_name is None:
        if parameter is not None:
            raise ConfigError(f"{what}: iid takes no parameter, got {parameter!r}")
        return
    if parameter is None:
        raise ConfigError(f"{what}: {param_name} is missing")
    if name == "shards":
        _check_classes_per_device(what, parameter)
    else:
        _check_positive(what, param_name, parameter)


def _check_positive(what: str, param_name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ConfigError(f"{what}: {param_name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{what}: {param_name} must be a finite number > 0, got {v}")
    if v <= 0:
        raise ConfigError(f"{what}: {param_name} must be > 0, got {v}")


def _check_classes_per_device(what: str, value: float) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ConfigError(f"{what}: classes_per_device must be an integer, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v != math.floor(v):
        raise ConfigError(f"{what}: classes_per_device must be an integer, got {value!r}")
    if v < 1:
        raise ConfigError(f"{what}: classes_per_device must be >= 1, got {int(v)}")
    return int(v)


def _check_labels(
    labels: npt.NDArray[np.integer[Any]], num_devices: int, what: str
) -> npt.NDArray[np.int64]:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError(f"{what}: labels must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise ConfigError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if isinstance(num_devices, bool) or not isinstance(num_devices, int | np.integer):
        raise ConfigError(f"{what}: num_devices must be an integer, got {num_devices!r}")
    if num_devices < 1:
        raise ConfigError(f"{what}: num_devices must be >= 1, got {num_devices}")
    if num_devices > y.shape[0]:
        raise ConfigError(
            f"{what}: {num_devices} devices but only {y.shape[0]} examples; "
            "every device needs at least one"
        )
    if y.shape[0] and int(y.min()) < 0:
        raise ConfigError(f"{what}: labels must be >= 0, got {int(y.min())}")
    return y.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------
# Vectorised assignment
# ---------------------------------------------------------------------------


def _even_counts(n: int, parts: int) -> npt.NDArray[np.int64]:
    counts = np.full(parts, n // parts, dtype=np.int64)
    counts[: n % parts] += 1
    return counts


def _group_by_class(
    y: npt.NDArray[np.int64], rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Dense class ids ``0..C-1`` in sorted order, and the example indices grouped
    by class (ascending) and shuffled within each class."""
    _, dense = np.unique(y, return_inverse=True)
    dense = dense.astype(np.int64).reshape(-1)
    perm = rng.permutation(y.shape[0])
    order = perm[np.argsort(dense[perm], kind="stable")].astype(np.int64)
    return dense[order], order


def _split_by_counts(
    order: npt.NDArray[np.int64],
    slot_device: npt.NDArray[np.integer[Any]],
    slot_counts: npt.NDArray[np.integer[Any]],
    n: int,
    num_devices: int,
) -> list[IndexArray]:
    """Give the examples ``order`` lists, slot by slot, to the slots' devices.

    Slot ``s`` takes the next ``slot_counts[s]`` entries of ``order`` for device
    ``slot_device[s]``; ``slot_counts`` sums to ``n``.
    """
    device_of = np.empty(n, dtype=np.int64)
    device_of[order] = np.repeat(np.asarray(slot_device, dtype=np.int64), slot_counts)
    by_device = np.argsort(device_of, kind="stable").astype(np.int64)
    sizes = np.bincount(device_of, minlength=num_devices)
    parts = np.split(by_device, np.cumsum(sizes)[:-1])
    return _fill_empty(parts)


def _fill_empty(parts: list[IndexArray]) -> list[IndexArray]:
    """Give each empty device one example from the currently largest device.

    Deterministic: empty devices are served in id order, the donor is the
    largest device (lowest id on ties) and gives its highest index. A donor
    always holds at least two examples because there are at least as many
    examples as devices.
    """
    empty = [d for d, p in enumerate(parts) if p.shape[0] == 0]
    if not empty:
        return parts
    heap = [(-p.shape[0], d) for d, p in enumerate(parts) if p.shape[0] > 0]
    heapq.heapify(heap)
    taken = dict.fromkeys(range(len(parts)), 0)
    out = list(parts)
    for e in empty:
        neg_size, donor = heapq.heappop(heap)
        taken[donor] += 1
        out[e] = parts[donor][-taken[donor] :][:1].copy()
        heapq.heappush(heap, (neg_size + 1, donor))
    for d, t in taken.items():
        if t:
            out[d] = parts[d][:-t]
    return out
