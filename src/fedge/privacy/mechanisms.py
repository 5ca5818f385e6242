"""Differential-privacy mechanisms on updates: L2 clipping, Gaussian noise, the noise generator.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private
Recurrent Language Models", ICLR 2018) bounds each device's influence on a
round by clipping its update to L2 norm ``clip_norm`` and then adds Gaussian
noise of standard deviation ``noise_multiplier * clip_norm`` to the *sum* of
the clipped updates. The stages read in that order here:

1. :func:`clip_by_l2` on the device (or, for central DP, on the trusted
   coordinator as the update arrives);
2. :func:`add_gaussian_noise` on the sum (central), on each update (local),
   or a share of it on each device (distributed, :mod:`fedge.privacy.distributed`);
3. division by a *fixed* denominator (:func:`noised_mean`).

**Weights.** FedAvg weights a device by its example count, which would make
the sensitivity of the weighted sum ``max_k n_k * clip_norm``: unbounded,
and itself private. McMahan et al. cap the weights (``w_k = min(n_k / w_hat, 1)``)
and divide by a fixed ``q * W``. fedge takes the simplest point of that
family: every clipped update has weight 1 (``w_hat`` at most the smallest
example count), so one device changes the sum by at most ``clip_norm`` in L2,
and the denominator is the *expected* number of reports, fixed before the
round. Dividing by the actual count would publish the count, which depends on
who took part; a fixed denominator keeps the released mean a post-processing
of the noised sum.

Pure: no I/O and no clock. Randomness is a generator passed in;
:func:`noise_generator` makes one seeded from the operating system's
entropy (production) or from a given seed (tests and simulations).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedge import params as P
from fedge.params import Array, Params

__all__ = [
    "DevicePrivacy",
    "add_gaussian_noise",
    "clip_by_l2",
    "noise_generator",
    "noised_mean",
    "privatize_update",
]

#: Added to every seeded noise key, so a noise stream never equals a training stream of the same seed.
_NOISE_PURPOSE = 0x6E6F697365  # "noise"


def noise_generator(seed: int | None, *key: int) -> np.random.Generator:
    """The generator DP noise is drawn from.

    With ``seed=None`` (every real deployment) it is seeded with 256 bits from
    :mod:`secrets` (the operating system's CSPRNG), so nobody, the operator
    included, can replay the noise and subtract it. With an integer ``seed``
    the stream is a function of ``(seed, *key)``: simulations and tests are
    reproducible, and such noise protects nothing against whoever knows the
    seed. (Floating-point Gaussian samples have known side channels,
    Mironov 2012; fedge does not claim to defend against them.)

    Raises:
        ValueError: ``seed`` or a key part is negative or not an integer.
    """
    parts = [seed, *key] if seed is not None else list(key)
    for k in parts:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(f"noise generator seed and key must be non-negative integers, got {k!r}")
    if seed is None:
        entropy: list[int] = [secrets.randbits(256), *[int(k) for k in key]]
    else:
        entropy = [int(seed), _NOISE_PURPOSE, *[int(k) for k in key]]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _check_clip(clip_norm: float) -> float:
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, int | float | np.floating):
        raise ValueError(f"clip_norm must be a number, got {clip_norm!r}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a positive finite number, got {clip_norm!r}")
    return float(clip_norm)


def clip_by_l2(delta: Mapping[str, Array], clip_norm: float) -> tuple[Params, float]:
    """``delta`` scaled down to L2 norm at most ``clip_norm`` (over all tensors together).

    Returns:
        The clipped delta (a new mapping; the input is not modified) and the
        norm *before* clipping (adaptive clipping counts the updates under
        the bound).

    Raises:
        ValueError: ``clip_norm`` is not a positive finite number, or the
            delta is not finite (its norm would be meaningless).
    """
    clip = _check_clip(clip_norm)
    norm = P.l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("cannot clip a non-finite update")
    # Scaling by clip/norm can land a hair above clip after rounding to float32
    # (relative error 6e-8 a value); the factor is nudged down so the bound holds.
    factor = 1.0 if norm <= clip else (clip / norm) * (1.0 - 1e-6)
    return {k: (np.asarray(v) * factor).astype(np.asarray(v).dtype, copy=False)
            for k, v in delta.items()}, norm


def add_gaussian_noise(values: Mapping[str, Array], stddev: float, rng: np.random.Generator) -> Params:
    """``values`` plus independent N(0, stddev^2) noise on every coordinate (a new mapping).

    The noise is drawn in float64 and the sum cast back to each tensor's dtype.

    Raises:
        ValueError: ``stddev`` is negative or not finite.
    """
    if not (math.isfinite(stddev) and stddev >= 0):
        raise ValueError(f"noise stddev must be a finite number >= 0, got {stddev!r}")
    out: Params = {}
    for k, v in values.items():
        a = np.asarray(v)
        out[k] = (a + rng.normal(0.0, stddev, size=a.shape)).astype(a.dtype, copy=False) \
            if stddev > 0 else a.copy()
    return out


def noised_mean(total: Mapping[str, Array], *, stddev: float, denominator: float,
                rng: np.random.Generator) -> Params:
    """``(total + N(0, stddev^2 I)) / denominator``: the central-DP release of a round.

    Raises:
        ValueError: ``denominator`` is not a positive finite number, or ``stddev`` is bad.
    """
    if not (math.isfinite(denominator) and denominator > 0):
        raise ValueError(f"the DP denominator must be a positive finite number, got {denominator!r}")
    return P.scale(add_gaussian_noise(total, stddev, rng), 1.0 / denominator)


@dataclass(frozen=True)
class DevicePrivacy:
    """What one device does to its update this round: clip, then maybe add local noise.

    Attributes:
        clip_norm: the L2 bound for this round (adaptive clipping changes it per round).
        local_stddev: standard deviation of the Gaussian noise the device adds
            to its own clipped update (local DP); 0 for central DP.
        seed: ``None`` for noise from the OS entropy; an integer for a
            reproducible simulation (see :func:`noise_generator`).
    """

    clip_norm: float
    local_stddev: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_clip(self.clip_norm)
        if not (math.isfinite(self.local_stddev) and self.local_stddev >= 0):
            raise ValueError(f"local_stddev must be a finite number >= 0, got {self.local_stddev!r}")


def privatize_update(
    delta: Mapping[str, Array], how: DevicePrivacy, *, round_id: int, device_id: int
) -> tuple[Params, bool]:
    """Clip ``delta`` (and add local noise if asked); also say whether it was within the bound.

    The boolean is adaptive clipping's per-device bit ``||delta|| <= clip_norm``
    (Andrew et al. 2021), computed on the update before clipping.
    """
    clipped, norm = clip_by_l2(delta, how.clip_norm)
    if how.local_stddev > 0:
        rng = noise_generator(how.seed, round_id, device_id)
        clipped = add_gaussian_noise(clipped, how.local_stddev, rng)
    return clipped, norm <= how.clip_norm
