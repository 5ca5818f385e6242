"""Distributed DP's device-side mechanism: noise shares on the quantization grid and their accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.encoding.fixedpoint import FixedPoint
from fedge.errors import ConfigError
from fedge.privacy.distributed import (
    DistributedGrid,
    effective_noise_multiplier,
    grid_sensitivity,
    noise_share_on_grid,
    plan_grid,
    privatize_on_grid,
    share_stddev,
    stochastic_round,
)
from fedge.privacy.mechanisms import clip_by_l2, noise_generator
from fedge.secagg.protocol import RoundSetup, SecAggClient, SecAggServer


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


def _grid(n: int, *, z: float, clip: float, m: int, bits: int = 24) -> FixedPoint:
    return FixedPoint(clip=clip, bits=bits, max_weight=1, cohort_size=n,
                      noise_stddev=share_stddev(noise_multiplier=z, clip_norm=clip, min_contributors=m))


def _as_int(total: np.ndarray) -> np.ndarray:
    return total[:-1].view(np.int32).astype(np.int64)


def test_privatize_on_grid_clips_rounds_and_adds_a_share_of_the_right_scale() -> None:
    n, d, z, clip = 16, 20_000, 1.2, 0.5
    grid = _grid(n, z=z, clip=clip, m=n, bits=20)
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 1, d) * (3.0 if i % 2 else 0.001) for i in range(n)]  # half need clipping
    total = np.zeros(d + 1, dtype=np.uint32)
    for i, u in enumerate(updates):
        total += privatize_on_grid(u, clip_norm=clip, grid=grid, rng=noise_generator(7, 1, i))
    assert int(total[-1]) == n  # every update weighs 1
    clipped = sum(clip_by_l2({"u": u}, clip)[0]["u"] for u in updates)
    noise = _as_int(total) * grid.step - clipped
    # n shares of variance (z C)^2 / n: the sum carries (z C)^2 (plus rounding, < n steps^2).
    assert np.std(noise) == pytest.approx(z * clip, rel=0.05)
    assert abs(np.mean(noise)) < 5 * z * clip / math.sqrt(d)


def test_privatize_on_grid_keeps_the_input_and_wraps_exactly_mod_2_32() -> None:
    grid = _grid(3, z=3.0, clip=1.0, m=1, bits=24)  # shares of 3 * 2^23 steps each
    x = np.array([0.9, -0.9, 0.0, 0.25])
    before = x.copy()
    outs = [privatize_on_grid(x, clip_norm=1.0, grid=grid, rng=noise_generator(1, 2, i)) for i in range(3)]
    assert np.array_equal(x, before)
    total = outs[0] + outs[1] + outs[2]  # uint32 arithmetic: mod 2^32
    exact = sum(o[:-1].view(np.int32).astype(np.int64) for o in outs)
    assert np.array_equal(_as_int(total), (exact + 2**31) % 2**32 - 2**31)
    again = privatize_on_grid(x, clip_norm=1.0, grid=grid, rng=noise_generator(1, 2, 0))
    assert np.array_equal(again, outs[0])  # a seeded generator reproduces the device's step


def test_privatize_on_grid_refusals() -> None:
    rng = noise_generator(1)
    grid = _grid(5, z=1.0, clip=1.0, m=5)
    with pytest.raises(ValueError, match="max_weight"):
        privatize_on_grid(np.zeros(3), clip_norm=1.0, rng=rng,
                          grid=FixedPoint(clip=1.0, bits=16, max_weight=2, cohort_size=5, noise_stddev=0.1))
    with pytest.raises(ValueError, match="noise share"):
        privatize_on_grid(np.zeros(3), clip_norm=1.0, rng=rng,
                          grid=FixedPoint(clip=1.0, bits=16, max_weight=1, cohort_size=5))
    with pytest.raises(ValueError, match="non-finite"):
        privatize_on_grid(np.array([1.0, np.nan]), clip_norm=1.0, grid=grid, rng=rng)
    for bad in (0.0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="clip_norm"):
            privatize_on_grid(np.zeros(3), clip_norm=bad, grid=grid, rng=rng)


def test_the_unmasked_secagg_sum_carries_the_central_noise() -> None:
    """End to end: every device privatizes and masks; the coordinator's sum has noise z C."""
    n, d, z, clip, m = 12, 30_000, 0.8, 1.0, 10
    grid = _grid(n, z=z, clip=clip, m=m)
    setup = RoundSetup(1, tuple(str(i) for i in range(n)), 8, 5, bytes(range(32)), d + 1, min_survivors=m)
    keys = np.random.default_rng(3)
    clients = {c: SecAggClient(setup, c, random_bytes=keys.bytes) for c in setup.cohort}
    server = SecAggServer(setup)
    for c in setup.cohort:
        server.receive_keys(c, clients[c].advertise_keys())
    directory = server.close_keys()
    for c in setup.cohort:
        server.receive_shares(c, clients[c].share_keys(directory))
    inbox = server.close_shares()
    uploaders = setup.cohort[:m]  # two drop before uploading: exactly m shares remain
    for i, c in enumerate(uploaders):
        clients[c].receive_shares(inbox[c])
        vec = privatize_on_grid(np.zeros(d), clip_norm=clip, grid=grid, rng=noise_generator(5, 1, i))
        server.receive_masked(c, clients[c].masked_input(vec))
    request = server.close_masked()
    for c in uploaders:
        server.receive_unmask(c, clients[c].unmask(request))
    mean, weight = grid.decode(server.unmask())
    assert weight == m
    noise = mean * weight  # the noised sum of zero updates
    assert np.std(noise) == pytest.approx(z * clip, rel=0.05)
    assert abs(np.mean(noise)) < 5 * z * clip / math.sqrt(d)


def test_plan_from_the_nominal_multiplier_charges_the_effective_one() -> None:
    spec = DistributedGrid(value_range=0.5, dim=650, max_cohort=100)
    plan = plan_grid(spec, clip_norm=0.5, noise_multiplier=1.0)
    widest = FixedPoint.finest(clip=0.5, max_weight=1, cohort_size=100, noise_stddev=0.5, max_bits=24)
    assert (plan.bits, plan.step) == (widest.bits, widest.step)
    assert plan.effective_noise_multiplier == pytest.approx(effective_noise_multiplier(
        noise_multiplier=1.0, clip_norm=0.5, scale=plan.step, dim=650, min_contributors=20))
    assert plan.sensitivity_inflation == pytest.approx(1 + plan.step * math.sqrt(650) / 0.5)


def test_plan_from_the_charged_multiplier_adds_the_inflation_on_the_devices() -> None:
    spec = DistributedGrid(value_range=1.0, dim=10_000, max_cohort=50, bits=12)  # coarse: visible
    plan = plan_grid(spec, clip_norm=1.0, charged=2.0)
    assert plan.bits == 12
    assert plan.effective_noise_multiplier == 2.0
    assert plan.noise_multiplier == pytest.approx(2.0 * (1 + plan.step * 100))
    back = plan_grid(spec, clip_norm=1.0, noise_multiplier=plan.noise_multiplier)
    assert back.effective_noise_multiplier == pytest.approx(2.0)


def test_plan_refusals() -> None:
    spec = DistributedGrid(value_range=1.0, dim=10, max_cohort=10)
    with pytest.raises(ConfigError, match="exactly one"):
        plan_grid(spec, clip_norm=1.0)
    with pytest.raises(ConfigError, match="exactly one"):
        plan_grid(spec, clip_norm=1.0, noise_multiplier=1.0, charged=1.0)
    for bad_spec, kwargs in ((spec, dict(clip_norm=0.0, noise_multiplier=1.0)),
                             (spec, dict(clip_norm=1.0, noise_multiplier=-1.0)),
                             (DistributedGrid(1.0, 0, 10), dict(clip_norm=1.0, noise_multiplier=1.0)),
                             (DistributedGrid(1.0, 10, 0), dict(clip_norm=1.0, noise_multiplier=1.0)),
                             (DistributedGrid(0.0, 10, 10), dict(clip_norm=1.0, noise_multiplier=1.0))):
        with pytest.raises(ConfigError):
            plan_grid(bad_spec, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="wrap"):  # 32 bits leave no room for the noise
        plan_grid(DistributedGrid(1.0, 10, 10, bits=32), clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="wrap"):  # noise beyond any grid
        plan_grid(spec, clip_norm=1.0, noise_multiplier=1e12)
