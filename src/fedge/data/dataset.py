"""Dataset values: one device's examples, the shape of a problem, a federation's data.

These are plain frozen values with no I/O; loaders in :mod:`fedge.data.files`
and :mod:`fedge.data.sources` build them, tasks read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from fedge.errors import DataError

__all__ = ["MAX_LABEL", "DataSpec", "Dataset", "FederatedData", "make_dataset"]

#: The largest label accepted: labels are class ids and become int64 indices.
MAX_LABEL = 2**31 - 1
_CLASS_ALLOWANCE = 1000


@dataclass(frozen=True)
class Dataset:
    """Features ``x`` (float32, ``(n, num_features)``) and labels ``y`` (int64, ``(n,)``)."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @cached_property
    def label_range(self) -> tuple[int, int]:
        """The smallest and largest label (0, -1 when empty), computed once.

        Tasks check it on every train call; a simulated device's data is the
        same every round, and two reductions over a handful of labels cost
        more than a tiny device's SGD step.
        """
        if self.y.shape[0] == 0:
            return 0, -1
        return int(self.y.min()), int(self.y.max())

    def subset(self, index: npt.NDArray[np.integer[Any]]) -> Dataset:
        """The examples at ``index`` (copied, so a device's data owns its memory)."""
        return Dataset(x=self.x[index], y=self.y[index])


@dataclass(frozen=True)
class DataSpec:
    """What a task must know of the data to build its model."""

    num_features: int
    num_classes: int

    def __post_init__(self) -> None:
        if self.num_features < 1:
            raise DataError(f"data must have at least one feature, got {self.num_features}")
        if self.num_classes < 2:
            raise DataError(f"data must have at least two classes, got {self.num_classes}")


@dataclass(frozen=True)
class FederatedData:
    """A federation's data: each device's training examples and the central test set."""

    name: str
    devices: tuple[Dataset, ...]
    test: Dataset
    spec: DataSpec

    @property
    def num_examples(self) -> int:
        return sum(len(d) for d in self.devices)


def make_dataset(x: npt.ArrayLike, y: npt.ArrayLike, *, source: str) -> Dataset:
    """Validate and convert raw arrays into a :class:`Dataset`.

    Args:
        x: features, shape ``(n, ...)``; extra dimensions are flattened.
        y: integer class labels ``>= 0``, shape ``(n,)``.
        source: what the arrays came from, named in every error message.

    Raises:
        DataError: wrong shapes, non-numeric, NaN or infinite features, labels
            that are not non-negative integers, or no examples at all.
    """
    try:
        xa = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: features are not numeric ({e})") from e
    ya_raw = np.asarray(y)
    if xa.ndim < 2:
        raise DataError(
            f"{source}: features must be 2-D (examples x features), got shape {xa.shape}"
        )
    if ya_raw.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D, got shape {ya_raw.shape}")
    if xa.shape[0] != ya_raw.shape[0]:
        raise DataError(
            f"{source}: {xa.shape[0]} feature rows but {ya_raw.shape[0]} labels"
        )
    if xa.shape[0] == 0:
        raise DataError(f"{source}: no examples")
    xa = xa.reshape(xa.shape[0], -1)
    bad = ~np.isfinite(xa)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(
            f"{source}: feature values must be finite; "
            f"NaN or infinity at example {row}, feature {col}"
        )
    if ya_raw.dtype.kind not in "iuf":
        raise DataError(f"{source}: labels must be integers, got dtype {ya_raw.dtype}")
    ya_f = ya_raw.astype(np.float64)
    bad_label = ~np.isfinite(ya_f) | (ya_f != np.round(ya_f)) | (ya_f < 0) | (ya_f > MAX_LABEL)
    if bad_label.any():
        i = int(np.argmax(bad_label))
        raise DataError(
            f"{source}: labels must be integers >= 0 (class ids up to {MAX_LABEL}); "
            f"example {i} has {ya_raw[i].item()!r}"
        )
    # Labels are class ids 0..C-1: a model gets one output per class, so a
    # stray huge label would silently build (or fail to allocate) a huge model.
    # More classes than examples (past a small allowance) means the column is
    # not class ids.
    num_classes = int(ya_f.max()) + 1
    if num_classes > max(_CLASS_ALLOWANCE, ya_f.shape[0]):
        raise DataError(
            f"{source}: labels must be class ids 0..C-1, but the largest label is "
            f"{num_classes - 1} among only {ya_f.shape[0]} examples"
        )
    return Dataset(x=xa.astype(np.float32), y=ya_f.astype(np.int64))
