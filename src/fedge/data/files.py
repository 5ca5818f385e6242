"""Device-side loaders: read a local ``.npz`` or ``.csv`` file into a :class:`Dataset`.

These run on devices against files their owners put there, so every malformed
input is refused with a :class:`~fedge.errors.DataError` that names the file and,
for CSV, the line and column. Nothing here unpickles: ``.npz`` archives are read
with ``allow_pickle=False``, so an object array is an error, never code run.

CSV files are parsed by :func:`numpy.loadtxt` in one pass; only when that fails,
or the values are not finite, is the text scanned again in Python to say where.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedge.data.dataset import MAX_LABEL, Dataset, make_dataset
from fedge.errors import DataError

__all__ = ["load_csv", "load_file", "load_npz"]

#: dtype kinds accepted for arrays in an ``.npz`` file: bool, int, uint, float.
_NUMERIC_KINDS = "biuf"


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Load a NumPy ``.npz`` archive holding arrays ``x`` (features) and ``y`` (labels).

    Args:
        path: the archive. ``x`` has shape ``(n, ...)`` (extra dimensions are
            flattened), ``y`` has shape ``(n,)`` with integer labels ``>= 0``.

    Returns:
        The examples, features as float32 and labels as int64.

    Raises:
        DataError: the file is missing or unreadable, is not an ``.npz``
            archive, lacks ``x`` or ``y``, holds object (pickled) or other
            non-numeric arrays, or the arrays fail :func:`make_dataset`.
    """
    source = str(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{source}: cannot read as an .npz archive ({e})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{source}: not an .npz archive (a single .npy array?)")
    with loaded:
        missing = [k for k in ("x", "y") if k not in loaded.files]
        if missing:
            raise DataError(
                f"{source}: missing array {' and '.join(map(repr, missing))}; "
                f"found {sorted(loaded.files)}; expected 'x' (features) and 'y' (labels)"
            )
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        for key in ("x", "y"):
            try:
                arrays[key] = loaded[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                # allow_pickle=False makes object arrays raise ValueError here.
                raise DataError(f"{source}: cannot read array {key!r} ({e})") from e
            if arrays[key].dtype.kind not in _NUMERIC_KINDS:
                raise DataError(
                    f"{source}: array {key!r} must be numeric, got dtype {arrays[key].dtype}"
                )
    return make_dataset(arrays["x"], arrays["y"], source=source)


def load_csv(path: str | os.PathLike[str]) -> Dataset:
    """Load a comma-separated file: feature columns, then the integer label last.

    The first row is a header, and skipped, when every one of its cells is
    non-numeric. Blank lines are skipped. A UTF-8 byte-order mark is allowed.

    Args:
        path: the file.

    Returns:
        The examples, features as float32 and labels as int64.

    Raises:
        DataError: the file is missing, unreadable, not UTF-8 or empty; a row
            has a different number of cells from the first (names the line);
            a cell is not a number, or is NaN or infinite (names the line,
            the column and the cell); a label is not an integer ``>= 0``;
            there are fewer than two columns.
    """
    source = str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise DataError(f"{source}: cannot read ({e})") from e

    lines = text.split("\n")  # universal newlines: "\r\n" and "\r" already read as "\n"
    line_numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]
    if not line_numbers:
        raise DataError(f"{source}: empty file")
    first = lines[line_numbers[0] - 1].split(",")
    if not any(_is_number(cell) for cell in first):
        line_numbers = line_numbers[1:]  # a header row: every cell is non-numeric
        if not line_numbers:
            raise DataError(f"{source}: a header row but no data rows")
    rows = [lines[i - 1] for i in line_numbers]

    try:
        table = np.loadtxt(rows, delimiter=",", comments=None, dtype=np.float64, ndmin=2)
    except ValueError as e:
        _raise_located(source, lines, line_numbers)
        raise DataError(f"{source}: cannot parse as CSV ({e})") from e
    if table.shape[1] < 2:
        raise DataError(
            f"{source}: needs at least two columns (features, then the label), "
            f"got {table.shape[1]}"
        )
    bad = ~np.isfinite(table)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        cell = rows[row].split(",")[col].strip()
        raise DataError(
            f"{source}: line {line_numbers[row]}, column {col + 1}: "
            f"{cell!r} is not a finite number"
        )
    labels = table[:, -1]
    bad_label = (labels != np.floor(labels)) | (labels < 0) | (labels > MAX_LABEL)
    if bad_label.any():
        row = int(np.argmax(bad_label))
        cell = rows[row].split(",")[-1].strip()
        raise DataError(
            f"{source}: line {line_numbers[row]}, column {table.shape[1]}: "
            f"label {cell!r} is not an integer in [0, {MAX_LABEL}]"
        )
    return make_dataset(table[:, :-1], labels.astype(np.int64), source=source)


def load_file(path: str | os.PathLike[str]) -> Dataset:
    """Load a ``.npz`` or ``.csv`` file, chosen by its suffix (case-insensitive).

    Args:
        path: the file.

    Returns:
        The examples, features as float32 and labels as int64.

    Raises:
        DataError: the suffix is neither ``.npz`` nor ``.csv``, or the loader
            for it refused the file.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        return load_npz(path)
    if suffix == ".csv":
        return load_csv(path)
    raise DataError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; expected .npz or .csv")


def _is_number(cell: str) -> bool:
    """Whether ``cell`` reads as a float the way :func:`numpy.loadtxt` reads it."""
    if "_" in cell:  # Python's float() allows digit separators; loadtxt does not
        return False
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _raise_located(source: str, lines: list[str], line_numbers: list[int]) -> None:
    """Find the first ragged row or non-numeric cell and raise a DataError naming it."""
    width = len(lines[line_numbers[0] - 1].split(","))
    for number in line_numbers:
        cells = lines[number - 1].split(",")
        if len(cells) != width:
            raise DataError(
                f"{source}: line {number} has {len(cells)} cells, expected {width} "
                f"as on line {line_numbers[0]}"
            )
        for column, cell in enumerate(cells, start=1):
            if not _is_number(cell):
                raise DataError(
                    f"{source}: line {number}, column {column}: {cell.strip()!r} is not a number"
                )
            if not math.isfinite(float(cell)):
                raise DataError(
                    f"{source}: line {number}, column {column}: "
                    f"{cell.strip()!r} is not a finite number"
                )
