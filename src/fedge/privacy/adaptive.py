"""Adaptive clipping: the clip norm follows a quantile of the update norms, privately.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021. Each round every reporting device also
sends the bit ``b = 1[||delta|| <= C]``; the server noises the count of those
bits with N(0, sigma_b^2), divides by the expected number of reports, and
moves the clip geometrically towards the target quantile ``gamma``::

    b_bar = (sum b + N(0, sigma_b^2)) / expected_reports
    C    <- C * exp(-eta * (b_bar - gamma))

The count is a second Gaussian query on the same devices, so it costs
privacy too. The paper folds it into the update's noise: with ``sigma_b``
for the count (sensitivity 1/2 once the bits are centred at 1/2), the update
is noised with the *corrected* multiplier

    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)

and the pair of queries is exactly as private as one Gaussian query with
multiplier ``z``; the accountant charges ``z``. Their defaults are kept:
target quantile 0.5, clip learning rate 0.2, ``sigma_b`` = expected
cohort / 20, initial clip 0.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AdaptiveClip", "corrected_noise_multiplier"]

DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_CLIP_LR = 0.2
DEFAULT_INITIAL_CLIP = 0.1
#: sigma_b = expected reports / this.
DEFAULT_COUNT_NOISE_DIVISOR = 20.0


def corrected_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's noise multiplier once the clip count has taken its share of ``noise_multiplier``.

    Raises:
        ValueError: ``noise_multiplier`` is not positive, or ``count_stddev``
            is too small (``2 * count_stddev <= noise_multiplier``): the count
            alone would spend the whole budget.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {noise_multiplier!r}")
    if not (math.isfinite(count_stddev) and count_stddev > 0):
        raise ValueError(f"the clip-count noise stddev must be positive, got {count_stddev!r}")
    if 2.0 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping needs the clip-count noise stddev ({count_stddev:g}) above half the "
            f"noise multiplier ({noise_multiplier:g}): a larger cohort or a smaller noise multiplier"
        )
    return float((noise_multiplier ** -2 - (2.0 * count_stddev) ** -2) ** -0.5)


@dataclass(frozen=True)
class AdaptiveClip:
    """The clip norm of the next round and how it moves (a value; :meth:`update` returns a new one).

    Attributes:
        clip_norm: the clip norm for the next round.
        target_quantile: the fraction of updates that should fall under the clip.
        learning_rate: ``eta`` of the geometric update.
        count_stddev: ``sigma_b``, the noise on the count of unclipped updates
            (0 only when no DP noise is wanted, e.g. to test convergence).
    """

    clip_norm: float = DEFAULT_INITIAL_CLIP
    target_quantile: float = DEFAULT_TARGET_QUANTILE
    learning_rate: float = DEFAULT_CLIP_LR
    count_stddev: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive finite number, got {self.clip_norm!r}")
        if not (math.isfinite(self.target_quantile) and 0 < self.target_quantile < 1):
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"the clip learning rate must be positive, got {self.learning_rate!r}")
        if not (math.isfinite(self.count_stddev) and self.count_stddev >= 0):
            raise ValueError(f"count_stddev must be a finite number >= 0, got {self.count_stddev!r}")

    @classmethod
    def for_cohort(cls, expected_reports: float, *, clip_norm: float = DEFAULT_INITIAL_CLIP) -> AdaptiveClip:
        """Andrew et al.'s defaults for a round expecting ``expected_reports`` updates."""
        if not (math.isfinite(expected_reports) and expected_reports > 0):
            raise ValueError(f"expected_reports must be positive, got {expected_reports!r}")
        return cls(clip_norm=clip_norm, count_stddev=expected_reports / DEFAULT_COUNT_NOISE_DIVISOR)

    def update(self, unclipped: int, *, expected_reports: float, rng: np.random.Generator) -> AdaptiveClip:
        """The state after a round in which ``unclipped`` updates had norm <= the clip.

        Raises:
            ValueError: ``unclipped`` is negative or ``expected_reports`` not positive.
        """
        if isinstance(unclipped, bool) or not isinstance(unclipped, int | np.integer) or unclipped < 0:
            raise ValueError(f"unclipped must be an integer >= 0, got {unclipped!r}")
        if not (math.isfinite(expected_reports) and expected_reports > 0):
            raise ValueError(f"expected_reports must be positive, got {expected_reports!r}")
        noise = float(rng.normal(0.0, self.count_stddev)) if self.count_stddev > 0 else 0.0
        fraction = (int(unclipped) + noise) / expected_reports
        clip = self.clip_norm * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return AdaptiveClip(clip, self.target_quantile, self.learning_rate, self.count_stddev)
