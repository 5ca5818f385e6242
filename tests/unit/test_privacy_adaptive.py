"""Adaptive clipping (Andrew et al. 2021): convergence to the target quantile, the corrected multiplier."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.privacy.adaptive import AdaptiveClip, corrected_noise_multiplier


def run(clip: AdaptiveClip, *, rounds: int, cohort: int, seed: int) -> list[float]:
    """Rounds of lognormal update norms (median 2.0); the clip after each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        norms = rng.lognormal(mean=math.log(2.0), sigma=0.5, size=cohort)
        clip = clip.update(int((norms <= clip.clip_norm).sum()), expected_reports=cohort, rng=rng)
        out.append(clip.clip_norm)
    return out


def test_the_clip_converges_to_the_median_with_the_papers_defaults() -> None:
    cohort = 100
    start = AdaptiveClip.for_cohort(cohort)  # initial clip 0.1, eta 0.2, sigma_b = 5
    assert (start.clip_norm, start.learning_rate, start.target_quantile, start.count_stddev) == (
        0.1, 0.2, 0.5, 5.0
    )
    clips = run(start, rounds=400, cohort=cohort, seed=0)
    settled = np.array(clips[200:])
    # The median of the norms is 2.0; the 40% and 60% quantiles of this lognormal are 1.76 and 2.27.
    assert 1.76 < float(np.median(settled)) < 2.27
    assert clips[10] > 0.1  # it moved up from the initial clip


def test_other_quantiles_are_reached() -> None:
    clip = AdaptiveClip(clip_norm=5.0, target_quantile=0.9, count_stddev=0.0)
    clips = run(clip, rounds=400, cohort=200, seed=1)
    # The 90% quantile is 2 * exp(0.5 * 1.2816) = 3.79.
    assert float(np.median(clips[200:])) == pytest.approx(3.79, rel=0.1)


def test_corrected_noise_multiplier() -> None:
    # z_delta^-2 + (2 sigma_b)^-2 = z^-2: the two queries cost one Gaussian with z.
    z, sigma_b = 1.0, 5.0
    zd = corrected_noise_multiplier(z, sigma_b)
    assert zd ** -2 + (2 * sigma_b) ** -2 == pytest.approx(z ** -2)
    assert zd > z


@pytest.mark.parametrize(("z", "sigma_b", "message"), [
    (0.0, 5.0, "noise_multiplier"), (math.nan, 5.0, "noise_multiplier"), (1.0, 0.0, "count noise"),
    (1.0, 0.5, "above half"), (3.0, 1.0, "above half"),
])
def test_bad_corrections_are_refused(z: float, sigma_b: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corrected_noise_multiplier(z, sigma_b)


@pytest.mark.parametrize("kwargs", [
    dict(clip_norm=0.0), dict(clip_norm=math.inf), dict(target_quantile=0.0), dict(target_quantile=1.0),
    dict(learning_rate=0.0), dict(learning_rate=math.nan), dict(count_stddev=-1.0),
])
def test_bad_adaptive_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdaptiveClip(**kwargs)


def test_bad_updates_are_refused() -> None:
    clip = AdaptiveClip()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unclipped"):
        clip.update(-1, expected_reports=10, rng=rng)
    with pytest.raises(ValueError, match="unclipped"):
        clip.update(1.5, expected_reports=10, rng=rng)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected_reports"):
        clip.update(1, expected_reports=0, rng=rng)
    with pytest.raises(ValueError, match="expected_reports"):
        AdaptiveClip.for_cohort(0)
