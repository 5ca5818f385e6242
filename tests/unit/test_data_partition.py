"""Tests for fedge.data.partition: the four partitioners and the spec parser."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.data.partition import (
    Partitioner,
    parse_partitioner,
    partition_dirichlet,
    partition_iid,
    partition_powerlaw,
    partition_shards,
)
from fedge.errors import ConfigError, UnknownNameError

Parts = list[npt.NDArray[np.int64]]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def labels_of(*counts: int) -> npt.NDArray[np.int64]:
    """Labels with ``counts[c]`` examples of class ``c``, in class order."""
    return np.repeat(np.arange(len(counts)), counts).astype(np.int64)


def assert_exact_cover(parts: Parts, n: int) -> None:
    """Every index in 0..n-1 is in exactly one part and no part is empty."""
    assert all(p.shape[0] >= 1 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert joined.shape[0] == n
    assert np.array_equal(np.sort(joined), np.arange(n))


# ---------------------------------------------------------------------------
# iid
# ---------------------------------------------------------------------------


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition_iid(labels_of(5, 5), 3, rng())
    assert sorted(p.shape[0] for p in parts) == [3, 3, 4]
    assert_exact_cover(parts, 10)


def test_iid_one_device_gets_everything() -> None:
    parts = partition_iid(labels_of(2, 3), 1, rng())
    assert len(parts) == 1
    assert parts[0].tolist() == [0, 1, 2, 3, 4]


def test_iid_as_many_devices_as_examples() -> None:
    parts = partition_iid(labels_of(2, 2), 4, rng())
    assert [p.shape[0] for p in parts] == [1, 1, 1, 1]
    assert_exact_cover(parts, 4)


def test_iid_indices_are_sorted_within_a_device() -> None:
    for p in partition_iid(labels_of(50, 50), 7, rng()):
        assert np.all(np.diff(p) > 0)


# ---------------------------------------------------------------------------
# dirichlet
# ---------------------------------------------------------------------------


def test_dirichlet_large_alpha_is_close_to_iid() -> None:
    y = labels_of(1000, 1000)
    parts = partition_dirichlet(y, 4, rng(), alpha=1e4)
    assert_exact_cover(parts, 2000)
    for p in parts:
        assert 450 <= p.shape[0] <= 550
        assert 0.4 <= float(np.mean(y[p])) <= 0.6


def test_dirichlet_small_alpha_gives_few_classes_per_device() -> None:
    y = labels_of(*([100] * 10))
    parts = partition_dirichlet(y, 20, rng(), alpha=0.01)
    assert_exact_cover(parts, 1000)
    classes_held = [np.unique(y[p]).shape[0] for p in parts]
    assert float(np.mean(classes_held)) < 3


def test_dirichlet_tiny_alpha_fills_every_device() -> None:
    # Nearly every class goes to one device, so most devices start empty and
    # must be filled from the largest ones.
    y = labels_of(300, 300, 400)
    parts = partition_dirichlet(y, 200, rng(), alpha=1e-6)
    assert_exact_cover(parts, 1000)


def test_dirichlet_accepts_unordered_sparse_labels() -> None:
    y = np.array([7, 3, 7, 100, 3, 3, 100, 7], dtype=np.int64)
    parts = partition_dirichlet(y, 3, rng(), alpha=0.5)
    assert_exact_cover(parts, 8)


# ---------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------


def test_shards_each_device_holds_exactly_k_classes() -> None:
    y = labels_of(5, 5, 5, 5)
    parts = partition_shards(y, 4, rng(), classes_per_device=2)
    assert_exact_cover(parts, 20)
    held = [set(y[p].tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == {0, 1, 2, 3}
    # 4 devices x 2 slots over 4 classes: each class has 2 holders, 5 = 3 + 2.
    for c in range(4):
        per_holder = sorted(int(np.sum(y[p] == c)) for p in parts if c in set(y[p].tolist()))
        assert per_holder == [2, 3]


def test_shards_one_class_per_device_gives_whole_classes() -> None:
    y = labels_of(2, 3, 4)
    parts = partition_shards(y, 3, rng(), classes_per_device=1)
    assert sorted(p.shape[0] for p in parts) == [2, 3, 4]
    assert all(np.unique(y[p]).shape[0] == 1 for p in parts)


def test_shards_cover_every_class_when_slots_suffice() -> None:
    y = labels_of(*([10] * 10))
    parts = partition_shards(y, 5, rng(3), classes_per_device=2)
    held = [set(y[p].tolist()) for p in parts]
    assert all(len(h) == 2 for h in held)
    assert set().union(*held) == set(range(10))


def test_shards_with_fewer_slots_than_classes_still_assign_everything() -> None:
    y = labels_of(*([4] * 10))
    parts = partition_shards(y, 3, rng(), classes_per_device=2)
    assert_exact_cover(parts, 40)
    assert all(np.unique(y[p]).shape[0] >= 2 for p in parts)


def test_shards_class_rarer_than_its_holders_leaves_no_device_empty() -> None:
    # 6 devices x 1 slot over 2 classes: class 1 (one example) has 3 holders.
    y = labels_of(20, 1)
    parts = partition_shards(y, 6, rng(), classes_per_device=1)
    assert_exact_cover(parts, 21)


# ---------------------------------------------------------------------------
# powerlaw
# ---------------------------------------------------------------------------


def test_powerlaw_sizes_follow_rank_to_the_minus_exponent() -> None:
    # Weights 1, 1/2, 1/3, 1/4 sum to 25/12, so 100 examples split 48/24/16/12.
    parts = partition_powerlaw(labels_of(50, 50), 4, rng(), exponent=1.0)
    assert sorted(p.shape[0] for p in parts) == [12, 16, 24, 48]
    assert_exact_cover(parts, 100)


def test_powerlaw_device_order_is_shuffled() -> None:
    largest = set()
    for seed in range(20):
        parts = partition_powerlaw(labels_of(500), 10, rng(seed), exponent=2.0)
        largest.add(int(np.argmax([p.shape[0] for p in parts])))
    assert len(largest) > 1


def test_powerlaw_steep_exponent_fills_empty_devices() -> None:
    parts = partition_powerlaw(labels_of(60, 40), 50, rng(), exponent=5.0)
    assert_exact_cover(parts, 100)
    assert sorted(p.shape[0] for p in parts)[:10] == [1] * 10


# ---------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------

SPLITTERS: dict[str, Callable[[npt.NDArray[np.int64], int, np.random.Generator], Parts]] = {
    "iid": partition_iid,
    "dirichlet": lambda y, d, r: partition_dirichlet(y, d, r, alpha=0.3),
    "shards": lambda y, d, r: partition_shards(y, d, r, classes_per_device=1),
    "powerlaw": lambda y, d, r: partition_powerlaw(y, d, r, exponent=1.5),
}


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=300),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
    name=st.sampled_from(sorted(SPLITTERS)),
)
def test_every_partitioner_covers_exactly_once_and_is_deterministic(
    labels: list[int], data: st.DataObject, seed: int, name: str
) -> None:
    y = np.array(labels, dtype=np.int64)
    num_devices = data.draw(st.integers(1, y.shape[0]), label="num_devices")
    split = SPLITTERS[name]
    parts = split(y, num_devices, np.random.default_rng(seed))
    assert len(parts) == num_devices
    assert_exact_cover(parts, y.shape[0])
    again = split(y, num_devices, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=10, max_size=200),
    k=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_hold_at_most_k_classes_when_slots_cover_classes(
    labels: list[int], k: int, seed: int
) -> None:
    y = np.array(labels, dtype=np.int64)
    num_classes = np.unique(y).shape[0]
    if k > num_classes:
        return
    num_devices = max(1, -(-num_classes // k))  # enough slots for every class
    parts = partition_shards(y, num_devices, np.random.default_rng(seed), classes_per_device=k)
    assert_exact_cover(parts, y.shape[0])
    held = [set(y[p].tolist()) for p in parts]
    assert set().union(*held) == set(labels)


# ---------------------------------------------------------------------------
# the parser and Partitioner
# ---------------------------------------------------------------------------


def test_parse_accepts_each_form() -> None:
    assert parse_partitioner("iid") == Partitioner("iid", None)
    assert parse_partitioner("dirichlet:0.5") == Partitioner("dirichlet", 0.5)
    assert parse_partitioner("shards:2") == Partitioner("shards", 2)
    assert parse_partitioner("shards:2.0") == Partitioner("shards", 2)
    assert parse_partitioner("powerlaw:1.5") == Partitioner("powerlaw", 1.5)
    assert parse_partitioner(" Dirichlet:1e-1 ") == Partitioner("dirichlet", 0.1)


def test_spec_round_trips() -> None:
    for text in ["iid", "dirichlet:0.5", "shards:3", "powerlaw:2"]:
        assert parse_partitioner(text).spec == text


def test_partitioner_is_frozen() -> None:
    p = parse_partitioner("iid")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "shards"  # type: ignore[misc]


def test_split_matches_the_named_function() -> None:
    y = labels_of(30, 20, 10)
    cases: list[tuple[str, Parts]] = [
        ("iid", partition_iid(y, 4, rng(5))),
        ("dirichlet:0.5", partition_dirichlet(y, 4, rng(5), alpha=0.5)),
        ("shards:2", partition_shards(y, 4, rng(5), classes_per_device=2)),
        ("powerlaw:1", partition_powerlaw(y, 4, rng(5), exponent=1.0)),
    ]
    for spec, expected in cases:
        got = parse_partitioner(spec).split(y, 4, rng(5))
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), spec


def test_parse_error_names_spec_argument_and_value() -> None:
    with pytest.raises(ConfigError) as e:
        parse_partitioner("dirichlet:-1")
    assert str(e.value) == "partition 'dirichlet:-1': alpha must be > 0, got -1.0"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("dirichlet:0", "alpha must be > 0, got 0.0"),
        ("dirichlet:-1", "alpha must be > 0, got -1.0"),
        ("dirichlet:abc", "alpha must be a number, got 'abc'"),
        ("dirichlet:nan", "alpha must be a finite number > 0, got nan"),
        ("dirichlet:inf", "alpha must be a finite number > 0, got inf"),
        ("dirichlet", "alpha is missing"),
        ("dirichlet:", "alpha is missing"),
        ("powerlaw:0", "exponent must be > 0, got 0.0"),
        ("powerlaw:-2", "exponent must be > 0, got -2.0"),
        ("powerlaw:x", "exponent must be a number, got 'x'"),
        ("shards:0", "classes_per_device must be >= 1, got 0"),
        ("shards:-3", "classes_per_device must be >= 1, got -3"),
        ("shards:2.5", "classes_per_device must be an integer, got 2.5"),
        ("shards:two", "classes_per_device must be a number, got 'two'"),
        ("iid:3", "iid takes no parameter, got '3'"),
    ],
)
def test_parse_refuses_bad_parameters(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_partitioner(spec)
    assert str(e.value).startswith(f"partition {spec!r}: ")
    assert fragment in str(e.value)


@pytest.mark.parametrize("spec", ["random", "dirichlett:0.5", "", "label:2"])
def test_parse_refuses_unknown_names(spec: str) -> None:
    with pytest.raises(UnknownNameError) as e:
        parse_partitioner(spec)
    assert "dirichlet:ALPHA" in str(e.value)
    assert repr(spec) in str(e.value)


def test_partitioner_constructor_validates() -> None:
    with pytest.raises(UnknownNameError):
        Partitioner("bogus", 1.0)
    with pytest.raises(ConfigError, match="alpha is missing"):
        Partitioner("dirichlet")
    with pytest.raises(ConfigError, match="alpha must be > 0"):
        Partitioner("dirichlet", -0.5)
    with pytest.raises(ConfigError, match="iid takes no parameter"):
        Partitioner("iid", 2.0)


# ---------------------------------------------------------------------------
# refused inputs to the functions
# ---------------------------------------------------------------------------


def test_more_devices_than_examples_is_refused() -> None:
    with pytest.raises(ConfigError, match="5 devices but only 4 examples"):
        partition_iid(labels_of(2, 2), 5, rng())
    with pytest.raises(ConfigError, match="5 devices but only 4 examples"):
        parse_partitioner("dirichlet:0.5").split(labels_of(2, 2), 5, rng())


def test_no_examples_is_refused() -> None:
    with pytest.raises(ConfigError, match="1 devices but only 0 examples"):
        partition_iid(np.array([], dtype=np.int64), 1, rng())


@pytest.mark.parametrize("num_devices", [0, -1])
def test_num_devices_below_one_is_refused(num_devices: int) -> None:
    with pytest.raises(ConfigError, match=f"num_devices must be >= 1, got {num_devices}"):
        partition_iid(labels_of(3), num_devices, rng())


def test_non_integer_num_devices_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"num_devices must be an integer, got 2\.0"):
        partition_iid(labels_of(3), 2.0, rng())  # type: ignore[arg-type]


def test_labels_must_be_1d_non_negative_integers() -> None:
    with pytest.raises(ConfigError, match=r"labels must be 1-D, got shape \(2, 2\)"):
        partition_iid(np.zeros((2, 2), dtype=np.int64), 1, rng())
    with pytest.raises(ConfigError, match="labels must be integers, got dtype float64"):
        partition_iid(np.zeros(3), 1, rng())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="labels must be >= 0, got -1"):
        partition_dirichlet(np.array([0, -1, 1]), 1, rng(), alpha=1.0)


def test_function_parameters_are_checked_like_the_parser() -> None:
    y = labels_of(3, 3)
    with pytest.raises(ConfigError) as e:
        partition_dirichlet(y, 2, rng(), alpha=-1)
    assert str(e.value) == "partition 'dirichlet:-1': alpha must be > 0, got -1.0"
    with pytest.raises(ConfigError, match=r"exponent must be > 0, got 0\.0"):
        partition_powerlaw(y, 2, rng(), exponent=0.0)
    with pytest.raises(ConfigError, match="classes_per_device must be >= 1, got 0"):
        partition_shards(y, 2, rng(), classes_per_device=0)


def test_shards_k_above_number_of_classes_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"partition 'shards:3': classes_per_device must be <= the number of classes "
        r"in the data \(2\), got 3",
    ):
        partition_shards(labels_of(3, 3), 2, rng(), classes_per_device=3)
