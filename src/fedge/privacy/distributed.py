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
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = [
    "effective_noise_multiplier",
    "grid_sensitivity",
    "noise_share_on_grid",
    "share_stddev",
    "stochastic_round",
]

IntArray = npt.NDArray[np.int64]


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
