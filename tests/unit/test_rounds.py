"""Tests for fedge.rounds: cohort selection, stragglers and the round state machine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.errors import ConfigError, FedgeError, RoundError
from fedge.rounds import Round, RoundOutcome, RoundState, choose_stragglers, select_cohort


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture
def population() -> np.ndarray:
    # Not sorted and not starting at 0, so sorting and id handling are visible.
    return np.array([50, 10, 40, 20, 30, 90, 70, 60, 80, 100], dtype=np.int64)


@pytest.fixture
def open_round() -> Round:
    """Round 7 of devices 1, 2, 3, 4; two updates make it complete; deadline at t = 10."""
    return Round.open(7, [3, 1, 4, 2], min_updates=2, deadline=10.0)


# --- select_cohort --------------------------------------------------------------------


def test_cohort_size_picks_that_many_distinct_members(population: np.ndarray) -> None:
    cohort = select_cohort(population, rng=rng(), cohort_size=4)
    assert cohort.shape == (4,)
    assert cohort.dtype == np.int64
    assert len(set(cohort.tolist())) == 4
    assert set(cohort.tolist()) <= set(population.tolist())
    assert np.all(np.diff(cohort) > 0)  # sorted


def test_cohort_size_equal_to_population_is_everyone(population: np.ndarray) -> None:
    cohort = select_cohort(population, rng=rng(), cohort_size=10)
    np.testing.assert_array_equal(cohort, np.sort(population))


def test_cohort_size_is_uniform_over_many_draws() -> None:
    g = rng(1)
    counts = np.zeros(20, dtype=np.int64)
    for _ in range(2000):
        counts[select_cohort(range(20), rng=g, cohort_size=5)] += 1
    # Each device is chosen with probability 5/20 = 0.25: about 500 of 2000 draws.
    assert counts.sum() == 2000 * 5
    assert counts.min() > 420 and counts.max() < 580


def test_neither_size_nor_rate_invites_everyone_sorted(population: np.ndarray) -> None:
    cohort = select_cohort(population, rng=rng())
    np.testing.assert_array_equal(cohort, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100])


def test_population_may_be_any_iterable_of_ints() -> None:
    np.testing.assert_array_equal(select_cohort(range(3), rng=rng()), [0, 1, 2])
    np.testing.assert_array_equal(select_cohort([5, 2, 9], rng=rng()), [2, 5, 9])
    np.testing.assert_array_equal(
        select_cohort(np.array([3, 1], dtype=np.int32), rng=rng()), [1, 3]
    )


def test_select_cohort_does_not_mutate_population(population: np.ndarray) -> None:
    before = population.copy()
    select_cohort(population, rng=rng(), cohort_size=3)
    select_cohort(population, rng=rng(), sample_rate=0.5)
    select_cohort(population, rng=rng())
    np.testing.assert_array_equal(population, before)


def test_sample_rate_is_poisson_with_the_right_mean() -> None:
    g = rng(2024)
    ids = np.arange(1000)
    sizes = []
    hits = np.zeros(1000, dtype=np.int64)
    for _ in range(200):
        cohort = select_cohort(ids, rng=g, sample_rate=0.1)
        assert np.all(np.diff(cohort) > 0)
        sizes.append(cohort.size)
        hits[cohort] += 1
    # Size ~ Binomial(1000, 0.1): mean 100, sd sqrt(90) ~ 9.5; the mean of 200 has sd ~0.7.
    assert abs(np.mean(sizes) - 100) < 3
    # Poisson sampling varies the cohort size (fixed-size sampling would give sd 0).
    assert 6 < np.std(sizes) < 14
    # Every device has the same chance: ~20 of 200 each, none far off.
    assert hits.min() >= 3 and hits.max() <= 45


def test_sample_rate_one_invites_everyone(population: np.ndarray) -> None:
    cohort = select_cohort(population, rng=rng(), sample_rate=1.0)
    np.testing.assert_array_equal(cohort, np.sort(population))


@pytest.mark.parametrize(
    "kwargs", [{"cohort_size": 4}, {"sample_rate": 0.3}], ids=["size", "rate"]
)
def test_selection_is_deterministic_per_seed(kwargs: dict[str, float]) -> None:
    ids = np.arange(100)
    a = select_cohort(ids, rng=rng(7), **kwargs)  # type: ignore[arg-type]
    b = select_cohort(ids, rng=rng(7), **kwargs)  # type: ignore[arg-type]
    c = select_cohort(ids, rng=rng(8), **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_both_size_and_rate_refused(population: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="cohort size or a sample rate, not both"):
        select_cohort(population, rng=rng(), cohort_size=2, sample_rate=0.5)


@pytest.mark.parametrize("size", [0, -1, 11])
def test_cohort_size_out_of_range_refused(population: np.ndarray, size: int) -> None:
    with pytest.raises(ConfigError, match=rf"cohort size must be between 1 and the 10 .*got {size}"):
        select_cohort(population, rng=rng(), cohort_size=size)


def test_cohort_size_from_empty_population_refused() -> None:
    with pytest.raises(ConfigError, match="cohort size"):
        select_cohort([], rng=rng(), cohort_size=1)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_sample_rate_out_of_range_refused(population: np.ndarray, rate: float) -> None:
    with pytest.raises(ConfigError, match=r"sample rate must be in \(0, 1\], got"):
        select_cohort(population, rng=rng(), sample_rate=rate)


# --- choose_stragglers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "count"), [(0.0, 0), (0.1, 1), (0.14, 1), (0.26, 3), (0.5, 5), (1.0, 10)]
)
def test_stragglers_count_is_rounded_fraction(
    population: np.ndarray, fraction: float, count: int
) -> None:
    cohort = np.sort(population)
    stragglers = choose_stragglers(cohort, fraction, rng())
    assert stragglers.size == count == round(fraction * cohort.size)
    assert stragglers.dtype == np.int64
    assert set(stragglers.tolist()) <= set(cohort.tolist())
    assert len(set(stragglers.tolist())) == count
    assert np.all(np.diff(stragglers) > 0)


def test_stragglers_deterministic_per_seed(population: np.ndarray) -> None:
    a = choose_stragglers(population, 0.4, rng(3))
    b = choose_stragglers(population, 0.4, rng(3))
    np.testing.assert_array_equal(a, b)


def test_stragglers_of_empty_cohort() -> None:
    assert choose_stragglers(np.empty(0, dtype=np.int64), 0.5, rng()).size == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.01, math.nan, math.inf])
def test_stragglers_fraction_out_of_range_refused(
    population: np.ndarray, fraction: float
) -> None:
    with pytest.raises(ConfigError, match=r"stragglers fraction must be in \[0, 1\]"):
        choose_stragglers(population, fraction, rng())


# --- Round ----------------------------------------------------------------------------


def test_open_round_state(open_round: Round) -> None:
    assert open_round.state is RoundState.OPEN
    assert open_round.cohort == frozenset({1, 2, 3, 4})
    assert open_round.reported == frozenset()
    assert not open_round.complete_cohort


def test_open_defaults_min_updates_to_the_whole_cohort() -> None:
    r = Round.open(1, np.array([5, 6, 7]))
    assert r.min_updates == 3
    assert r.deadline == math.inf
    assert r.cohort == frozenset({5, 6, 7})


def test_accept_records_updates(open_round: Round) -> None:
    open_round.accept(3, 10.0, now=1.0)
    open_round.accept(1, 2.5, now=2.0)
    assert open_round.reported == frozenset({1, 3})
    assert open_round.state is RoundState.OPEN
    assert not open_round.complete_cohort


def test_accept_at_the_deadline_instant_is_on_time(open_round: Round) -> None:
    open_round.accept(1, 1.0, now=10.0)
    assert open_round.reported == frozenset({1})


def test_every_device_reporting_completes_the_cohort(open_round: Round) -> None:
    for d in (1, 2, 3, 4):
        open_round.accept(d, 1.0, now=0.0)
    assert open_round.complete_cohort


def test_close_complete_with_enough_updates(open_round: Round) -> None:
    open_round.accept(3, 10.0, now=1.0)
    open_round.accept(1, 2.5, now=2.0)
    outcome = open_round.close()
    assert outcome == RoundOutcome(
        round_id=7,
        state=RoundState.COMPLETE,
        reported=(1, 3),
        dropped=(2, 4),
        total_weight=12.5,
    )
    assert open_round.state is RoundState.COMPLETE


def test_close_abandoned_below_min_updates(open_round: Round) -> None:
    open_round.accept(2, 4.0, now=1.0)
    outcome = open_round.close()
    assert outcome.state is RoundState.ABANDONED
    assert open_round.state is RoundState.ABANDONED
    assert outcome.reported == (2,)
    assert outcome.dropped == (1, 3, 4)
    assert outcome.total_weight == 4.0


def test_close_with_no_updates_drops_everyone(open_round: Round) -> None:
    outcome = open_round.close()
    assert outcome.state is RoundState.ABANDONED
    assert outcome.reported == ()
    assert outcome.dropped == (1, 2, 3, 4)
    assert outcome.total_weight == 0.0


def test_min_updates_equal_to_cohort_needs_everyone() -> None:
    r = Round.open(1, [1, 2])
    r.accept(1, 1.0, now=0.0)
    assert r.close().state is RoundState.ABANDONED
    r2 = Round.open(2, [1, 2])
    r2.accept(1, 1.0, now=0.0)
    r2.accept(2, 1.0, now=0.0)
    assert r2.close().state is RoundState.COMPLETE


def test_refused_after_close_reason_closed(open_round: Round) -> None:
    open_round.accept(1, 1.0, now=0.0)
    open_round.accept(2, 1.0, now=0.0)
    open_round.close()
    with pytest.raises(RoundError, match=r"^closed: round 7 is complete") as info:
        open_round.accept(3, 1.0, now=0.0)
    assert info.value.reason == "closed"
    assert open_round.reported == frozenset({1, 2})


def test_closing_twice_reason_closed(open_round: Round) -> None:
    open_round.close()
    with pytest.raises(RoundError, match="already abandoned") as info:
        open_round.close()
    assert info.value.reason == "closed"


def test_late_update_reason_late(open_round: Round) -> None:
    with pytest.raises(RoundError, match="round 7's deadline has passed") as info:
        open_round.accept(1, 1.0, now=10.5)
    assert info.value.reason == "late"
    assert open_round.reported == frozenset()


def test_uninvited_device_reason_not_invited(open_round: Round) -> None:
    with pytest.raises(RoundError, match="device 9 is not in round 7") as info:
        open_round.accept(9, 1.0, now=0.0)
    assert info.value.reason == "not_invited"
    assert info.value.detail == "device 9 is not in round 7"


def test_second_update_reason_duplicate(open_round: Round) -> None:
    open_round.accept(1, 1.0, now=0.0)
    with pytest.raises(RoundError, match="device 1 already reported") as info:
        open_round.accept(1, 5.0, now=1.0)
    assert info.value.reason == "duplicate"
    # The first update's weight is kept.
    open_round.accept(2, 1.0, now=0.0)
    assert open_round.close().total_weight == 2.0


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_bad_weight_reason_bad_weight(open_round: Round, weight: float) -> None:
    with pytest.raises(RoundError, match="device 1 sent weight") as info:
        open_round.accept(1, weight, now=0.0)
    assert info.value.reason == "bad_weight"
    assert open_round.reported == frozenset()
    open_round.accept(1, 1.0, now=0.0)  # a refused update does not count as reported


def test_reasons_are_checked_in_order(open_round: Round) -> None:
    # late beats not_invited; not_invited beats bad_weight.
    with pytest.raises(RoundError) as info:
        open_round.accept(99, -1.0, now=11.0)
    assert info.value.reason == "late"
    with pytest.raises(RoundError) as info:
        open_round.accept(99, -1.0, now=0.0)
    assert info.value.reason == "not_invited"


def test_round_error_is_a_fedge_error() -> None:
    err = RoundError("late", "x")
    assert isinstance(err, FedgeError)
    assert str(err) == "late: x"


def test_empty_cohort_refused() -> None:
    with pytest.raises(ConfigError, match="round 3: the cohort is empty"):
        Round.open(3, [])


@pytest.mark.parametrize("min_updates", [0, -1, 5])
def test_min_updates_out_of_range_refused(min_updates: int) -> None:
    with pytest.raises(
        ConfigError, match=rf"min_updates must be between 1 and the cohort size 4, got {min_updates}"
    ):
        Round.open(1, [1, 2, 3, 4], min_updates=min_updates)


def test_constructor_refuses_like_open() -> None:
    with pytest.raises(ConfigError, match="cohort is empty"):
        Round(1, frozenset(), 1)
    with pytest.raises(ConfigError, match="min_updates"):
        Round(1, frozenset({1}), 2)


def test_cohort_of_duplicates_counts_devices_once() -> None:
    r = Round.open(1, [4, 4, 5])
    assert r.min_updates == 2
    assert r.cohort == frozenset({4, 5})
