"""Pure operations on params: an ordered mapping from tensor name to numpy array.

Params are plain ``dict[str, ndarray]`` so that they cross every boundary
(safetensors files, worker pipes, the wire) without a wrapper type. The
functions here never mutate their inputs unless their name ends in ``_``
(``add_scaled_``), and they check that two params agree in names and shapes
before combining them, because a silent broadcast between mismatched tensors
is the kind of bug that trains a wrong model without an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = [
    "Array",
    "Params",
    "ParamsSpec",
    "add",
    "add_scaled_",
    "check_finite",
    "check_same_structure",
    "clip_by_l2",
    "copy",
    "flatten",
    "l2_norm",
    "num_values",
    "scale",
    "subtract",
    "unflatten",
    "zeros_like",
]

Array: TypeAlias = npt.NDArray[np.floating[Any]]
Params: TypeAlias = dict[str, Array]

# From this many values on, add_scaled_ hands a tensor to BLAS axpy; below it,
# the call overhead of the BLAS wrapper outweighs the memory traffic it saves.
_BLOCK = 1 << 16


@dataclass(frozen=True)
class ParamsSpec:
    """Names, shapes and dtypes of a params mapping, in order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, params: Mapping[str, Array]) -> ParamsSpec:
        return cls(
            names=tuple(params),
            shapes=tuple(tuple(int(d) for d in a.shape) for a in params.values()),
            dtypes=tuple(a.dtype.str for a in params.values()),
        )

    @property
    def size(self) -> int:
        """Total number of values."""
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)


def check_same_structure(a: Mapping[str, Array], b: Mapping[str, Array]) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same names and shapes."""
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise ValueError(f"params differ in names: missing {missing}, unexpected {extra}")
    for name, x in a.items():
        if x.shape != b[name].shape:
            raise ValueError(
                f"params differ in shape for {name!r}: {x.shape} against {b[name].shape}"
            )


def check_finite(params: Mapping[str, Array], *, what: str = "params") -> None:
    """Raise ``ValueError`` naming the first tensor that holds NaN or infinity."""
    for name, x in params.items():
        if not np.isfinite(x).all():
            raise ValueError(f"{what} tensor {name!r} holds NaN or infinite values")


def copy(params: Mapping[str, Array]) -> Params:
    """A deep copy: new arrays, same names, shapes and dtypes."""
    return {k: np.array(v, copy=True) for k, v in params.items()}


def zeros_like(params: Mapping[str, Array], dtype: npt.DTypeLike | None = None) -> Params:
    """Zeros shaped like ``params`` (in ``dtype`` if given)."""
    return {k: np.zeros_like(v, dtype=dtype) for k, v in params.items()}


def add(a: Mapping[str, Array], b: Mapping[str, Array]) -> Params:
    """``a + b`` tensor by tensor; raises ``ValueError`` if their structures differ."""
    check_same_structure(a, b)
    return {k: a[k] + b[k] for k in a}


def subtract(a: Mapping[str, Array], b: Mapping[str, Array]) -> Params:
    """``a - b`` tensor by tensor; raises ``ValueError`` if their structures differ."""
    check_same_structure(a, b)
    return {k: a[k] - b[k] for k in a}


def scale(params: Mapping[str, Array], factor: float) -> Params:
    """``factor * params``, keeping each tensor's dtype."""
    return {k: v * v.dtype.type(factor) for k, v in params.items()}


def add_scaled_(acc: Params, x: Mapping[str, Array], factor: float) -> None:
    """In place: ``acc += factor * x``, tensor by tensor, without a full-size temporary.

    This is the hot loop of streaming aggregation. For a large tensor of
    matching dtype it calls BLAS ``axpy`` (through SciPy, when installed), a
    single pass that reads ``x`` once and ``acc`` once: about 3x faster than
    numpy's ``acc += x * factor``, which streams a full-size temporary through
    memory. Small tensors take the numpy path, which costs less to call.
    """
    check_same_structure(acc, x)
    for k, a in acc.items():
        v = x[k]
        axpy = _axpy(a, v)
        if axpy is None:
            np.add(a, v * a.dtype.type(factor), out=a)
        else:
            axpy(v.reshape(-1), a.reshape(-1), a=factor)


_AXPY_CACHE: dict[str, Any] = {}


def _axpy(a: Array, v: Array) -> Any:
    """BLAS axpy for ``a``'s dtype if it applies to (a, v), else None."""
    if (
        a.size < _BLOCK
        or a.dtype != v.dtype
        or a.dtype not in (np.float32, np.float64)
        or not (a.flags.c_contiguous and v.flags.c_contiguous and a.flags.writeable)
    ):
        return None
    if not _AXPY_CACHE:
        try:
            from scipy.linalg import blas
        except ImportError:  # numpy-only install (a small device): the numpy path is correct
            _AXPY_CACHE["float32"] = _AXPY_CACHE["float64"] = None
        else:
            _AXPY_CACHE["float32"] = blas.saxpy
            _AXPY_CACHE["float64"] = blas.daxpy
    return _AXPY_CACHE[a.dtype.name]


def l2_norm(params: Mapping[str, Array]) -> float:
    """The L2 norm of all values together, accumulated in float64."""
    total = 0.0
    for v in params.values():
        f = v.reshape(-1).astype(np.float64, copy=False)
        total += float(np.dot(f, f))
    return float(np.sqrt(total))


def clip_by_l2(params: Mapping[str, Array], clip_norm: float) -> tuple[Params, float]:
    """Scale ``params`` down so its global L2 norm is at most ``clip_norm``.

    Returns the clipped params and the norm before clipping. Params already
    inside the ball are returned unchanged (copied), so clipping never scales up.

    Raises:
        ValueError: ``clip_norm`` is not a positive finite number.
    """
    if not (np.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
    norm = l2_norm(params)
    if not np.isfinite(norm):
        raise ValueError("cannot clip params holding NaN or infinite values")
    if norm <= clip_norm:
        return copy(params), norm
    return scale(params, clip_norm / norm), norm


def num_values(params: Mapping[str, Array]) -> int:
    """How many values ``params`` holds in all."""
    return sum(int(v.size) for v in params.values())


def flatten(params: Mapping[str, Array], dtype: npt.DTypeLike | None = None) -> npt.NDArray[Any]:
    """Concatenate every tensor, in order, into one 1-D array.

    ``dtype`` defaults to the common type of the tensors, so no precision is lost.
    """
    if dtype is None:
        dtype = np.result_type(*params.values()) if params else np.float32
    out = np.empty(num_values(params), dtype=dtype)
    pos = 0
    for v in params.values():
        out[pos : pos + v.size] = v.reshape(-1)
        pos += v.size
    return out


def unflatten(flat: npt.NDArray[Any], spec: ParamsSpec) -> Params:
    """Inverse of :func:`flatten`: cut ``flat`` into tensors of ``spec``'s shapes and dtypes.

    Raises:
        ValueError: ``flat`` is not 1-D or its length differs from ``spec.size``.
    """
    if flat.ndim != 1 or flat.size != spec.size:
        raise ValueError(
            f"flat vector of shape {flat.shape} does not match params of {spec.size} values"
        )
    out: Params = {}
    pos = 0
    for name, shape, dtype in zip(spec.names, spec.shapes, spec.dtypes, strict=True):
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = flat[pos : pos + n].astype(dtype).reshape(shape)
        pos += n
    return out
