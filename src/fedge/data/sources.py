"""Data sources for simulations: bundled digits, FedProx synthetic, and the dispatcher.

* :func:`load_digits_dataset` reads scikit-learn's bundled handwritten digits
  (1797 images of 8x8 pixels, 10 classes) straight from the installed
  package's data file, without importing scikit-learn, whose import alone
  costs about a second of start-up.
* :func:`synthetic_fedprox` is the Synthetic(alpha, beta) generator of Li et
  al., "Federated Optimization in Heterogeneous Networks" (FedProx, MLSys
  2020), as the authors' code defines it: naturally partitioned data where
  alpha controls how much the devices' models differ and beta how much their
  inputs differ.
* :func:`load_federated` turns a ``--data`` name into a :class:`FederatedData`:
  it holds out a central test set and partitions the rest over devices
  (:mod:`fedge.data.partition`), or, for synthetic data, keeps the generator's
  own devices.

Randomness is derived from one seed as independent streams,
``default_rng([seed, stream])``, so that for example changing the partitioner
does not change which examples are held out for testing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedge.data.dataset import Dataset, DataSpec, FederatedData, make_dataset
from fedge.data.files import load_file
from fedge.data.partition import Partitioner, parse_partitioner
from fedge.errors import ConfigError, DataError, UnknownNameError

__all__ = [
    "DATA_NAMES",
    "load_digits_dataset",
    "load_federated",
    "synthetic_fedprox",
]

#: The ``--data`` values :func:`load_federated` understands, as shown to users.
DATA_NAMES: tuple[str, ...] = (
    "digits",
    "synthetic:ALPHA,BETA",
    "synthetic:ALPHA,BETA,DEVICES",
    "synthetic:iid",
    "synthetic:iid,DEVICES",
    "PATH.npz",
    "PATH.csv",
)

DEFAULT_NUM_DEVICES = 20
DEFAULT_PARTITION = "dirichlet:0.5"
SYNTHETIC_NUM_DEVICES = 30
# A bound on ``synthetic:...,DEVICES``: a device has about 450 examples on
# average, so a million devices is already ~100 GB of features.
SYNTHETIC_MAX_DEVICES = 1_000_000
SYNTHETIC_NUM_FEATURES = 60
SYNTHETIC_NUM_CLASSES = 10

# Independent random streams drawn from one seed: default_rng([seed, stream]).
_STREAM_TEST_SPLIT = 1
_STREAM_PARTITION = 2
_STREAM_SYNTHETIC = 3

_INSTALL_HINT = "pip install 'fedge[sim]'"


# ---------------------------------------------------------------------------
# Bundled digits
# ---------------------------------------------------------------------------


def load_digits_dataset() -> Dataset:
    """Load scikit-learn's bundled handwritten digits without importing scikit-learn.

    Returns:
        1797 examples of 64 features (8x8 pixel intensities scaled from 0..16
        to [0, 1]) with labels 0..9. :func:`load_federated` further
        standardises them with the training split's statistics.

    Raises:
        DataError: scikit-learn is not installed, or its data file is missing
            or malformed.
    """
    path = _digits_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read scikit-learn's digits data ({e})") from e
    if table.shape[1] < 2:
        raise DataError(f"{path}: expected pixel columns then a label, got shape {table.shape}")
    return make_dataset(table[:, :-1] / 16.0, table[:, -1], source=str(path))


def _digits_path() -> Path:
    try:
        spec = find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            f"the bundled digits data comes with scikit-learn, which is not installed; "
            f"{_INSTALL_HINT}"
        )
    path = Path(locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(
            f"scikit-learn is installed but its digits data is missing at {path}; "
            f"reinstall it: {_INSTALL_HINT}"
        )
    return path


# ---------------------------------------------------------------------------
# FedProx synthetic
# ---------------------------------------------------------------------------


def synthetic_fedprox(
    alpha: float,
    beta: float,
    *,
    iid: bool,
    rng: np.random.Generator,
    num_devices: int = SYNTHETIC_NUM_DEVICES,
    keep: Callable[[int], bool] | None = None,
) -> list[tuple[Dataset, Dataset]]:
    """Generate FedProx's Synthetic(alpha, beta) data: one (train, test) pair per device.

    Following the FedProx authors' generator (Li et al. 2020), with 60
    features and 10 classes. Device ``k`` has ``int(lognormal(4, 2)) + 50``
    examples. Non-iid: ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)`` (alpha
    and beta are standard deviations, as in the authors' code); the device's
    model is ``W_k ~ N(u_k, 1)`` of shape (60, 10) and ``b_k ~ N(u_k, 1)`` of
    shape (10,); its inputs are ``x ~ N(v_k, diag((j + 1) ** -1.2))`` with
    ``v_k ~ N(B_k, 1)`` per feature. Iid: one model ``W, b ~ N(0, 1)`` shared
    by all devices and ``v_k = B_k`` in every feature (zero when beta is 0,
    as ``synthetic:iid`` sets it); alpha is unused. Labels are
    ``argmax(x W_k + b_k)``. Each device's examples are shuffled and the first
    ``int(0.9 * n)`` form its training split, the rest its test split.

    Args:
        alpha: spread of the devices' models, ``>= 0``.
        beta: spread of the devices' input means, ``>= 0``.
        iid: draw the iid variant (shared model, shared input mean).
        rng: the generator every random choice is drawn from.
        num_devices: number of devices (the paper uses 30).
        keep: if given, only devices ``k`` with ``keep(k)`` are returned (in
            order); the others are still drawn, so the kept ones are
            identical to the full draw's. A worker that owns some devices
            builds just those, without holding everyone's data at once.

    Returns:
        ``(train, test)`` per (kept) device; features float32, labels int64 in 0..9.

    Raises:
        ConfigError: alpha or beta is not a finite number ``>= 0``, or
            ``num_devices < 1``.
    """
    what = "synthetic:iid" if iid else f"synthetic:{alpha},{beta}"
    a = _check_non_negative(what, "alpha", alpha)
    b = _check_non_negative(what, "beta", beta)
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ConfigError(f"{what}: num_devices must be an integer >= 1, got {num_devices!r}")
    dim, num_classes = SYNTHETIC_NUM_FEATURES, SYNTHETIC_NUM_CLASSES

    sizes = rng.lognormal(4.0, 2.0, num_devices).astype(np.int64) + 50
    model_mean = rng.normal(0.0, a, num_devices)  # mean_W; mean_b is the same draw
    input_shift = rng.normal(0.0, b, num_devices)  # B
    if iid:
        input_mean = np.repeat(input_shift[:, None], dim, axis=1)
        shared_w = rng.normal(0.0, 1.0, (dim, num_classes))
        shared_b = rng.normal(0.0, 1.0, num_classes)
    else:
        input_mean = rng.normal(input_shift[:, None], 1.0, (num_devices, dim))
    # A Gaussian with diagonal covariance is independent normals, each scaled
    # by the square root of its variance (j + 1) ** -1.2.
    input_scale = np.arange(1, dim + 1, dtype=np.float64) ** -0.6

    out: list[tuple[Dataset, Dataset]] = []
    for k, n in enumerate(sizes.tolist()):
        if iid:
            w, bias = shared_w, shared_b
        else:
            w = rng.normal(model_mean[k], 1.0, (dim, num_classes))
            bias = rng.normal(model_mean[k], 1.0, num_classes)
        x = input_mean[k] + rng.standard_normal((n, dim)) * input_scale
        y = np.argmax(x @ w + bias, axis=1)
        perm = rng.permutation(n)
        if keep is not None and not keep(k):
            # Drawn all the same, so the devices kept are those of the full draw.
            continue
        x, y = x[perm], y[perm]
        train_len = int(0.9 * n)
        out.append((_values(x[:train_len], y[:train_len]), _values(x[train_len:], y[train_len:])))
    return out


def _values(x: npt.NDArray[np.float64], y: npt.NDArray[np.int64]) -> Dataset:
    return Dataset(x=x.astype(np.float32), y=y.astype(np.int64))


def _check_non_negative(what: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ConfigError(f"{what}: {name} must be a number >= 0, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{what}: {name} must be a finite number >= 0, got {v}")
    return v


# ---------------------------------------------------------------------------
# The dispatcher
# ---------------------------------------------------------------------------


def load_federated(
    data: str,
    *,
    partition: str | None,
    num_devices: int | None,
    seed: int,
    test_fraction: float = 0.2,
) -> FederatedData:
    """Build a federation's data from a ``--data`` name.

    ``digits``, ``PATH.npz`` and ``PATH.csv``: ``test_fraction`` of the
    examples, stratified by class, is held out as the central test set and the
    rest is partitioned over ``num_devices`` devices (default 20) by
    ``partition`` (default ``dirichlet:0.5``). ``synthetic:ALPHA,BETA`` and
    ``synthetic:iid``: FedProx synthetic data, which comes split over its own
    30 devices (``synthetic:ALPHA,BETA,DEVICES`` and ``synthetic:iid,DEVICES``
    set another count); the central test set is the union of the devices'
    test splits.

    Args:
        data: ``digits``, ``synthetic:ALPHA,BETA[,DEVICES]``, ``synthetic:iid[,DEVICES]``, or the
            path of a ``.npz`` or ``.csv`` file (see :mod:`fedge.data.files`).
        partition: a partitioner spec (:func:`parse_partitioner`), or ``None``
            for the default; must be ``None`` for synthetic data.
        num_devices: number of devices, or ``None`` for the default; must be
            ``None`` or the generator's count (30 unless ``data`` names
            another) for synthetic data.
        seed: an integer ``>= 0``; the test split, the partition and the
            synthetic draw use independent streams derived from it.
        test_fraction: share of examples held out, ``0 < test_fraction < 1``;
            not used for synthetic data.

    Returns:
        Each device's training examples, the central test set and the data's
        :class:`DataSpec` (``num_classes`` is the largest label plus one).

    Raises:
        UnknownNameError: ``data`` names no known source, or ``partition``
            no known partitioner.
        DataError: a file is missing or malformed, or scikit-learn is absent.
        ConfigError: any argument is out of range, there are more devices than
            training examples, or ``partition``/``num_devices`` were given for
            synthetic data.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if num_devices is not None and (
        isinstance(num_devices, bool)
        or not isinstance(num_devices, int | np.integer)
        or num_devices < 1
    ):
        raise ConfigError(f"num_devices must be an integer >= 1, got {num_devices!r}")
    if not (isinstance(test_fraction, int | float) and 0.0 < test_fraction < 1.0):
        raise ConfigError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")

    if data == "synthetic" or data.startswith("synthetic:"):
        return _load_synthetic(data, partition=partition, num_devices=num_devices, seed=seed)

    if data != "digits" and Path(data).suffix.lower() not in (".npz", ".csv"):
        raise UnknownNameError("data", data, list(DATA_NAMES))
    # Parse the partitioner before reading anything, so a typo fails fast.
    partitioner = parse_partitioner(DEFAULT_PARTITION if partition is None else partition)
    dataset = load_digits_dataset() if data == "digits" else load_file(data)
    return _split_and_partition(
        data,
        dataset,
        partitioner,
        num_devices=DEFAULT_NUM_DEVICES if num_devices is None else int(num_devices),
        seed=int(seed),
        test_fraction=float(test_fraction),
        standardize=data == "digits",
    )


def _standardize(train: Dataset, test: Dataset) -> tuple[Dataset, Dataset]:
    """Centre and scale every feature by the training split's statistics.

    Digits' pixels in [0, 1] make logistic regression badly conditioned: with
    the default learning rate a 30-round run stalls near 0.88 accuracy. Per-
    feature standardisation (as scikit-learn's StandardScaler) fixes that. The
    standard deviation is floored at half the mean one, so border pixels that are
    almost always blank are not blown up into huge values. Only the training
    split's statistics are used; the test set is transformed with them.
    """
    mean = train.x.mean(axis=0, dtype=np.float64)
    std = train.x.std(axis=0, dtype=np.float64)
    std = np.maximum(std, 0.5 * std.mean())

    def apply(d: Dataset) -> Dataset:
        return Dataset(x=((d.x - mean) / std).astype(np.float32), y=d.y)

    return apply(train), apply(test)


def _split_and_partition(
    name: str,
    dataset: Dataset,
    partitioner: Partitioner,
    *,
    num_devices: int,
    seed: int,
    test_fraction: float,
    standardize: bool = False,
) -> FederatedData:
    n = len(dataset)
    if n < 2:
        raise DataError(f"data {name!r}: needs at least 2 examples (train and test), got {n}")
    train_index, test_index = _stratified_split(
        dataset.y, test_fraction, np.random.default_rng([seed, _STREAM_TEST_SPLIT])
    )
    train = dataset.subset(train_index)
    test = dataset.subset(test_index)
    if standardize:
        train, test = _standardize(train, test)
    if num_devices > len(train):
        raise ConfigError(
            f"data {name!r}: {num_devices} devices but only {len(train)} training examples "
            f"({n} examples less {len(test_index)} held out for testing); "
            f"use at most {len(train)} devices"
        )
    parts = partitioner.split(
        train.y, num_devices, np.random.default_rng([seed, _STREAM_PARTITION])
    )
    return FederatedData(
        name=name,
        devices=tuple(train.subset(p) for p in parts),
        test=test,
        spec=DataSpec(
            num_features=int(dataset.x.shape[1]), num_classes=int(dataset.y.max()) + 1
        ),
    )


def _stratified_split(
    y: npt.NDArray[np.int64], test_fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sorted (train, test) indices; each class gives its share of the test set.

    The test set has ``round(test_fraction * n)`` examples (at least one, and
    at least one left for training). Each class's quota ``n_c * test_fraction``
    is rounded down and the leftover places go to the largest remainders, so
    class proportions in the test set match the data's as closely as whole
    numbers allow.
    """
    n = y.shape[0]
    n_test = min(max(round(test_fraction * n), 1), n - 1)
    _, dense, counts = np.unique(y, return_inverse=True, return_counts=True)
    dense = dense.reshape(-1)
    quota = counts * (n_test / n)
    take = np.floor(quota).astype(np.int64)
    leftover = n_test - int(take.sum())
    if leftover > 0:
        take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1
    take = np.minimum(take, counts)
    perm = rng.permutation(n)
    order = perm[np.argsort(dense[perm], kind="stable")]
    first = np.cumsum(counts) - counts
    rank = np.arange(n) - first[dense[order]]
    is_test = rank < take[dense[order]]
    return np.sort(order[~is_test]).astype(np.int64), np.sort(order[is_test]).astype(np.int64)


def _load_synthetic(
    data: str, *, partition: str | None, num_devices: int | None, seed: int
) -> FederatedData:
    alpha, beta, iid, count = _parse_synthetic(data)
    if partition is not None or (num_devices is not None and num_devices != count):
        given = ", ".join(
            f"{flag} {value}"
            for flag, value in (("--partition", partition), ("--devices", num_devices))
            if value is not None
        )
        raise ConfigError(
            f"data {data!r}: synthetic data comes partitioned into its "
            f"{count} devices, so --partition/--devices do not apply (got {given}); "
            "set the count in the name instead: synthetic:ALPHA,BETA,DEVICES"
        )
    pairs = synthetic_fedprox(
        alpha,
        beta,
        iid=iid,
        rng=np.random.default_rng([seed, _STREAM_SYNTHETIC]),
        num_devices=count,
    )
    test = Dataset(
        x=np.concatenate([t.x for _, t in pairs]), y=np.concatenate([t.y for _, t in pairs])
    )
    top = max(int(test.y.max()), *(int(d.y.max()) for d, _ in pairs))
    return FederatedData(
        name=data,
        devices=tuple(d for d, _ in pairs),
        test=test,
        spec=DataSpec(num_features=SYNTHETIC_NUM_FEATURES, num_classes=top + 1),
    )


def synthetic_shard(data: str, *, seed: int, keep: Callable[[int], bool]) -> dict[int, Dataset]:
    """The training sets of the devices ``k`` with ``keep(k)`` of ``load_federated(data, ...)``.

    For a worker that owns some of a synthetic federation's devices: the same
    examples ``load_federated`` gives those devices, without building the
    others' data or the central test set.

    Raises:
        ConfigError: ``data`` is not a valid ``synthetic:...`` name.
    """
    alpha, beta, iid, count = _parse_synthetic(data)
    pairs = synthetic_fedprox(alpha, beta, iid=iid, rng=np.random.default_rng([seed, _STREAM_SYNTHETIC]),
                              num_devices=count, keep=keep)
    mine = [k for k in range(count) if keep(k)]
    return {k: train for k, (train, _) in zip(mine, pairs, strict=True)}


def _parse_synthetic(data: str) -> tuple[float, float, bool, int]:
    """``synthetic:ALPHA,BETA[,DEVICES]`` or ``synthetic:iid[,DEVICES]`` -> (alpha, beta, iid, devices)."""
    fields = [f.strip() for f in data.partition(":")[2].split(",")]
    if fields[0].lower() == "iid" and len(fields) <= 2:
        alpha, beta, iid, rest = 0.0, 0.0, True, fields[1:]
    elif len(fields) in (2, 3) and fields[0].lower() != "iid":
        alpha = _parse_non_negative(data, "alpha", fields[0])
        beta = _parse_non_negative(data, "beta", fields[1])
        iid, rest = False, fields[2:]
    else:
        raise ConfigError(
            f"data {data!r}: expected synthetic:ALPHA,BETA[,DEVICES] (e.g. synthetic:0.5,0.5 or "
            f"synthetic:0.5,0.5,10000) or synthetic:iid[,DEVICES]"
        )
    if not rest:
        return alpha, beta, iid, SYNTHETIC_NUM_DEVICES
    text = rest[0]
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= SYNTHETIC_MAX_DEVICES:
        raise ConfigError(
            f"data {data!r}: DEVICES must be an integer between 1 and {SYNTHETIC_MAX_DEVICES:,}, "
            f"got {text!r}"
        )
    return alpha, beta, iid, int(text)


def _parse_non_negative(data: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            f"data {data!r}: {name} must be a number >= 0, got {text.strip()!r}"
        ) from None
    return _check_non_negative(f"data {data!r}", name, value)
