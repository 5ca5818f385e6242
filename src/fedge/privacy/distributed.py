"""Distributed DP: every device adds its share of the noise, so only a noised sum exists.

With secure aggregation the coordinator sees only the sum of the cohort's
updates, so central noise can be split among the devices: if at least
``min_contributors`` devices report, each adding noise of variance
``sigma^2 / min_contributors`` puts at least ``sigma^2`` into the sum, and
no single noised update is ever seen in the clear.

Secure aggregation works on integers mod 2^32 on a shared quantization grid
of step ``scale`` (:mod:`fedge.encoding`), so the noise lives on that grid
too. fedge uses the *rounded Gaussian* on the grid: each device

1. clips its update to L2 norm ``C``;
2. maps it to the grid by unbiased stochastic rounding, ``x / scale`` to one
   of its two neighbouring integers; each coordinate moves by less than one
   step, so the integer vector's L2 norm is at most ``C / scale + sqrt(d)``
   (the grid sensitivity, :func:`grid_sensitivity`);
3. adds integer noise ``round(N(0, s^2))`` with ``s = share_stddev / scale``.

The privacy argument and its limits are in docs/privacy.md: the noise is
data-independent; a rounded Gaussian with ``s`` of a few grid steps or more
is within a negligible distance of the discrete Gaussian of the same
variance, and a sum of ``m`` independent discrete Gaussians is close to the
discrete Gaussian of the summed variance (Kairouz, Liu, Steinke,
"The Distributed Discrete Gaussian Mechanism for Federated Learning with
Secure Aggregation", ICML 2021). The accountant charges the Gaussian
mechanism with the *effective* multiplier ``sqrt(m) * s / grid_sensitivity``
(:func:`effective_noise_multiplier`), which is below the nominal one by the
rounding inflation; that is an approximation, not a proof, and the docs say so.

The device's whole step (clip, grid, noise share, mod 2^32) is one function,
:func:`privatize_on_grid`, which the simulator calls for every device and a
networked agent must call too; :func:`plan_grid` fixes a run's grid and the
two noise multipliers (what the devices add, what the accountant charges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedge.encoding.fixedpoint import FixedPoint
from fedge.errors import ConfigError

__all__ = [
    "DistributedGrid",
    "DistributedPlan",
    "effective_noise_multiplier",
    "grid_sensitivity",
    "noise_share_on_grid",
    "plan_grid",
    "privatize_on_grid",
    "share_stddev",
    "stochastic_round",
]

IntArray = npt.NDArray[np.int64]
#: Values per block of noise drawn at once (a small, reused temporary).
_BLOCK = 8192
#: Largest grid (signed bits per value) the planner picks unless told: at 24
#: bits the rounding inflation of the sensitivity is below 1e-4 for models up
#: to 10^6 values at clip = value range, and finer grids buy nothing more.
DEFAULT_MAX_BITS = 24


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def share_stddev(*, noise_multiplier: float, clip_norm: float, min_contributors: int) -> float:
    """One device's noise stddev: ``min_contributors`` shares sum to ``noise_multiplier * clip_norm``."""
    z = _positive("noise_multiplier", noise_multiplier)
    c = _positive("clip_norm", clip_norm)
    m = _count("min_contributors", min_contributors)
    return z * c / math.sqrt(m)


def grid_sensitivity(*, clip_norm: float, scale: float, dim: int) -> float:
    """L2 bound, in grid steps, of a clipped update after stochastic rounding: ``C/scale + sqrt(d)``."""
    return _positive("clip_norm", clip_norm) / _positive("scale", scale) + math.sqrt(_count("dim", dim))


def effective_noise_multiplier(*, noise_multiplier: float, clip_norm: float, scale: float, dim: int,
                               min_contributors: int) -> float:
    """The multiplier the accountant charges for distributed DP: total grid noise over grid sensitivity.

    Each device's share is rounded to the grid in steps, so the total noise
    stddev in steps is ``sqrt(m) * share / scale``; rounding the update
    inflates the sensitivity to :func:`grid_sensitivity`.
    """
    share = share_stddev(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                         min_contributors=min_contributors)
    total = math.sqrt(min_contributors) * share / _positive("scale", scale)
    return total / grid_sensitivity(clip_norm=clip_norm, scale=scale, dim=dim)


def stochastic_round(x: npt.NDArray[np.floating], rng: np.random.Generator) -> IntArray:
    """Unbiased rounding to integers: ``floor(x) + 1`` with probability ``x - floor(x)``.

    Raises:
        ValueError: ``x`` holds NaN or infinity.
    """
    a = np.asarray(x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError("cannot round a non-finite value to the grid")
    low = np.floor(a)
    return (low + (rng.random(a.shape) < (a - low))).astype(np.int64)


def noise_share_on_grid(values: IntArray, *, stddev_steps: float, rng: np.random.Generator) -> IntArray:
    """``values`` (grid integers) plus this device's rounded-Gaussian noise share, in grid steps.

    Raises:
        ValueError: ``values`` is not an integer array, or ``stddev_steps`` is not positive.
    """
    v = np.asarray(values)
    if not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"grid values must be integers, got dtype {v.dtype}")
    s = _positive("stddev_steps", stddev_steps)
    return v.astype(np.int64) + np.rint(rng.normal(0.0, s, size=v.shape)).astype(np.int64)


def privatize_on_grid(values: npt.NDArray[np.floating], *, clip_norm: float, grid: FixedPoint,
                      rng: np.random.Generator) -> npt.NDArray[np.uint32]:
    """Distributed DP on one device: clip, map onto the shared grid, add a noise share, mod 2^32.

    The one device-side step of distributed DP (the simulator runs it for
    every device; a networked agent must call this same function):

    1. scale ``values`` (the flattened update) to L2 norm at most ``clip_norm``;
    2. clip each value to the grid's range and divide by its step, then round
       stochastically (:meth:`FixedPoint.quantize_`, unbiased, < 1 step a value);
    3. add ``round(N(0, s^2))`` per value, ``s = grid.noise_steps``: this
       device's share of the noise, from ``rng``;
    4. write the integers mod 2^32 (two's complement) and append the weight
       coordinate 1 (under DP every update weighs 1; the coordinate counts the
       contributors, which secure aggregation reveals anyway).

    ``rng`` must be the device's own secret randomness (the OS's in a real
    deployment, :func:`~fedge.privacy.mechanisms.noise_generator` ``(None)``):
    both the rounding and the noise are hidden from the coordinator only if
    it cannot predict them.

    Raises:
        ValueError: ``clip_norm`` not positive, non-finite values, or a grid
            without a noise share or with a weight range other than 1.
    """
    c = _positive("clip_norm", clip_norm)
    if grid.max_weight != 1:
        raise ValueError(f"distributed DP weighs every update 1: the grid's max_weight must be 1, "
                         f"got {grid.max_weight}")
    if grid.noise_stddev <= 0:
        raise ValueError("distributed DP needs a grid with a noise share (noise_stddev > 0)")
    y = np.array(values, dtype=np.float64).reshape(-1)  # a copy: the caller's update is kept
    if not np.isfinite(y).all():
        raise ValueError("cannot privatize a non-finite update")
    norm = math.sqrt(float(np.dot(y, y)))
    out = np.empty(y.size + 1, dtype=np.uint32)
    # clip * (c / norm) overshoots c by at most an ulp: the grid sensitivity
    # (c / step + sqrt(d)) has a whole step per value of slack for it.
    grid.quantize_(y, 1.0 if norm <= c else c / norm, rng, scratch=out[:-1])
    steps = grid.noise_steps
    noise = np.empty(min(_BLOCK, y.size), dtype=np.float64)
    for lo in range(0, y.size, _BLOCK):
        part = y[lo : lo + _BLOCK]
        share = noise[: part.size]
        rng.standard_normal(out=share)
        share *= steps
        np.rint(share, out=share)
        part += share
    # Integers below 2^53 in magnitude: the remainder is exact, and the uint32
    # that holds it is the two's complement of the noised value mod 2^32.
    np.remainder(y, 2.0**32, out=y)
    np.copyto(out[:-1], y, casting="unsafe")
    out[-1] = 1
    return out


@dataclass(frozen=True)
class DistributedGrid:
    """What fixes a run's grid under distributed DP.

    Attributes:
        value_range: the grid's per-value clip (at most the L2 clip norm helps:
            no clipped update has a larger coordinate).
        dim: values per update (the weight coordinate not counted: it is not noised).
        max_cohort: the most devices any round sums.
        bits: the grid's bits, or ``None`` for the most that cannot wrap (up to
            :data:`DEFAULT_MAX_BITS`).
    """

    value_range: float
    dim: int
    max_cohort: int
    bits: int | None = None


@dataclass(frozen=True)
class DistributedPlan:
    """A run's grid and noise under distributed DP.

    Attributes:
        bits: the grid's signed bits per value.
        step: the grid step.
        noise_multiplier: what the devices' shares add up to, over the clip
            norm, when ``min_contributors`` of them are in the sum.
        effective_noise_multiplier: what the accountant charges: the total
            noise in steps over the grid sensitivity (:func:`effective_noise_multiplier`).
    """

    bits: int
    step: float
    noise_multiplier: float
    effective_noise_multiplier: float

    @property
    def sensitivity_inflation(self) -> float:
        """How much rounding onto the grid inflates the sensitivity: nominal / effective."""
        return self.noise_multiplier / self.effective_noise_multiplier


def plan_grid(grid: DistributedGrid, *, clip_norm: float, noise_multiplier: float | None = None,
              charged: float | None = None) -> DistributedPlan:
    """The grid and both noise multipliers, from the nominal one or from the one to charge.

    Give ``noise_multiplier`` (what the devices add; the accountant charges
    less, by the rounding inflation) or ``charged`` (the effective multiplier
    a target epsilon was calibrated for; the devices add more). The grid gets
    the most bits that cannot wrap in the worst case the run allows: every
    one of ``max_cohort`` devices adding a whole ``noise_multiplier * clip_norm``
    (one share per round is the least any round can ask for).

    Raises:
        ConfigError: both or neither multiplier, a bad value, or no grid fits
            (the noise needs more range than 32 bits give).
    """
    if (noise_multiplier is None) == (charged is None):
        raise ConfigError("plan_grid needs exactly one of noise_multiplier and charged")
    try:
        c = _positive("clip_norm", clip_norm)
        r = _positive("value_range", grid.value_range)
        d = _count("dim", grid.dim)
        n = _count("max_cohort", grid.max_cohort)
        given = noise_multiplier if noise_multiplier is not None else charged
        assert given is not None
        z = _positive("noise multiplier", given)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    def fit(nominal: float) -> FixedPoint:
        if grid.bits is not None:
            return FixedPoint(clip=r, bits=grid.bits, max_weight=1, cohort_size=n,
                              noise_stddev=nominal * c)
        return FixedPoint.finest(clip=r, max_weight=1, cohort_size=n, noise_stddev=nominal * c,
                                 max_bits=DEFAULT_MAX_BITS)

    def inflation(step: float) -> float:
        return grid_sensitivity(clip_norm=c, scale=step, dim=d) / (c / step)

    if noise_multiplier is not None:
        fp = fit(z)
        return DistributedPlan(fp.bits, fp.step, z, z / inflation(fp.step))
    # From the multiplier to charge: more noise may cost a bit, which inflates
    # the sensitivity a little more; the bits only go down, so this settles.
    nominal = z
    for _ in range(8):
        fp = fit(nominal)
        wanted = z * inflation(fp.step)
        if fit(wanted).bits == fp.bits:
            return DistributedPlan(fp.bits, fp.step, wanted, z)
        nominal = wanted
    raise ConfigError("distributed DP: no stable grid for this noise (report this as a bug)")
