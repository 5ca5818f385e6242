"""Robust aggregation rules: known answers on hand-checkable inputs, the rules against
naive one-coordinate-at-a-time definitions, their conditions on malicious devices, and
every refusal. The contract every strategy passes is in ``test_strategies_contract.py``.
"""

from __future__ import annotations

import itertools
import math
import pickle
import re

import numpy as np
import pytest

from fedge.errors import ConfigError, UnknownNameError
from fedge.params import Params
from fedge.strategies import (
    Aggregate,
    Strategy,
    build_strategy,
    check_cohort,
    check_secure_aggregation,
    min_updates,
    parse_spec,
)

ROBUST = ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"]


def vec(*values: float) -> Params:
    return {"x": np.array(values, dtype=np.float64)}


def combine(strategy: Strategy, *updates: Params, weights: list[float] | None = None) -> np.ndarray:
    acc = strategy.accumulator(updates[0])
    for i, u in enumerate(updates):
        acc.add(u, 1.0 if weights is None else weights[i])
    return acc.result().delta["x"]


def scalars(*values: float) -> list[Params]:
    return [vec(v) for v in values]


# --- known answers ----------------------------------------------------------------------


def test_median_odd_and_even() -> None:
    s = build_strategy("median")
    assert combine(s, *scalars(1, 2, 100))[0] == 2.0
    assert combine(s, *scalars(100, 3, 1, 2))[0] == 2.5  # mean of the two middle values
    # Coordinate by coordinate: each coordinate's median, not one update's.
    np.testing.assert_array_equal(combine(s, vec(1, 5), vec(2, 4), vec(3, -100)), [2.0, 4.0])


def test_trimmed_mean_drops_floor_beta_n_at_each_end() -> None:
    # n = 5, beta 0.2: one value off each end: mean(2, 3, 4) = 3.
    assert combine(build_strategy("trimmed-mean:0.2"), *scalars(100, 1, 2, 3, 4))[0] == 3.0
    # n = 4, beta 0.25: mean(2, 3) = 2.5.
    assert combine(build_strategy("trimmed-mean:0.25"), *scalars(1, 2, 3, -50))[0] == 0.5 * (1 + 2)
    # n = 4, beta 0.2: floor(0.8) = 0, nothing trimmed: the plain mean.
    assert combine(build_strategy("trimmed-mean:0.2"), *scalars(1, 2, 3, 6))[0] == 3.0


def test_trimmed_mean_floor_is_not_fooled_by_rounding() -> None:
    # 0.29 * 100 is 28.999999999999996 in floating point; 29 values go at each end.
    s = build_strategy("trimmed-mean:0.29", {"f": 29})
    check_cohort(s, 100)
    assert min_updates(s) == 100


# Squared distances between 0, 2, 3, 7, 100 (f = 1: each score sums the
# n - f - 2 = 2 nearest): 0 -> 4 + 9 = 13;  2 -> 1 + 4 = 5;  3 -> 1 + 9 = 10;
# 7 -> 16 + 25 = 41;  100 -> 93^2 + 97^2.
KRUM_POINTS = (0.0, 2.0, 3.0, 7.0, 100.0)


def test_krum_picks_the_update_with_the_closest_neighbours() -> None:
    assert combine(build_strategy("krum", {"f": 1}), *scalars(*KRUM_POINTS))[0] == 2.0
    # The order the updates arrive in does not matter.
    for perm in itertools.permutations(KRUM_POINTS):
        assert combine(build_strategy("krum", {"f": 1}), *scalars(*perm))[0] == 2.0


def test_multi_krum_averages_the_m_best() -> None:
    # m = 2: updates 2 and 3;  m = n - f = 4 (default): 2, 3, 0 and 7.
    assert combine(build_strategy("multi-krum:2", {"f": 1}), *scalars(*KRUM_POINTS))[0] == 2.5
    assert combine(build_strategy("multi-krum", {"f": 1}), *scalars(*KRUM_POINTS))[0] == 3.0


def test_krum_returns_the_chosen_update_itself() -> None:
    ups = [vec(0.0, 0.0), vec(1.0, 0.0), vec(0.0, 1.0), vec(0.5, 0.5), vec(50.0, -50.0)]
    # f = 1, 2 neighbours. Squared distances: (0,0)-(0.5,0.5) 0.5, (1,0)-(0.5,0.5) 0.5,
    # (0,1)-(0.5,0.5) 0.5, (0,0)-(1,0) 1, ... so (0.5, 0.5) scores 1.0, the others 1.5.
    np.testing.assert_array_equal(combine(build_strategy("krum", {"f": 1}), *ups), [0.5, 0.5])


def test_krum_tie_is_broken_the_same_whatever_the_order() -> None:
    # With n = 3 and f = 0 the two closest updates always tie (each is the
    # other's nearest): the tie goes to the smaller update, in every order.
    pts = (1.0, -3.0, 0.5)
    for perm in itertools.permutations(pts):
        assert combine(build_strategy("krum"), *scalars(*perm))[0] == 0.5


def test_bulyan_with_f_zero_is_the_mean() -> None:
    assert combine(build_strategy("bulyan"), *scalars(1, 2, 6))[0] == 3.0


def test_robust_rules_ignore_a_huge_claimed_weight() -> None:
    pts = scalars(1, 2, 3, 4, 5, 6, 1000)
    for name in ROBUST:
        s = build_strategy(name, {"f": 1})
        plain = combine(s, *pts)
        lied = combine(s, *pts, weights=[1, 1, 1, 1, 1, 1, 1e9])
        np.testing.assert_array_equal(plain, lied, err_msg=name)
        assert abs(plain[0]) < 10, name  # and none follows the outlier


# --- against naive definitions ---------------------------------------------------------


def naive_krum_scores(x: np.ndarray, among: list[int], f: int) -> dict[int, float]:
    k = max(len(among) - f - 2, 0)
    out = {}
    for i in among:
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in among if j != i)
        out[i] = sum(d[:k])
    return out


def naive(name: str, x: np.ndarray, f: int, beta: float = 0.2, m: int = 0) -> np.ndarray:
    """One coordinate, one update at a time: the rules as their papers state them."""
    n, dim = x.shape
    if name == "median":
        return np.array([float(np.median(x[:, j])) for j in range(dim)])
    if name == "trimmed-mean":
        k = math.floor(beta * n + 1e-9)
        return np.array([np.mean(sorted(x[:, j])[k : n - k]) for j in range(dim)])
    if name in ("krum", "multi-krum"):
        scores = naive_krum_scores(x, list(range(n)), f)
        order = sorted(scores, key=lambda i: (scores[i], tuple(x[i])))
        chosen = order[:1] if name == "krum" else order[: (m or n - f)]
        return x[chosen].mean(axis=0)
    assert name == "bulyan"
    left, picked = list(range(n)), []
    for _ in range(n - 2 * f):
        scores = naive_krum_scores(x, left, f)
        # Two updates that are each other's nearest neighbour tie when one
        # neighbour is counted; the tie goes to the smaller update.
        best = min(left, key=lambda i: (scores[i], tuple(x[i])))
        picked.append(best)
        left.remove(best)
    beta_n = len(picked) - 2 * f
    out = []
    for j in range(dim):
        col = x[picked, j]
        med = float(np.median(col))
        out.append(np.mean(sorted(col, key=lambda v: abs(v - med))[:beta_n]))
    return np.array(out)


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rules_match_their_naive_definition(name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, f = 11, 2
    x = rng.standard_normal((n, 7))
    x[:f] = rng.standard_normal((f, 7)) * 50 + 20  # f far-away updates
    opts: dict[str, float] = {"f": f}
    s = build_strategy(name, opts)
    got = combine(s, *({"x": row} for row in x))
    np.testing.assert_allclose(got, naive(name, x, f), rtol=1e-10, atol=1e-12)


def test_coordinate_rules_on_more_than_one_block() -> None:
    # Past one block of coordinates (and so past one thread's share) the
    # result is still per coordinate.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 40_000)).astype(np.float32)
    for name, ref in [("median", np.median(x.astype(np.float64), axis=0)),
                      ("trimmed-mean:0.2", np.sort(x, axis=0)[1:5].astype(np.float64).mean(axis=0))]:
        s = build_strategy(name)
        got = combine(s, *({"x": row} for row in x))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=name)


def test_stack_survives_pickling_and_merges_by_concatenation() -> None:
    # The processes backend sends partial accumulators between processes.
    s = build_strategy("multi-krum", {"f": 1})
    pts = scalars(*KRUM_POINTS)
    left, right = s.accumulator(pts[0]), s.accumulator(pts[0])
    for p in pts[:2]:
        left.add(p, 1.0)
    for p in pts[2:]:
        right.add(p, 2.0)
    left.merge(pickle.loads(pickle.dumps(right)))
    result = left.result()
    assert result.count == 5 and result.total_weight == 8.0
    assert result.delta["x"][0] == 3.0


def test_stored_updates_are_copies() -> None:
    s = build_strategy("median")
    u = vec(1.0)
    acc = s.accumulator(u)
    acc.add(u, 1.0)
    u["x"][0] = 99.0
    assert acc.result().delta["x"][0] == 1.0


# --- norm bounding ---------------------------------------------------------------------


def test_norm_bound_clips_then_takes_fedavgs_weighted_mean() -> None:
    s = build_strategy("norm-bound:1")
    # [3, 4] has norm 5: clipped to [0.6, 0.8]. [0.3, 0.4] (norm 0.5) is inside the ball.
    got = combine(s, vec(3, 4), vec(0.3, 0.4), weights=[1.0, 3.0])
    np.testing.assert_allclose(got, [(0.6 + 3 * 0.3) / 4, (0.8 + 3 * 0.4) / 4])


def test_norm_bound_wraps_another_strategy() -> None:
    s = build_strategy("norm-bound:1:median", {"f": 1})
    assert s.name == "norm-bound" and min_updates(s) == 3
    assert s.needs_every_update and not s.secagg_compatible  # type: ignore[attr-defined]
    # Clipped to norm 1 first: 0.5, 1, 1 (from 5) -> median 1.
    assert combine(s, *scalars(0.5, 5.0, 1.0))[0] == 1.0
    wrapped = build_strategy("norm-bound:2:fedadam", {"server_lr": 0.5})
    assert wrapped.inner == build_strategy("fedadam", {"server_lr": 0.5})  # type: ignore[attr-defined]


def test_norm_bound_noise_is_reproducible_per_seed_and_round() -> None:
    s = build_strategy("norm-bound:1", {"noise": 0.01, "seed": 7})
    p = {"w": np.zeros(20_000, dtype=np.float32)}
    zero = Aggregate({"w": np.zeros(20_000, dtype=np.float32)}, 1.0, 1)
    state = s.init(p)
    a = s.apply(state, zero).params["w"]
    b = s.apply(state, zero).params["w"]
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32
    assert np.std(a) == pytest.approx(0.01, rel=0.05)
    c = s.apply(s.apply(state, zero), zero).params["w"] - a  # round 2 draws other noise
    assert not np.allclose(c, a)
    other = build_strategy("norm-bound:1", {"noise": 0.01, "seed": 8}).apply(state, zero)
    assert not np.allclose(other.params["w"], a)


# --- conditions on f -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "options", "needed", "condition"),
    [
        ("median", {"f": 2}, 5, "n >= 2f + 1"),
        ("trimmed-mean", {"f": 2}, 10, "floor(beta * n) >= f"),
        ("trimmed-mean:0.1", {"f": 1}, 10, "floor(beta * n) >= f"),
        ("krum", {"f": 2}, 7, "n >= 2f + 3"),
        ("multi-krum", {"f": 2}, 7, "n >= 2f + 3"),
        ("multi-krum:5", {"f": 1}, 6, "n >= m + f"),
        ("bulyan", {"f": 1}, 7, "n >= 4f + 3"),
        ("norm-bound:1:krum", {"f": 1}, 5, "n >= 2f + 3"),
        # Mixing first: nearest-neighbour mixing adds n >= 2f + 1; bucketing counts the buckets.
        ("median:mix=nnm", {"f": 2}, 5, "n >= 2f + 1 (mix=nnm: each update mixed"),
        ("trimmed-mean:mix=nnm", {"f": 2}, 10, "and floor(beta * n) >= f"),
        ("krum:mix=nnm", {"f": 2}, 7, "and n >= 2f + 3"),
        ("median:bucket=2", {"f": 2}, 9, "ceil(n / 2) bucket means"),
        ("trimmed-mean:0.4:bucket=2", {"f": 2}, 9, "bucket means"),
        ("multi-krum:3:bucket=2", {"f": 1}, 9, "n >= m + f (m 3)"),
        ("bulyan:bucket=3", {"f": 1}, 19, "ceil(n / 3) bucket means"),
        ("norm-bound:1:median:bucket=2", {"f": 1}, 5, "bucket means"),
    ],
)
def test_f_condition_refuses_one_update_too_few(
    spec: str, options: dict[str, float], needed: int, condition: str
) -> None:
    s = build_strategy(spec, options)
    assert min_updates(s) == needed
    check_cohort(s, needed)
    check_cohort(s, needed + 5)
    expected = rf"{re.escape(condition)}.*n={needed - 1} updates.*at least {needed}"
    with pytest.raises(ConfigError, match=expected):
        check_cohort(s, needed - 1, what="a cohort of test devices")
    # A round that ends with too few updates is refused too, never aggregated.
    acc = s.accumulator(vec(0.0))
    for i in range(needed - 1):
        acc.add(vec(float(i)), 1.0)
    with pytest.raises(ValueError, match=f"at least {needed} updates, got {needed - 1}"):
        acc.result()
    acc.add(vec(0.5), 1.0)
    assert acc.result().count == needed


def test_strategies_without_a_condition_take_any_cohort() -> None:
    for spec in ("fedavg", "fedadam", "norm-bound:1"):
        s = build_strategy(spec)
        assert min_updates(s) == 1
        check_cohort(s, 1)


def test_only_norm_bounding_composes_with_secure_aggregation() -> None:
    for spec in ("fedavg", "fedyogi", "norm-bound:1", "norm-bound:1:fedadam"):
        check_secure_aggregation(build_strategy(spec))
    for spec in ["median", "trimmed-mean:0.1", "krum", "multi-krum", "bulyan", "norm-bound:1:krum",
                 "median:mix=nnm:f=1", "trimmed-mean:bucket=2"]:
        with pytest.raises(ConfigError, match=r"individual update.*only their sum"):
            check_secure_aggregation(build_strategy(spec))


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("f", [-1.0, 1.5, math.nan, math.inf])
def test_f_must_be_a_count(name: str, f: float) -> None:
    with pytest.raises(ConfigError, match=rf"strategy '{name}': f \(malicious devices"):
        build_strategy(name, {"f": f})


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1, math.nan])
def test_trimmed_mean_refuses_a_bad_beta(beta: float) -> None:
    with pytest.raises(ConfigError, match=r"beta .* must be in \[0, 0.5\)"):
        build_strategy("trimmed-mean", {"beta": beta})


def test_trimmed_mean_beta_zero_tolerates_nobody() -> None:
    assert min_updates(build_strategy("trimmed-mean:0")) == 1
    with pytest.raises(ConfigError, match="beta 0 trims nothing"):
        build_strategy("trimmed-mean:0", {"f": 1})


@pytest.mark.parametrize("m", [-1.0, 2.5, math.inf])
def test_multi_krum_refuses_a_bad_m(m: float) -> None:
    with pytest.raises(ConfigError, match=r"m .* must be an integer >= 0"):
        build_strategy("multi-krum", {"m": m})


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("norm-bound", {}, "needs its bound: norm-bound:M"),
        ("norm-bound:0", {}, "bound .* must be positive"),
        ("norm-bound:-1", {}, "bound .* must be positive"),
        ("norm-bound:inf", {}, "bound .* must be positive"),
        ("norm-bound:big", {}, "M \\(the bound\\) must be a number, got 'big'"),
        ("norm-bound:1", {"noise": -0.1}, "noise .* >= 0"),
        ("norm-bound:1", {"seed": 1.5}, "seed must be an integer"),
        ("norm-bound:1:norm-bound:2", {}, "cannot wrap another norm-bound"),
        ("norm-bound:1:fedsgd", {}, "unknown strategy 'fedsgd'"),
        ("norm-bound:1", {"momentum": 0.9}, "takes no option 'momentum'"),
        ("median:3", {}, "'median' takes no ':ARG'"),
        ("trimmed-mean:", {}, "empty argument"),
        ("trimmed-mean:lots", {}, "beta must be a number, got 'lots'"),
        ("trimmed-mean:0.1", {"beta": 0.2}, "sets beta twice"),
        ("multi-krum:3", {"m": 3}, "sets m twice"),
        ("krum", {"beta": 0.1}, "takes no option 'beta'"),
        # Options in the spec, and the mixing steps.
        ("median:mix=nnm", {}, "with f = 0 that is every update"),
        ("median:mix=knn", {"f": 1}, "mix .* must be one of none, nnm, got 'knn'"),
        ("median:bucket=0", {}, "bucket .* must be an integer >= 1"),
        ("median:bucket=1.5", {}, "bucket .* must be an integer >= 1"),
        ("median", {"bucket": -2.0}, "bucket .* must be an integer >= 1"),
        ("krum", {"bucket": math.inf}, "bucket .* must be an integer >= 1"),
        ("median:mix=nnm:bucket=2", {"f": 1}, "choose one"),
        ("median:bucket=2", {"seed": -1.0}, "seed must be an integer"),
        ("median:bucket=2", {"seed": 0.5}, "seed must be an integer"),
        ("median:bucket=2", {"bucket": 2.0}, "sets bucket twice: in the spec and as an option"),
        ("median:bucket=2:bucket=3", {}, "sets bucket twice"),
        ("median:bucket", {}, "takes no ':ARG'"),
        ("median:=2", {}, "'=2' is not KEY=VALUE"),
        ("median:bucket=", {}, "'bucket=' is not KEY=VALUE"),
        ("median::bucket=2", {}, "empty argument"),
        ("trimmed-mean:mix=nnm:0.1", {"f": 1}, "the argument '0.1' must come first"),
        ("trimmed-mean:0.1:beta=0.2", {}, "sets beta twice"),
        ("median", {"mix": 1.0}, "takes a word, so it is written in the spec: median:mix="),
        ("median:colour=red", {}, "takes no option 'colour'"),
        ("median:bucket=two", {}, "bucket must be a number, got 'two'"),
        ("median:f=1.5", {}, "f \\(malicious devices"),
        ("norm-bound:1:noise=0.1", {}, "norm-bound's own options"),
        ("fedavg:momentum=0.5", {}, "takes no option 'momentum'"),
    ],
)
def test_bad_specs_are_refused(spec: str, options: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_strategy(spec, options)


def test_unknown_name_with_an_argument_names_the_name() -> None:
    with pytest.raises(UnknownNameError) as info:
        parse_spec("trimmed:0.1")
    assert info.value.name == "trimmed"


def test_add_refuses_what_the_contract_refuses() -> None:
    acc = build_strategy("median").accumulator(vec(0.0, 0.0))
    with pytest.raises(ValueError, match="shape"):
        acc.add(vec(1.0), 1.0)
    with pytest.raises(TypeError, match="WeightedMean"):
        acc.merge(build_strategy("fedavg").accumulator(vec(0.0, 0.0)))
    other = build_strategy("median").accumulator(vec(0.0))
    with pytest.raises(ValueError, match="another params structure"):
        acc.merge(other)


# --- mixing first: nearest-neighbour mixing and bucketing ------------------------------


def naive_nnm(x: np.ndarray, f: int) -> np.ndarray:
    """Allouah et al. 2023, Algorithm 1: each update becomes the mean of its n - f nearest."""
    n = len(x)
    out = []
    for i in range(n):
        d = [float(np.sum((x[i] - x[j]) ** 2)) for j in range(n)]
        nearest = sorted(range(n), key=lambda j: d[j])[: n - f]
        out.append(x[nearest].mean(axis=0))
    return np.array(out)


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nnm_is_the_rule_applied_to_the_nearest_neighbour_means(name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, f = 11, 2
    x = rng.standard_normal((n, 7))
    x[:f] = rng.standard_normal((f, 7)) * 50 + 20  # f far-away updates
    s = build_strategy(f"{name}:mix=nnm", {"f": f})
    got = combine(s, *({"x": row} for row in x))
    np.testing.assert_allclose(got, naive(name, naive_nnm(x, f), f), rtol=1e-10, atol=1e-12)


def test_nnm_by_hand() -> None:
    # f = 1, n - f = 3 nearest: 0, 1 and 2 each mix to mean(0, 1, 2) = 1; 10 mixes
    # to mean(10, 2, 1) = 13 / 3. The median of 1, 1, 1, 13/3 is 1 (plain: 1.5).
    pts = scalars(0, 1, 2, 10)
    assert combine(build_strategy("median:mix=nnm", {"f": 1}), *pts)[0] == pytest.approx(1.0)
    assert combine(build_strategy("median", {"f": 1}), *pts)[0] == 1.5


def test_nnm_breaks_a_tie_at_the_cut_by_value_in_any_order() -> None:
    # n = 3, f = 1: two nearest each. 1 and -1 are equally far from 0, so 0 takes
    # the smaller, -1: mixtures -0.5 (0), 0.5 (1), -0.5 (-1); median -0.5.
    s = build_strategy("median:mix=nnm", {"f": 1})
    for perm in itertools.permutations((0.0, 1.0, -1.0)):
        assert combine(s, *scalars(*perm))[0] == -0.5


def test_nnm_on_more_than_one_block_in_float32() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 40_000)).astype(np.float32)
    x[0] *= 30
    got = combine(build_strategy("median:mix=nnm", {"f": 1}), *({"x": row} for row in x))
    assert got.dtype == np.float32
    ref = np.median(naive_nnm(x.astype(np.float64), 1), axis=0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_nnm_outvotes_far_away_updates_that_shift_the_plain_median() -> None:
    # Honest values spread over [0, 1]; two far, equal malicious values at -50.
    honest = np.linspace(0.0, 1.0, 9)
    pts = scalars(*honest, -50.0, -50.0)
    plain = combine(build_strategy("median", {"f": 2}), *pts)[0]
    mixed = combine(build_strategy("median:mix=nnm", {"f": 2}), *pts)[0]
    assert plain == pytest.approx(honest[3])  # two order positions towards the attackers
    assert abs(mixed - honest.mean()) < abs(plain - honest.mean())


def bucket_partitions(n: int, size: int) -> list[list[list[int]]]:
    """Every way to cut 0..n-1 into buckets of ``size`` (and one smaller bucket)."""
    if n <= size:
        return [[list(range(n))]] if n else [[]]
    out = []
    first = 0  # the bucket holding the smallest index, so that no partition repeats
    for rest in itertools.combinations(range(1, n), size - 1):
        members = [first, *rest]
        left = [i for i in range(n) if i not in members]
        for tail in bucket_partitions(len(left), size):
            out.append([members] + [[left[i] for i in b] for b in tail])
    if n % size:
        # The short bucket may be the one holding index 0.
        for rest in itertools.combinations(range(1, n), n % size - 1):
            members = [first, *rest]
            left = [i for i in range(n) if i not in members]
            for tail in bucket_partitions(len(left), size):
                if all(len(b) == size for b in tail):
                    out.append([members] + [[left[i] for i in b] for b in tail])
    return out


def matching_partitions(got: np.ndarray, x: np.ndarray, parts: list[list[list[int]]]) -> list[int]:
    """The partitions whose bucket means have ``got`` as their coordinate-wise median."""
    return [i for i, p in enumerate(parts)
            if np.allclose(got, np.median(np.array([x[b].mean(axis=0) for b in p]), axis=0),
                           rtol=1e-12, atol=1e-12)]


def which_partition(got: np.ndarray, x: np.ndarray, parts: list[list[list[int]]]) -> int:
    matches = matching_partitions(got, x, parts)
    assert len(matches) == 1, matches
    return matches[0]


def test_bucketing_is_the_rule_on_the_means_of_a_uniformly_random_partition() -> None:
    # Karimireddy et al. 2022, Algorithm 1: shuffle, cut into buckets of 2 (5
    # updates: 2 + 2 + 1), the rule on the bucket means. The result is the
    # median of the means of one of the 15 such partitions, and over many
    # seeds every partition comes up about equally often.
    x = np.random.default_rng(7).standard_normal((5, 3))
    parts = bucket_partitions(5, 2)
    assert len(parts) == 15
    counts = [0] * len(parts)
    for seed in range(450):
        s = build_strategy("median:bucket=2", {"seed": seed})
        counts[which_partition(combine(s, *({"x": r} for r in x)), x, parts)] += 1
    assert min(counts) >= 12 and max(counts) <= 50, counts  # 30 expected each


def test_bucketing_changes_with_the_updates_and_not_with_their_order() -> None:
    rng = np.random.default_rng(8)
    parts = bucket_partitions(5, 2)
    s = build_strategy("median:bucket=2", {"seed": 1})
    seen = set()
    for _ in range(60):  # 60 rounds: other updates, another shuffle
        x = rng.standard_normal((5, 3))
        rows = [{"x": r} for r in x]
        got = combine(s, *rows)
        matches = matching_partitions(got, x, parts)
        assert matches
        seen.add(frozenset(matches))
        for perm in list(itertools.permutations(range(5)))[::17]:
            np.testing.assert_array_equal(combine(s, *(rows[i] for i in perm)), got)
    assert len(seen) >= 10


def test_bucketing_with_equal_updates_is_still_order_free() -> None:
    # Equal updates have equal digests (their order among themselves cannot matter).
    x = np.array([[2.0, 1.0], [2.0, 1.0], [9.0, -3.0], [9.0, -3.0], [5.0, 0.5]])
    parts = bucket_partitions(5, 2)
    for seed in range(5):
        s = build_strategy("median:bucket=2", {"seed": seed})
        got = combine(s, *({"x": r} for r in x))
        assert matching_partitions(got, x, parts)
        for perm in itertools.permutations(range(5)):
            np.testing.assert_array_equal(combine(s, *({"x": x[i]} for i in perm)), got)


def test_one_bucket_is_the_mean() -> None:
    for spec in ("median:bucket=4", "median:bucket=10", "trimmed-mean:bucket=4"):
        assert combine(build_strategy(spec), *scalars(1, 2, 3, 100))[0] == 26.5, spec


def test_mixing_strategies_survive_pickling() -> None:
    # The processes and Ray backends send the strategy and partial stacks between processes.
    for spec, opts in (("median:mix=nnm", {"f": 1.0}), ("bulyan:bucket=2", {"seed": 5.0})):
        s = build_strategy(spec, opts)
        assert pickle.loads(pickle.dumps(s)) == s
    s = build_strategy("median:bucket=2", {"seed": 5})
    pts = scalars(*KRUM_POINTS)
    left, right = s.accumulator(pts[0]), s.accumulator(pts[0])
    for p in pts[:2]:
        left.add(p, 1.0)
    for p in pts[2:]:
        right.add(p, 1.0)
    left.merge(pickle.loads(pickle.dumps(right)))
    assert left.result().delta["x"][0] == combine(s, *reversed(pts))[0]


def test_spec_options_are_the_same_as_strategy_options() -> None:
    assert build_strategy("fedavgm:momentum=0.5") == build_strategy("fedavgm", {"momentum": 0.5})
    assert build_strategy("median:bucket=2:seed=4") == build_strategy(
        "median", {"bucket": 2, "seed": 4})
    assert build_strategy("trimmed-mean:0.4:f=2:bucket=2") == build_strategy(
        "trimmed-mean", {"beta": 0.4, "f": 2, "bucket": 2})
    assert build_strategy("median:mix=none") == build_strategy("median")
    assert build_strategy("median:bucket=1") == build_strategy("median")
    assert parse_spec("trimmed-mean:0.1:mix=nnm") == ("trimmed-mean", "0.1", {"mix": "nnm"})
    assert parse_spec("norm-bound:1:median:mix=nnm") == ("norm-bound", "1:median:mix=nnm", {})
    # norm-bound hands its seed to a wrapped rule that shuffles.
    wrapped = build_strategy("norm-bound:1:median:bucket=2", {"seed": 6})
    assert wrapped.seed == 6 and wrapped.inner.rule.mixing.seed == 6  # type: ignore[attr-defined]
