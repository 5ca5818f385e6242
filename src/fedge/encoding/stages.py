"""Encoding stages: each one an ``encode``/``decode`` pair over one flat tensor.

Two kinds of stage exist, and a pipeline (:mod:`fedge.encoding.pipeline`)
applies at most one of each, in a fixed order:

* a **sparsifier** (:class:`TopK`) chooses which coordinates of a tensor are
  sent and encodes their positions;
* a **value coder** turns the chosen values into wire tensors:
  :class:`Float32` (as they are), :class:`Float16`, or
  :class:`StochasticQuantizer` (8 or 4 bits, stochastic rounding onto a
  uniform grid; Alistarh et al., "QSGD", NeurIPS 2017, and Suresh et al.,
  "Distributed mean estimation with limited communication", ICML 2017).

A stage's wire layout (part names, dtypes and shapes) depends only on the
tensor's length and the stage's settings, so a decoder knows the exact layout
to expect before it reads anything a device sent, and refuses any other.
Every refusal of a malformed encoded tensor raises
:class:`~fedge.errors.ProtocolError`; nothing here crashes on hostile input.

This module is pure: randomness comes from generators passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedge.errors import ProtocolError

__all__ = [
    "Float16",
    "Float32",
    "Layout",
    "StochasticQuantizer",
    "TopK",
    "ValueCoder",
    "index_dtype",
]

FloatArray = npt.NDArray[np.floating[Any]]
#: A stage's wire layout: part name -> (numpy dtype string, shape).
Layout = dict[str, tuple[str, tuple[int, ...]]]

# The largest finite float16; a delta beyond it cannot be sent as float16.
_F16_MAX = float(np.finfo(np.float16).max)


def _bad(reason: str, detail: str) -> ProtocolError:
    # The statuses match fedge.wire.REFUSALS (not imported: wire imports us).
    return ProtocolError(reason, detail, 422 if reason == "non_finite" else 400)


class ValueCoder(Protocol):
    """Turns a flat float vector into wire parts, and back."""

    @property
    def name(self) -> str:
        """The stage's name in a ``--compress`` spec (``fp16``, ``q8``...)."""
        ...

    @property
    def per_device_scale(self) -> bool:
        """True when the grid depends on the device's own values (per-device scales).

        Two devices' codes then mean different things, so their sum means
        nothing and secure aggregation cannot sum them.
        """
        ...

    def layout(self, n: int) -> Layout:
        """The parts that encode ``n`` values."""
        ...

    def encode(self, x: FloatArray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Encode the 1-D vector ``x``."""
        ...

    def decode(self, parts: Mapping[str, np.ndarray], n: int) -> npt.NDArray[np.float64]:
        """Decode ``n`` values from ``parts`` (already checked against :meth:`layout`).

        Raises:
            ProtocolError: ``bad_payload`` or ``non_finite`` for values no
                honest encoder produces.
        """
        ...


@dataclass(frozen=True)
class Float32:
    """Values sent as float32 (what top-k sends when no other value coder is named)."""

    name: str = "f32"
    per_device_scale: bool = False

    def layout(self, n: int) -> Layout:
        return {"v": ("<f4", (n,))}

    def encode(self, x: FloatArray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"v": np.ascontiguousarray(x, dtype=np.float32)}

    def decode(self, parts: Mapping[str, np.ndarray], n: int) -> npt.NDArray[np.float64]:
        out = parts["v"].astype(np.float64)
        if not np.isfinite(out).all():
            raise _bad("non_finite", "values hold NaN or infinity")
        return out


@dataclass(frozen=True)
class Float16:
    """Values rounded to the nearest float16: half the bytes, ~3 decimal digits.

    A value beyond float16's range (65504) becomes infinite and the decoder
    refuses the update as non-finite, as it would any diverged update.
    """

    name: str = "fp16"
    per_device_scale: bool = False

    def layout(self, n: int) -> Layout:
        return {"h": ("<f2", (n,))}

    def encode(self, x: FloatArray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        with np.errstate(over="ignore"):
            return {"h": np.asarray(x).astype(np.float16)}

    def decode(self, parts: Mapping[str, np.ndarray], n: int) -> npt.NDArray[np.float64]:
        out = parts["h"].astype(np.float64)
        if not np.isfinite(out).all():
            raise _bad("non_finite", "float16 values hold NaN or infinity (beyond float16's range?)")
        return out


@dataclass(frozen=True)
class StochasticQuantizer:
    """Stochastic uniform quantization to ``bits`` (8 or 4) bits per value.

    Each bucket of ``bucket_size`` consecutive values (the whole tensor when
    ``None``) gets its own grid of ``2**bits`` levels from its minimum to its
    maximum, sent as (minimum, step) in float32. A value between two levels
    rounds up with probability equal to its distance from the lower one, so
    the decoded value is unbiased and within one step of the input.

    With ``shared_range`` R every device uses the same grid on [-R, R] (values
    are clipped to it first, which biases values beyond R) and no scales are
    sent: codes of different devices then mean the same thing and can be
    summed, which is what secure aggregation needs.

    4-bit codes are packed two per byte, the first in the low nibble.
    """

    bits: int
    bucket_size: int | None = None
    shared_range: float | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.bucket_size is not None and self.shared_range is not None:
            raise ValueError("a shared grid has no buckets: give bucket_size or shared_range, not both")

    @property
    def name(self) -> str:
        return f"q{self.bits}"

    @property
    def per_device_scale(self) -> bool:
        return self.shared_range is None

    @property
    def levels(self) -> int:
        """The largest code (the grid has ``levels + 1`` points)."""
        return (1 << self.bits) - 1

    def _buckets(self, n: int) -> int:
        if self.shared_range is not None:
            return 0
        size = self.bucket_size or max(n, 1)
        return -(-n // size)

    def layout(self, n: int) -> Layout:
        codes = n if self.bits == 8 else (n + 1) // 2
        out: Layout = {"q": ("|u1", (codes,))}
        if self.shared_range is None:
            out["s"] = ("<f4", (self._buckets(n), 2))
        return out

    def _grid(self, lo: npt.NDArray[np.float64], step: npt.NDArray[np.float64], n: int) -> tuple[
        npt.NDArray[np.float64], npt.NDArray[np.float64]
    ]:
        """Per-value (minimum, step), from one pair per bucket."""
        if self.shared_range is not None:
            return lo, step  # scalars broadcast
        size = self.bucket_size or max(n, 1)
        return np.repeat(lo, size)[:n], np.repeat(step, size)[:n]

    def encode(self, x: FloatArray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        x64 = np.asarray(x, dtype=np.float64).reshape(-1)
        n = x64.size
        out: dict[str, np.ndarray] = {}
        if self.shared_range is not None:
            r = float(self.shared_range)
            x64 = np.clip(x64, -r, r)
            lo = np.array(-r)
            step = np.array(2 * r / self.levels)
        elif n == 0:
            lo = step = np.zeros(0)
            out["s"] = np.zeros((0, 2), dtype=np.float32)
        else:
            starts = np.arange(0, n, self.bucket_size or n)
            lo32 = np.minimum.reduceat(x64, starts).astype(np.float32)
            hi = np.maximum.reduceat(x64, starts)
            step32 = ((hi - lo32.astype(np.float64)) / self.levels).astype(np.float32)
            # Rounding the step down to float32 could leave the maximum just
            # above the top level; one ulp more keeps every value on the grid.
            short = lo32.astype(np.float64) + self.levels * step32.astype(np.float64) < hi
            step32 = np.where(short, np.nextafter(step32, np.float32(np.inf)), step32)
            out["s"] = np.stack([lo32, step32], axis=1)
            lo, step = lo32.astype(np.float64), step32.astype(np.float64)
        lo_v, step_v = self._grid(lo, step, n)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(step_v > 0, (x64 - lo_v) / step_v, 0.0)
        codes = np.clip(np.floor(t + rng.random(n)), 0, self.levels).astype(np.uint8)
        if self.bits == 4:
            if n % 2:
                codes = np.append(codes, np.uint8(0))
            codes = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
        out["q"] = codes
        return out

    def decode(self, parts: Mapping[str, np.ndarray], n: int) -> npt.NDArray[np.float64]:
        packed = parts["q"]
        if self.bits == 8:
            codes = packed
        else:
            codes = np.empty(packed.size * 2, dtype=np.uint8)
            codes[0::2] = packed & 0x0F
            codes[1::2] = packed >> 4
            if codes.size > n and codes[n:].any():
                raise _bad("bad_payload", "4-bit codes have a non-zero padding nibble")
            codes = codes[:n]
        if self.shared_range is not None:
            r = float(self.shared_range)
            lo, step = np.array(-r), np.array(2 * r / self.levels)
        else:
            scales = parts["s"].astype(np.float64)
            if not np.isfinite(scales).all():
                raise _bad("bad_payload", "quantization scales hold NaN or infinity")
            lo, step = scales[:, 0], scales[:, 1]
            if (step < 0).any():
                raise _bad("bad_payload", "a quantization step is negative")
        lo_v, step_v = self._grid(lo, step, n)
        with np.errstate(over="ignore", invalid="ignore"):
            out = lo_v + codes.astype(np.float64) * step_v
        if not np.isfinite(out).all():
            raise _bad("non_finite", "quantization scales decode to infinite values")
        return np.asarray(out, dtype=np.float64)


def index_dtype(n: int) -> str:
    """The smallest unsigned dtype that holds every index of an ``n``-value tensor."""
    if n <= 1 << 8:
        return "|u1"
    if n <= 1 << 16:
        return "<u2"
    return "<u4"


@dataclass(frozen=True)
class TopK:
    """Top-k sparsification: the ``fraction`` of coordinates largest in magnitude.

    ``k = ceil(fraction * n)`` (at least 1) per tensor, so the receiver knows
    ``k`` from the tensor's size. Positions are sent sorted and gap-coded (the
    first index, then each difference to the previous one) in the smallest
    unsigned type that holds ``n - 1``: gaps are small numbers, which zstd
    packs well. What is not sent stays on the device as the error-feedback
    residual (Stich et al., "Sparsified SGD with memory", NeurIPS 2018;
    Karimireddy et al., "Error feedback fixes SignSGD", ICML 2019); the
    pipeline keeps that bookkeeping.
    """

    fraction: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"top-k fraction must be in (0, 1], got {self.fraction}")

    @property
    def name(self) -> str:
        return f"topk:{self.fraction:g}"

    def k(self, n: int) -> int:
        """How many of ``n`` values are sent."""
        if n == 0:
            return 0
        return min(n, max(1, math.ceil(self.fraction * n - 1e-9)))

    def layout(self, n: int) -> Layout:
        return {"i": (index_dtype(n), (self.k(n),))}

    def select(self, x: FloatArray) -> npt.NDArray[np.int64]:
        """Sorted indices of the ``k`` largest magnitudes of the 1-D ``x``."""
        n = x.size
        k = self.k(n)
        if k == n:
            return np.arange(n, dtype=np.int64)
        idx = np.argpartition(np.abs(x), n - k)[n - k :]
        return np.sort(idx).astype(np.int64)

    def encode_indices(self, idx: npt.NDArray[np.int64], n: int) -> dict[str, np.ndarray]:
        gaps = np.diff(idx, prepend=0) if idx.size else idx
        return {"i": gaps.astype(np.dtype(index_dtype(n)))}

    def decode_indices(self, parts: Mapping[str, np.ndarray], n: int) -> npt.NDArray[np.int64]:
        """Positions from the gap-coded part, refusing any an honest encoder never sends.

        Raises:
            ProtocolError: ``bad_payload`` for repeated, unordered or out-of-range positions.
        """
        gaps = parts["i"].astype(np.int64)
        if gaps.size and (gaps[1:] == 0).any():
            raise _bad("bad_payload", "top-k positions repeat (a gap of 0 after the first)")
        idx = np.cumsum(gaps)
        if idx.size and idx[-1] >= n:
            raise _bad("bad_payload", f"a top-k position is out of range for a tensor of {n} values")
        return idx
