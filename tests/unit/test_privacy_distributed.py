"""Distributed DP's device-side mechanism: noise shares on the quantization grid and their accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.privacy.distributed import (
    effective_noise_multiplier,
    grid_sensitivity,
    noise_share_on_grid,
    share_stddev,
    stochastic_round,
)
from fedge.privacy.mechanisms import clip_by_l2, noise_generator


def test_shares_sum_to_the_central_noise() -> None:
    s = share_stddev(noise_multiplier=1.5, clip_norm=2.0, min_contributors=9)
    assert s == pytest.approx(1.0)
    assert math.sqrt(9) * s == pytest.approx(1.5 * 2.0)


def test_the_sum_of_shares_on_the_grid_has_the_central_scale() -> None:
    # 10 devices, each adding rounded N(0, 3^2) on the grid: the sum's stddev is sqrt(10) * 3.
    rng = noise_generator(4)
    total = sum(noise_share_on_grid(np.zeros(100_000, dtype=np.int64), stddev_steps=3.0, rng=rng)
                for _ in range(10))
    assert isinstance(total, np.ndarray) and total.dtype == np.int64
    # Rounding adds variance 1/12 a share: 10 * (9 + 1/12).
    assert np.var(total) == pytest.approx(10 * (9 + 1 / 12), rel=0.02)
    assert abs(np.mean(total)) < 0.1


def test_stochastic_rounding_is_unbiased_and_within_one_step() -> None:
    x = np.full(200_000, 2.3)
    r = stochastic_round(x, noise_generator(5))
    assert set(np.unique(r).tolist()) == {2, 3}
    assert np.mean(r) == pytest.approx(2.3, abs=0.005)


def test_grid_sensitivity_bounds_a_clipped_and_rounded_update() -> None:
    rng = noise_generator(6)
    clip, scale, dim = 1.0, 0.01, 500
    bound = grid_sensitivity(clip_norm=clip, scale=scale, dim=dim)
    assert bound == pytest.approx(100 + math.sqrt(500))
    for _ in range(50):
        delta, _ = clip_by_l2({"w": rng.normal(size=dim)}, clip)
        grid = stochastic_round(delta["w"] / scale, rng)
        assert np.linalg.norm(grid) <= bound


def test_effective_multiplier_is_the_nominal_one_less_the_rounding_inflation() -> None:
    z = effective_noise_multiplier(noise_multiplier=1.0, clip_norm=1.0, scale=1e-4, dim=650,
                                   min_contributors=20)
    assert z == pytest.approx(1e4 / (1e4 + math.sqrt(650)))
    coarse = effective_noise_multiplier(noise_multiplier=1.0, clip_norm=1.0, scale=0.1, dim=650,
                                        min_contributors=20)
    assert coarse < 0.3  # a coarse grid costs most of the noise


@pytest.mark.parametrize("kwargs", [
    dict(noise_multiplier=0.0), dict(noise_multiplier=math.nan), dict(clip_norm=-1.0),
    dict(min_contributors=0), dict(min_contributors=2.5), dict(scale=0.0), dict(dim=0),
])
def test_bad_distributed_settings_are_refused(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = dict(noise_multiplier=1.0, clip_norm=1.0, scale=0.01, dim=10, min_contributors=5)
    args.update(kwargs)
    with pytest.raises(ValueError):
        effective_noise_multiplier(**args)  # type: ignore[arg-type]


def test_bad_grid_inputs_are_refused() -> None:
    rng = noise_generator(1)
    with pytest.raises(ValueError, match="integers"):
        noise_share_on_grid(np.zeros(3), stddev_steps=1.0, rng=rng)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stddev_steps"):
        noise_share_on_grid(np.zeros(3, dtype=np.int64), stddev_steps=0.0, rng=rng)
    with pytest.raises(ValueError, match="non-finite"):
        stochastic_round(np.array([1.0, np.inf]), rng)
