"""The shared-grid fixed-point encoding: exact weighted means, unbiased rounding, no wrap-around."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.encoding.fixedpoint import FixedPoint, max_bits, pack, unpack
from fedge.errors import ConfigError


def _sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v  # uint32: wraps mod 2^32, as the masked sum does
    return total


def test_weighted_mean_within_the_rounding_bound() -> None:
    rng = np.random.default_rng(0)
    fp = FixedPoint(clip=1.0, bits=16, max_weight=100, cohort_size=10)
    xs = [rng.uniform(-1, 1, 200) for _ in range(10)]
    ws = [int(w) for w in rng.integers(1, 101, 10)]
    total = _sum([fp.encode(x, w, rng) for x, w in zip(xs, ws, strict=True)])
    mean, weight = fp.decode(total)
    assert weight == sum(ws)
    want = sum(w * x for x, w in zip(xs, ws, strict=True)) / sum(ws)
    bound = len(xs) * fp.step * fp.max_weight / weight
    assert np.max(np.abs(mean - want)) <= bound + 1e-12


def test_equal_weights_exact_on_grid_points() -> None:
    fp = FixedPoint(clip=1.0, bits=8, max_weight=4, cohort_size=3)
    grid = np.array([0.0, fp.step * 4, -fp.step * 8, 1.0, -1.0])
    rng = np.random.default_rng(1)
    total = _sum([fp.encode(grid, 4, rng) for _ in range(3)])
    mean, weight = fp.decode(total)
    assert weight == 12
    np.testing.assert_allclose(mean, grid, rtol=0, atol=1e-12)


def test_clip_and_negative_sums_survive_mod_2_32() -> None:
    fp = FixedPoint(clip=0.5, bits=12, max_weight=1, cohort_size=4)
    rng = np.random.default_rng(2)
    total = _sum([fp.encode(np.array([-3.0, 3.0, -0.5]), 1, rng) for _ in range(4)])
    mean, _ = fp.decode(total)
    np.testing.assert_allclose(mean, [-0.5, 0.5, -0.5], atol=1e-12)


def test_stochastic_rounding_is_unbiased() -> None:
    fp = FixedPoint(clip=1.0, bits=4, max_weight=1, cohort_size=1)
    x = np.full(200_000, fp.step * 0.3)
    q = fp.encode(x, 1, np.random.default_rng(3))[:-1].view(np.int32)
    assert abs(q.mean() - 0.3) < 0.01


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 2000), bits=st.integers(2, 32))
def test_accepted_configs_cannot_wrap(n: int, bits: int) -> None:
    try:
        fp = FixedPoint(clip=1.0, bits=bits, max_weight=1, cohort_size=n)
    except ConfigError:
        assert bits > max_bits(n)
        return
    assert n * fp.levels <= 2**31 - 1
    rng = np.random.default_rng(0)
    one = fp.encode(np.array([1.0, -1.0]), 1, rng)
    total = np.zeros(3, dtype=np.uint64)
    total += one.astype(np.uint64) * n  # the worst case: every device at the edge
    mean, w = fp.decode((total % 2**32).astype(np.uint32))
    assert w == n
    np.testing.assert_allclose(mean, [1.0, -1.0])


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="wrap"):
        FixedPoint(clip=1.0, bits=16, max_weight=1, cohort_size=70_000)
    with pytest.raises(ConfigError, match="weight sum"):
        FixedPoint(clip=1.0, bits=8, max_weight=2**31, cohort_size=3)
    for bad in ({"clip": 0.0}, {"clip": float("inf")}, {"bits": 1}, {"bits": 33},
                {"max_weight": 0}, {"cohort_size": 0}, {"bits": True}):
        kwargs = {"clip": 1.0, "bits": 8, "max_weight": 10, "cohort_size": 5, **bad}
        with pytest.raises(ConfigError, match="secagg"):
            FixedPoint(**kwargs)  # type: ignore[arg-type]
    fp = FixedPoint(clip=1.0, bits=8, max_weight=10, cohort_size=5)
    rng = np.random.default_rng(0)
    for w in (0, 11, True, 2.5):
        with pytest.raises(ConfigError, match="weight"):
            fp.encode(np.zeros(3), w, rng)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-finite"):
        fp.encode(np.array([np.nan]), 1, rng)
    with pytest.raises(ConfigError, match="uint32"):
        fp.decode(np.zeros(3, dtype=np.int64))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="zero total weight"):
        fp.decode(np.zeros(3, dtype=np.uint32))
    with pytest.raises(ConfigError, match="cohort size"):
        max_bits(0)


def test_low_bits_on_the_wire_still_sum_exactly() -> None:
    """Devices may send only wire_bits per value: the sum mod 2^m decodes the same."""
    rng = np.random.default_rng(5)
    fp = FixedPoint(clip=1.0, bits=16, max_weight=3, cohort_size=1000)
    assert fp.wire_bits == 26
    masks = [rng.integers(0, 2**32, 101, dtype=np.uint32) for _ in range(5)]
    vecs = [fp.encode(rng.uniform(-1, 1, 100), 3, rng) + m for m in masks]
    sent = [unpack(pack(v, fp.wire_bits), fp.wire_bits, 101) for v in vecs]
    m = np.uint32(2**fp.wire_bits - 1)
    total = _sum(sent) - (_sum(masks) & m)
    total &= m
    # sign-extend from wire_bits to 32 bits, then decode as usual
    sign = np.uint32(1 << (fp.wire_bits - 1))
    total = (total ^ sign) - sign
    want = _sum([v - mk for v, mk in zip(vecs, masks, strict=True)])
    assert np.array_equal(total[:-1], want[:-1])
    assert total[-1] & m == want[-1]


def test_pack_refusals() -> None:
    with pytest.raises(ConfigError, match="uint32"):
        pack(np.zeros(3, dtype=np.int32), 8)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bits"):
        pack(np.zeros(3, dtype=np.uint32), 0)
    with pytest.raises(ConfigError, match="bits"):
        unpack(b"", 33, 0)
    with pytest.raises(ConfigError, match="expected"):
        unpack(b"\x00" * 3, 8, 4)


def test_noise_headroom_is_part_of_the_wrap_check() -> None:
    """With noise shares the sum's bound is n * levels + 12 sqrt(n) sigma + n / 2 (in steps)."""
    from fedge.encoding.fixedpoint import NOISE_TAIL

    plain = FixedPoint(clip=1.0, bits=24, max_weight=1, cohort_size=100)
    sigma = plain.step * 1e7  # a share of 1e7 steps
    noisy = FixedPoint(clip=1.0, bits=24, max_weight=1, cohort_size=100, noise_stddev=sigma)
    assert noisy.noise_steps == pytest.approx(1e7)
    assert noisy.sum_bound == pytest.approx(100 * noisy.levels + NOISE_TAIL * 10 * 1e7 + 50)
    assert noisy.wire_bits > plain.wire_bits
    assert noisy.sum_bound < 2 ** (noisy.wire_bits - 1)
    with pytest.raises(ConfigError, match="noise shares"):  # the same grid cannot hold twice as much
        FixedPoint(clip=1.0, bits=24, max_weight=1, cohort_size=100, noise_stddev=2 * sigma)
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="noise_stddev"):
            FixedPoint(clip=1.0, bits=8, max_weight=1, cohort_size=3, noise_stddev=bad)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5000), noise=st.floats(0.0, 50.0))
def test_finest_is_the_widest_grid_that_fits(n: int, noise: float) -> None:
    fp = FixedPoint.finest(clip=1.0, max_weight=1, cohort_size=n, noise_stddev=noise, max_bits=24)
    assert fp.sum_bound <= 2**31 - 1
    if fp.bits < 24:
        with pytest.raises(ConfigError, match="wrap"):
            FixedPoint(clip=1.0, bits=fp.bits + 1, max_weight=1, cohort_size=n, noise_stddev=noise)
    if noise == 0:
        assert fp.bits == min(24, max_bits(n))


def test_finest_refusals() -> None:
    with pytest.raises(ConfigError, match="wrap"):  # noise that no 2-bit grid holds
        FixedPoint.finest(clip=1.0, max_weight=1, cohort_size=10, noise_stddev=1e9)
    for bad in (1, 33, True):
        with pytest.raises(ConfigError, match="max_bits"):
            FixedPoint.finest(clip=1.0, max_weight=1, cohort_size=10, max_bits=bad)
    with pytest.raises(ConfigError, match="clip"):
        FixedPoint.finest(clip=-1.0, max_weight=1, cohort_size=10)
    for noise in ("1", -1.0, True):
        with pytest.raises(ConfigError, match="noise_stddev"):
            FixedPoint.finest(clip=1.0, max_weight=1, cohort_size=10, noise_stddev=noise)  # type: ignore[arg-type]


def test_overwrite_encodes_the_same_and_uses_the_input_as_its_buffer() -> None:
    fp = FixedPoint(clip=1.0, bits=16, max_weight=5, cohort_size=4)
    x = np.random.default_rng(0).normal(0, 0.5, 1000)
    kept = fp.encode(x, 3, np.random.default_rng(9))
    buffer = x.copy()
    assert np.array_equal(fp.encode(buffer, 3, np.random.default_rng(9), overwrite=True), kept)
    assert not np.array_equal(buffer, x)  # the buffer was used
    x32 = x.astype(np.float32)  # not float64: copied, left alone
    fp.encode(x32, 3, np.random.default_rng(9), overwrite=True)
    assert np.array_equal(x32, x.astype(np.float32))


def test_quantize_refuses_mismatched_buffers() -> None:
    fp = FixedPoint(clip=1.0, bits=16, max_weight=1, cohort_size=4)
    rng = np.random.default_rng(0)
    for y, scratch in ((np.zeros(4, np.float32), np.zeros(4, np.uint32)),
                       (np.zeros(4), np.zeros(5, np.uint32)),
                       (np.zeros(4), np.zeros(4, np.int32)),
                       (np.zeros(4), np.zeros(8, np.uint32)[::2])):
        with pytest.raises(ConfigError, match="quantize_"):
            fp.quantize_(y, 1.0, rng, scratch=scratch)  # type: ignore[arg-type]
