"""Fixed-point encoding for secure aggregation: a grid shared by all devices, sums mod 2^32.

Secure aggregation adds integers mod 2^32, so each device turns its float
update into integers on *one grid every device uses* (a per-device scale would
make the integer sum meaningless):

1. clip every value to ``[-clip, clip]``;
2. scale by ``weight / max_weight`` (the device's example count over the largest
   allowed), so the device encodes its share of FedAvg's weighted sum;
3. divide by the grid step ``clip / (2^(bits-1) - 1)`` and round
   *stochastically* (up with probability equal to the fraction), which is
   unbiased: E[q] = y. The dither is AES-256-CTR keystream under 32 bytes
   drawn from the device's generator (:func:`~fedge.secagg.primitives.expand_mask`):
   a cryptographic stream, and three times cheaper than numpy's uniforms;
4. write the integers in two's complement as uint32, and append the weight
   itself as one more coordinate.

The coordinator's unmasked sum then holds ``sum_i q_i`` (read back as int32)
and ``W = sum_i w_i`` exactly, so the weighted mean is
``sum_i q_i * step * max_weight / W``: the FedAvg weights are exact integers
and the only error is the unbiased rounding, at most ``step * max_weight``
per device and coordinate before the division by ``W``.

No wrap-around, ever: each device's integer lies in ``[-(2^(bits-1)-1),
2^(bits-1)-1]``, so the sum of ``cohort_size`` of them fits int32 when
``cohort_size * (2^(bits-1) - 1) <= 2^31 - 1``, and the weights fit when
``cohort_size * max_weight <= 2^32 - 1``. :class:`FixedPoint` refuses any other
configuration with a :class:`~fedge.errors.ConfigError` before the round, and
:meth:`FixedPoint.encode` refuses a weight above ``max_weight``; nothing saturates silently.

**Noise headroom (distributed DP).** When every device also adds a share of
Gaussian noise on the grid (:mod:`fedge.privacy.distributed`), the sum holds
``sum_i q_i`` plus a noise of standard deviation ``sqrt(cohort_size) * s``
(``s`` = one share's standard deviation, ``noise_stddev``, in grid steps)
plus up to ``cohort_size / 2`` from rounding each share. The range check then
keeps :data:`NOISE_TAIL` standard deviations free above the values:
``cohort_size * levels + NOISE_TAIL * sqrt(cohort_size) * s + cohort_size / 2
<= 2^31 - 1``. Gaussian noise is unbounded, so that is a probability, stated
where :data:`NOISE_TAIL` is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedge.errors import ConfigError
from fedge.secagg.primitives import KEY_BYTES, expand_mask

__all__ = ["NOISE_TAIL", "FixedPoint", "max_bits", "pack", "unpack"]

_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1
#: Standard deviations of the summed noise kept free below the int32 limit.
#: P(|N(0, 1)| > 12) < 4e-33 < 2^-107, so even over 2^32 coordinates and 2^20
#: rounds the chance that any coordinate wraps is below 2^-55.
NOISE_TAIL = 12.0
#: Values per block in the dithering and noise loops: small temporaries that
#: stay in cache (and under glibc's mmap threshold, so they cost no page faults).
_BLOCK = 8192


def _sum_bound(cohort_size: int, levels: int, noise_steps: float) -> float:
    """``n * levels``, plus ``NOISE_TAIL`` sigmas of ``n`` noise shares and their rounding."""
    bound = float(cohort_size * levels)
    if noise_steps > 0:
        bound += NOISE_TAIL * math.sqrt(cohort_size) * noise_steps + cohort_size / 2
    return bound


def max_bits(cohort_size: int) -> int:
    """The largest bit width whose sum over ``cohort_size`` devices cannot wrap."""
    if isinstance(cohort_size, bool) or not isinstance(cohort_size, int) or cohort_size < 1:
        raise ConfigError(f"cohort size must be a positive integer, got {cohort_size!r}")
    # largest b with cohort_size * (2^(b-1) - 1) <= 2^31 - 1
    level = _INT32_MAX // cohort_size
    bits = (level + 1).bit_length()  # 2^(bits-1) <= level + 1
    if bits < 2:
        raise ConfigError(f"a cohort of {cohort_size} devices leaves no room for any bits")
    return min(bits, 32)


@dataclass(frozen=True)
class FixedPoint:
    """The shared grid of one round.

    Args:
        clip: every value is clipped to [-clip, clip] (positive, finite).
        bits: signed bit width of one device's value (2..32).
        max_weight: the largest example count a device may report.
        cohort_size: how many devices' vectors are summed.
        noise_stddev: standard deviation of the noise share each device adds
            (distributed DP), in the values' units; 0 without noise.

    Raises:
        ConfigError: a bad value, or a combination whose sum could wrap around 2^32.
    """

    clip: float
    bits: int
    max_weight: int
    cohort_size: int
    noise_stddev: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"secagg clip must be a positive finite number, got {self.clip!r}")
        for name in ("bits", "max_weight", "cohort_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"secagg {name} must be a positive integer, got {v!r}")
        if not 2 <= self.bits <= 32:
            raise ConfigError(f"secagg bits must be between 2 and 32, got {self.bits}")
        noise = self.noise_stddev
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not (
            math.isfinite(noise) and noise >= 0
        ):
            raise ConfigError(f"secagg noise_stddev must be a finite number >= 0, got {noise!r}")
        if self.sum_bound > _INT32_MAX:
            hint = (f"use --secagg-bits {max_bits(self.cohort_size)} or fewer, or a smaller cohort"
                    if noise == 0 else "use fewer --secagg-bits, a smaller cohort or less noise")
            raise ConfigError(
                f"secagg: {self.cohort_size} devices x {self.bits}-bit values"
                + (f" with noise shares of {noise:g} ({self.noise_steps:.4g} steps) each"
                   if noise else "")
                + f" could wrap around 2^32 (needs the sum's bound {self.sum_bound:.4g} <= "
                f"2^31 - 1); {hint}"
            )
        if self.cohort_size * self.max_weight > _UINT32_MAX:
            raise ConfigError(
                f"secagg: {self.cohort_size} devices x weights up to {self.max_weight} examples "
                "could wrap the weight sum around 2^32; lower the weight range or the cohort"
            )

    @property
    def levels(self) -> int:
        """Grid points on each side of zero: 2^(bits-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    @property
    def step(self) -> float:
        """The grid step every device uses."""
        return self.clip / self.levels

    @property
    def noise_steps(self) -> float:
        """One device's noise share, in grid steps."""
        return self.noise_stddev / self.step

    @property
    def sum_bound(self) -> float:
        """The largest |sum| of one coordinate over the cohort (noise: up to NOISE_TAIL sigmas)."""
        return _sum_bound(self.cohort_size, self.levels, self.noise_steps)

    @classmethod
    def finest(cls, *, clip: float, max_weight: int, cohort_size: int, noise_stddev: float = 0.0,
               max_bits: int = 32) -> FixedPoint:
        """The grid with the most bits (at most ``max_bits``) that cannot wrap.

        The noise is given in the values' units, so a finer grid holds more
        steps of it: the sum's bound grows with the bits, noise or not, and
        the search runs from ``max_bits`` down.

        Raises:
            ConfigError: not even 2 bits fit, or a bad argument.
        """
        if isinstance(max_bits, bool) or not isinstance(max_bits, int) or not 2 <= max_bits <= 32:
            raise ConfigError(f"secagg max_bits must be between 2 and 32, got {max_bits!r}")
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool)
                      for v in (clip, cohort_size, noise_stddev))
        bits = 2
        if numeric and clip > 0:  # else the constructor says what is wrong
            for bits in range(max_bits, 1, -1):
                levels = (1 << (bits - 1)) - 1
                if _sum_bound(cohort_size, levels, noise_stddev * levels / clip) <= _INT32_MAX:
                    break
        # The constructor checks everything (and refuses, naming why, if not even 2 bits fit).
        return cls(clip=clip, bits=bits, max_weight=max_weight, cohort_size=cohort_size,
                   noise_stddev=noise_stddev)

    @property
    def wire_bits(self) -> int:
        """Bits per coordinate a masked vector needs on the wire.

        Masks are uniform mod 2^32, hence also mod 2^m for any m <= 32, and the
        true sum fits m = bits + ceil(log2(cohort_size)) signed bits (and the
        weight sum ceil(log2(cohort_size * max_weight + 1)) bits), so a device
        may send only the low m bits of each masked value (:func:`pack`): the
        coordinator's sum mod 2^m still decodes exactly.
        """
        values = math.ceil(self.sum_bound).bit_length() + 1  # a sign bit
        weights = (self.cohort_size * self.max_weight).bit_length()
        return min(32, max(values, weights))

    def encode(
        self, values: npt.NDArray[np.floating], weight: int, rng: np.random.Generator, *,
        overwrite: bool = False,
    ) -> npt.NDArray[np.uint32]:
        """``values`` (1-D float) -> uint32 vector of ``len(values) + 1`` (weight last).

        ``overwrite=True`` lets a 1-D float64 ``values`` serve as the working
        buffer (its contents are lost): one copy of the update fewer.

        Raises:
            ConfigError: ``weight`` outside 1..max_weight, or non-finite values.
        """
        if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or not (
            1 <= weight <= self.max_weight
        ):
            raise ConfigError(
                f"secagg: example weight must be in 1..{self.max_weight}, got {weight!r}"
            )
        x = np.asarray(values).reshape(-1)
        if not np.isfinite(x).all():
            raise ConfigError("secagg: cannot encode non-finite values")
        out = np.empty(x.size + 1, dtype=np.uint32)
        # float64, the grid may be finer than float32; a copy unless the caller gave its buffer
        y = x if overwrite and x.dtype == np.float64 and x.flags.c_contiguous else (
            np.array(x, dtype=np.float64))
        self.quantize_(y, int(weight) / self.max_weight, rng, scratch=out[:-1])
        # y holds integers in [-levels, levels], which fit int32: cast straight
        # into the output, whose uint32 view is then the two's complement.
        np.copyto(out[:-1].view(np.int32), y, casting="unsafe")
        out[-1] = int(weight)
        return out

    def quantize_(self, y: npt.NDArray[np.float64], factor: float, rng: np.random.Generator, *,
                  scratch: npt.NDArray[np.uint32]) -> None:
        """``y`` (float64, overwritten) -> the grid integers of ``clip(y) * factor``, as floats.

        Clip to ``[-clip, clip]``, scale by ``factor / step``, then round
        stochastically: ``floor(y + u)`` with ``u = k / 2^32`` from a 32-bit
        keystream word ``k`` (AES-256-CTR under 32 bytes of ``rng``, written
        into ``scratch``, a uint32 buffer of ``y``'s length that is clobbered).
        Rounds up with probability ``frac(y)`` to within 2^-30: unbiased for
        any purpose here.
        """
        if y.dtype != np.float64 or y.ndim != 1 or scratch.dtype != np.uint32 or (
            scratch.shape != y.shape or not scratch.flags.c_contiguous
        ):
            raise ConfigError("secagg: quantize_ needs a 1-D float64 vector and a uint32 scratch "
                              "buffer of its length")
        np.clip(y, -self.clip, self.clip, out=y)
        y *= factor / self.step
        # |y| <= levels up to float rounding; the clip keeps floor(y + u) in range
        np.clip(y, -self.levels, self.levels, out=y)
        expand_mask(rng.bytes(KEY_BYTES), scratch)
        u = np.empty(min(_BLOCK, y.size), dtype=np.float64)
        for lo in range(0, y.size, _BLOCK):
            part = y[lo : lo + _BLOCK]
            dither = u[: part.size]
            np.multiply(scratch[lo : lo + _BLOCK], 2.0**-32, out=dither)
            part += dither
        np.floor(y, out=y)

    def decode(self, total: npt.NDArray[np.uint32]) -> tuple[npt.NDArray[np.float64], int]:
        """An unmasked sum -> (the weighted mean of the values, the total weight).

        Raises:
            ConfigError: not a uint32 vector, or a zero total weight.
        """
        if not isinstance(total, np.ndarray) or total.dtype != np.uint32 or total.ndim != 1:
            raise ConfigError("secagg: a sum to decode must be a 1-D uint32 vector")
        weight = int(total[-1])
        if weight == 0:
            raise ConfigError("secagg: the decoded sum has zero total weight")
        sums = total[:-1].view(np.int32).astype(np.float64)
        sums *= self.step * self.max_weight / weight
        return sums, weight


def pack(vector: npt.NDArray[np.uint32], bits: int) -> bytes:
    """The low ``bits`` bits of every value, packed little-endian (see ``wire_bits``)."""
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.ndim != 1:
        raise ConfigError("pack needs a 1-D uint32 vector")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
        raise ConfigError(f"pack bits must be in 1..32, got {bits!r}")
    planes = np.unpackbits(vector.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    return np.packbits(planes[:, :bits].reshape(-1), bitorder="little").tobytes()


def unpack(raw: bytes, bits: int, length: int) -> npt.NDArray[np.uint32]:
    """Inverse of :func:`pack`: ``length`` values of ``bits`` bits (mod 2^bits)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
        raise ConfigError(f"unpack bits must be in 1..32, got {bits!r}")
    if len(raw) != (length * bits + 7) // 8:
        raise ConfigError(f"packed vector has {len(raw)} bytes, expected "
                          f"{(length * bits + 7) // 8} for {length} values of {bits} bits")
    flat = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: length * bits]
    planes = np.zeros((length, 32), dtype=np.uint8)
    planes[:, :bits] = flat.reshape(length, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(-1).view(np.uint32).copy()
