"""fedge.privacy.mechanisms: clipping bounds norms, noise has the right scale, bad inputs refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedge import params as P
from fedge.privacy.mechanisms import (
    DevicePrivacy,
    add_gaussian_noise,
    clip_by_l2,
    noise_generator,
    noised_mean,
    privatize_update,
)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    a=arrays(np.float32, st.integers(1, 40), elements=finite),
    b=arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=finite),
    clip=st.floats(min_value=1e-4, max_value=1e4),
)
def test_clipping_bounds_the_norm_and_keeps_the_direction(a: np.ndarray, b: np.ndarray, clip: float) -> None:
    delta = {"a": a, "b": b}
    clipped, norm = clip_by_l2(delta, clip)
    assert norm == pytest.approx(P.l2_norm(delta))
    assert P.l2_norm(clipped) <= clip
    assert clipped["a"].dtype == np.float32 and clipped["b"].dtype == np.float64
    if norm <= clip:  # inside the ball: untouched
        np.testing.assert_array_equal(clipped["a"], a)
        np.testing.assert_array_equal(clipped["b"], b)
    else:  # a positive multiple of the input, so the direction is kept
        factor = clip / norm
        np.testing.assert_allclose(clipped["b"], b * factor, rtol=1e-5, atol=1e-12)


def test_clip_does_not_modify_its_input() -> None:
    delta = {"w": np.full(4, 3.0)}
    clip_by_l2(delta, 1.0)
    np.testing.assert_array_equal(delta["w"], np.full(4, 3.0))


@pytest.mark.parametrize("clip", [0.0, -1.0, math.nan, math.inf, True, "1"])
def test_bad_clip_norms_are_refused(clip: object) -> None:
    with pytest.raises(ValueError, match="clip_norm must be"):
        clip_by_l2({"w": np.ones(3)}, clip)  # type: ignore[arg-type]


def test_non_finite_update_cannot_be_clipped() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        clip_by_l2({"w": np.array([1.0, np.nan])}, 1.0)


def test_noise_has_the_requested_scale() -> None:
    rng = noise_generator(7)
    zeros = {"w": np.zeros(200_000), "b": np.zeros((10, 10), dtype=np.float32)}
    noised = add_gaussian_noise(zeros, 0.3, rng)
    sample = noised["w"]
    # 200,000 draws: the sample stddev is within 1% of 0.3 with overwhelming probability.
    assert np.std(sample) == pytest.approx(0.3, rel=0.02)
    assert abs(np.mean(sample)) < 0.01
    assert noised["b"].dtype == np.float32
    assert add_gaussian_noise(zeros, 0.0, rng)["w"].any() == np.False_


def test_noised_mean_divides_by_the_fixed_denominator() -> None:
    total = {"w": np.full(100_000, 6.0)}
    out = noised_mean(total, stddev=2.0, denominator=4.0, rng=noise_generator(1))
    assert np.mean(out["w"]) == pytest.approx(1.5, abs=0.01)
    assert np.std(out["w"]) == pytest.approx(0.5, rel=0.02)


@pytest.mark.parametrize("denominator", [0.0, -2.0, math.nan, math.inf])
def test_noised_mean_refuses_a_bad_denominator(denominator: float) -> None:
    with pytest.raises(ValueError, match="denominator"):
        noised_mean({"w": np.ones(2)}, stddev=1.0, denominator=denominator, rng=noise_generator(1))


@pytest.mark.parametrize("stddev", [-0.1, math.nan, math.inf])
def test_bad_noise_stddev_is_refused(stddev: float) -> None:
    with pytest.raises(ValueError, match="noise stddev"):
        add_gaussian_noise({"w": np.ones(2)}, stddev, noise_generator(1))


def test_seeded_generators_repeat_and_unseeded_ones_do_not() -> None:
    a = noise_generator(3, 1, 2).normal(size=4)
    np.testing.assert_array_equal(a, noise_generator(3, 1, 2).normal(size=4))
    assert not np.array_equal(a, noise_generator(3, 1, 3).normal(size=4))
    # A noise stream never equals the training stream numpy would build from the same seed.
    assert not np.array_equal(a, np.random.default_rng([3, 1, 2]).normal(size=4))
    fresh = [noise_generator(None, 1).normal(size=4) for _ in range(2)]
    assert not np.array_equal(*fresh)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_seeds_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="non-negative integers"):
        noise_generator(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative integers"):
        noise_generator(1, bad)  # type: ignore[arg-type]


def test_privatize_clips_reports_the_bit_and_adds_local_noise() -> None:
    big = {"w": np.full(10_000, 1.0)}  # norm 100
    out, within = privatize_update(big, DevicePrivacy(clip_norm=1.0), round_id=1, device_id=2)
    assert not within and P.l2_norm(out) <= 1.0
    small = {"w": np.full(4, 0.1)}
    out, within = privatize_update(small, DevicePrivacy(clip_norm=1.0), round_id=1, device_id=2)
    assert within
    np.testing.assert_array_equal(out["w"], small["w"])
    how = DevicePrivacy(clip_norm=1.0, local_stddev=0.5, seed=9)
    noisy, _ = privatize_update(big, how, round_id=1, device_id=2)
    assert np.std(noisy["w"] - out_clip(big)["w"]) == pytest.approx(0.5, rel=0.05)
    again, _ = privatize_update(big, how, round_id=1, device_id=2)
    np.testing.assert_array_equal(noisy["w"], again["w"])  # seeded: reproducible


def out_clip(delta: P.Params) -> P.Params:
    return clip_by_l2(delta, 1.0)[0]


@pytest.mark.parametrize(("clip", "local"), [(0.0, 0.0), (1.0, -1.0), (1.0, math.nan), (math.inf, 0.0)])
def test_bad_device_privacy_is_refused(clip: float, local: float) -> None:
    with pytest.raises(ValueError):
        DevicePrivacy(clip_norm=clip, local_stddev=local)
