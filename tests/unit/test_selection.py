"""Heterogeneity-aware cohort selection: feasible devices only, faster ones more often, and fair
places so slow-but-feasible devices are not starved."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedge.errors import ConfigError
from fedge.rounds import select_within_deadline


def test_devices_that_would_miss_the_deadline_are_left_out() -> None:
    est = {0: 10.0, 1: 50.0, 2: 200.0, 3: None}
    cohort, too_slow = select_within_deadline([0, 1, 2, 3], estimate_s=est, deadline_s=100, size=4,
                                              rng=np.random.default_rng(0), last_round={})
    assert cohort == [0, 1, 3]  # 3 has no estimate: it gets the median (50 s), feasible
    assert too_slow == [2]


def test_faster_devices_are_picked_more_often_and_slow_ones_still_get_in() -> None:
    ids = list(range(100))
    est = {d: 1.0 + 9.0 * (d / 99) for d in ids}  # a 10x spread
    counts: Counter[int] = Counter()
    last: dict[int, int] = {}
    for r in range(300):
        cohort, _ = select_within_deadline(ids, estimate_s=est, deadline_s=100, size=10,
                                           rng=np.random.default_rng(r), last_round=last, fairness=0.2)
        assert len(cohort) == 10 == len(set(cohort))
        for d in cohort:
            counts[d] += 1
            last[d] = r
    fastest = sum(counts[d] for d in range(10))
    slowest = sum(counts[d] for d in range(90, 100))
    assert fastest > 1.5 * slowest
    assert min(counts[d] for d in ids) >= 10  # no device starved over 300 rounds


def test_fair_places_go_to_the_longest_waiting() -> None:
    ids = list(range(10))
    est = dict.fromkeys(ids, 1.0)
    est[9] = 50.0  # slow but feasible
    last = {d: 5 for d in ids}
    last[9] = 0  # waited longest
    cohort, _ = select_within_deadline(ids, estimate_s=est, deadline_s=100, size=5,
                                       rng=np.random.default_rng(1), last_round=last, fairness=0.2)
    assert 9 in cohort


def test_string_ids_sort_as_strings_and_ints_as_numbers() -> None:
    cohort, _ = select_within_deadline([10, 2, 33], estimate_s={}, deadline_s=10, size=3,
                                       rng=np.random.default_rng(0), last_round={})
    assert cohort == [2, 10, 33]
    cohort_s, _ = select_within_deadline(["b", "a"], estimate_s={}, deadline_s=10, size=2,
                                         rng=np.random.default_rng(0), last_round={})
    assert cohort_s == ["a", "b"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"size": 0}, "cohort size must be at least 1"),
    ({"fairness": 1.5}, "fairness must be in"),
    ({"margin": 0.0}, "margin must be in"),
    ({"deadline_s": -1.0}, "deadline must be a positive"),
])
def test_bad_arguments_are_refused(kwargs: dict[str, float], message: str) -> None:
    args: dict[str, object] = {"estimate_s": {}, "deadline_s": 10.0, "size": 1,
                               "rng": np.random.default_rng(0), "last_round": {}}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        select_within_deadline([1, 2], **args)  # type: ignore[arg-type]
