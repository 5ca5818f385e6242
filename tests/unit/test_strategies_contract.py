"""The contract every strategy in ``fedge.strategies.STRATEGIES`` must pass, then
known answers per strategy and the name registry.

The robust rules (median, trimmed mean, Krum, Multi-Krum, Bulyan) need a
minimum number of updates for their condition on malicious devices, so the
contract feeds every round at least :func:`fedge.strategies.min_updates`
updates (copies of the same delta where the test is about one delta). They
give each device an equal vote and keep every update, so the weighting and
memory checks follow the strategy's ``needs_every_update``. Their own known
answers and refusals are in ``test_robust.py``.

The known answers follow Reddi et al., "Adaptive Federated Optimization"
(ICLR 2021), Algorithm 2: no bias correction, ``v`` starts at ``tau ** 2``,
``x <- x + lr * m / (sqrt(v) + tau)`` with the mean delta as pseudo-gradient.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from params_asserts import assert_params_close, assert_params_equal, deep_copy

from fedge.errors import ConfigError, UnknownNameError
from fedge.params import Params
from fedge.strategies import (
    STRATEGIES,
    Accumulator,
    Aggregate,
    ServerState,
    Strategy,
    build_strategy,
    min_updates,
    strategy_options,
)

# Every registered name, with its ':ARG' where it needs one; a few specs twice
# with another argument (a robust rule around FedAvg's server step, norm
# bounding around a robust rule), and the robust rules' mixing steps
# (nearest-neighbour mixing needs f >= 1, set in the spec; at most three
# updates a round here, so the rules that need fewest).
CONTRACT_SPECS = sorted(
    [n for n in STRATEGIES if n != "norm-bound"]
    + ["trimmed-mean:0.1", "multi-krum:2", "norm-bound:100", "norm-bound:100:median",
       "median:mix=nnm:f=1", "median:bucket=2", "trimmed-mean:bucket=2", "fedavgm:momentum=0.5",
       "norm-bound:100:median:mix=nnm:f=1"]
)


def aggregate(strategy: Strategy, template: Params, *updates: tuple[Params, float]) -> Aggregate:
    acc = strategy.accumulator(template)
    for delta, weight in updates:
        acc.add(delta, weight)
    return acc.result()


def a_round_of(strategy: Strategy, template: Params, delta: Params, weight: float) -> Aggregate:
    """A round in which every device sent ``delta``: as many as the strategy needs (FedAvg: one)."""
    return aggregate(strategy, template, *[(delta, weight)] * min_updates(strategy))


@pytest.fixture(params=CONTRACT_SPECS)
def strategy(request: pytest.FixtureRequest) -> Strategy:
    return build_strategy(request.param)


@pytest.fixture
def params() -> Params:
    return {
        "w": np.array([[1.0, -2.0], [0.5, 3.0]], dtype=np.float32),
        "b": np.array([0.25], dtype=np.float32),
    }


def delta_of(scale: float) -> Params:
    """A delta shaped like the ``params`` fixture, with distinct values per coordinate."""
    return {
        "w": np.array([[0.1, -0.2], [0.3, 0.05]], dtype=np.float32) * np.float32(scale),
        "b": np.array([-0.4], dtype=np.float32) * np.float32(scale),
    }


# --- the contract ---------------------------------------------------------------------


def test_is_a_strategy_with_its_registry_name(strategy: Strategy, params: Params) -> None:
    assert isinstance(strategy, Strategy)
    assert strategy.name in STRATEGIES
    assert isinstance(strategy.accumulator(params), Accumulator)
    assert strategy.device_mu >= 0
    # What other parts read (secure aggregation, memory planning): one rule
    # cannot both need every update and work on their sum alone.
    assert isinstance(strategy.needs_every_update, bool)  # type: ignore[attr-defined]
    assert isinstance(strategy.secagg_compatible, bool)  # type: ignore[attr-defined]
    assert strategy.secagg_compatible is not strategy.needs_every_update  # type: ignore[attr-defined]
    assert min_updates(strategy) >= 1


def test_init_copies_params(strategy: Strategy, params: Params) -> None:
    state = strategy.init(params)
    assert state.round == 0
    params["w"][0, 0] = 99.0
    params["b"][:] = -99.0
    assert state.params["w"][0, 0] == 1.0
    assert state.params["b"][0] == 0.25


def test_init_keeps_names_shapes_and_dtypes(strategy: Strategy, params: Params) -> None:
    state = strategy.init(params)
    assert_params_equal(state.params, params)
    for slot in state.opt_state.values():
        assert list(slot) == list(params)
        for k in params:
            assert slot[k].shape == params[k].shape


def test_mean_of_identical_deltas_is_that_delta(strategy: Strategy, params: Params) -> None:
    d = delta_of(1.0)
    many = aggregate(strategy, params, (d, 1.0), (d, 2.0), (d, 5.0))
    one = a_round_of(strategy, params, d, 1.0)
    assert many.count == 3 and many.total_weight == 8.0
    assert_params_close(many.delta, d)
    state = strategy.init(params)
    assert_params_close(strategy.apply(state, many).params, strategy.apply(state, one).params)


def test_zero_delta_leaves_params_unchanged_on_first_round(
    strategy: Strategy, params: Params
) -> None:
    zero = {k: np.zeros_like(v) for k, v in params.items()}
    state = strategy.init(params)
    new = strategy.apply(state, a_round_of(strategy, params, zero, 3.0))
    assert_params_equal(new.params, params)


def test_nonzero_delta_moves_params_along_its_sign(strategy: Strategy, params: Params) -> None:
    # Every rule here steps in the direction of the (first) mean delta.
    d = delta_of(1.0)
    new = strategy.apply(strategy.init(params), a_round_of(strategy, params, d, 1.0))
    for k in params:
        moved = new.params[k].astype(np.float64) - params[k]
        assert np.all(np.sign(moved) == np.sign(d[k])), k


def test_accumulation_is_order_invariant(strategy: Strategy, params: Params) -> None:
    updates = [(delta_of(1.0), 2.0), (delta_of(-3.0), 1.0), (delta_of(0.5), 7.0)]
    forward = aggregate(strategy, params, *updates)
    backward = aggregate(strategy, params, *reversed(updates))
    assert forward.count == backward.count == 3
    assert forward.total_weight == backward.total_weight == 10.0
    assert_params_close(forward.delta, backward.delta)


def test_merge_equals_adding_everything_into_one(strategy: Strategy, params: Params) -> None:
    updates = [(delta_of(1.0), 2.0), (delta_of(-3.0), 1.0), (delta_of(0.5), 7.0)]
    whole = aggregate(strategy, params, *updates)
    left = strategy.accumulator(params)
    left.add(*updates[0])
    right = strategy.accumulator(params)
    right.add(*updates[1])
    right.add(*updates[2])
    left.merge(right)
    merged = left.result()
    assert merged.count == 3
    assert merged.total_weight == 10.0
    assert_params_close(merged.delta, whole.delta)
    # The merged-in accumulator is left as it was.
    assert right.count == 2


def test_merge_of_an_empty_accumulator_changes_nothing(
    strategy: Strategy, params: Params
) -> None:
    k = min_updates(strategy)
    acc = strategy.accumulator(params)
    for _ in range(k):
        acc.add(delta_of(1.0), 4.0)
    acc.merge(strategy.accumulator(params))
    result = acc.result()
    assert result.count == k and result.total_weight == 4.0 * k
    assert_params_close(result.delta, delta_of(1.0))
    empty = strategy.accumulator(params)
    empty.merge(acc)
    assert empty.count == k
    assert_params_close(empty.result().delta, delta_of(1.0))


def test_weights_act_as_example_counts(strategy: Strategy, params: Params) -> None:
    if strategy.needs_every_update:  # type: ignore[attr-defined]
        pytest.skip("a robust rule gives every device one vote: see the next test")
    d1, d2 = delta_of(1.0), delta_of(-2.0)
    agg = aggregate(strategy, params, (d1, 1.0), (d2, 3.0))
    assert agg.total_weight == 4.0
    assert agg.count == 2
    # (d1 + 3 d2) / 4 = (1 - 6) / 4 * base = -1.25 * base
    assert_params_close(agg.delta, delta_of(-1.25))
    # w[0, 0]: (0.1 + 3 * -0.2) / 4 = -0.125, by hand.
    assert agg.delta["w"][0, 0] == pytest.approx(-0.125)


def test_robust_rules_ignore_example_weights(strategy: Strategy, params: Params) -> None:
    # Devices report their own example counts, so a rule meant to withstand
    # malicious devices must not let a claimed count buy influence.
    if not strategy.needs_every_update:  # type: ignore[attr-defined]
        pytest.skip("weighted by example counts: see the previous test")
    updates = [delta_of(1.0), delta_of(-2.0), delta_of(0.25)]
    weighted = aggregate(strategy, params, *zip(updates, [1.0, 30.0, 5.0], strict=True))
    equal = aggregate(strategy, params, *((u, 1.0) for u in updates))
    assert weighted.total_weight == 36.0 and weighted.count == 3
    assert_params_close(weighted.delta, equal.delta)


def test_accumulator_memory_is_as_declared(strategy: Strategy) -> None:
    # O(model) for the streaming rules; the robust rules keep every update
    # (O(count x model), as ``needs_every_update`` declares), and no more.
    n = 10_000
    template = {"w": np.zeros(n, dtype=np.float32)}
    model_bytes = template["w"].nbytes
    base = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    keeps_all = strategy.needs_every_update  # type: ignore[attr-defined]
    count = 200 if keeps_all else 1000
    acc = strategy.accumulator(template)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        for i in range(count):
            # A fresh array each time: an accumulator that kept its inputs would hold them all.
            acc.add({"w": base * np.float32(i % 7 + 1)}, 1.0 + i % 3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert acc.count == count
    used = (peak - start) / model_bytes
    if keeps_all:
        assert count * 0.99 < used < count + 6, used
    else:
        assert used < 6, used


def test_apply_never_mutates_its_inputs(strategy: Strategy, params: Params) -> None:
    state = strategy.init(params)
    # Two rounds, so that optimizer slots hold non-trivial values.
    state = strategy.apply(state, a_round_of(strategy, params, delta_of(1.0), 1.0))
    agg = aggregate(strategy, params, (delta_of(-2.0), 1.0), (delta_of(0.5), 2.0),
                    (delta_of(0.25), 1.0))
    params_before = deep_copy(state.params)
    slots_before = {name: deep_copy(slot) for name, slot in state.opt_state.items()}
    delta_before = deep_copy(agg.delta)
    new = strategy.apply(state, agg)
    assert_params_equal(state.params, params_before)
    assert set(state.opt_state) == set(slots_before)
    for name, slot in slots_before.items():
        assert_params_equal(dict(state.opt_state[name]), slot)
    assert_params_equal(agg.delta, delta_before)
    assert state.round == 1
    # And the output shares no memory with the inputs.
    for k in params:
        assert not np.shares_memory(new.params[k], state.params[k])
        assert not np.shares_memory(new.params[k], agg.delta[k])


def test_apply_is_deterministic(strategy: Strategy, params: Params) -> None:
    state = strategy.init(params)
    agg = a_round_of(strategy, params, delta_of(1.0), 1.0)
    assert_params_equal(strategy.apply(state, agg).params, strategy.apply(state, agg).params)


def test_round_increments(strategy: Strategy, params: Params) -> None:
    state = strategy.init(params)
    assert state.round == 0
    for expected in (1, 2, 3):
        state = strategy.apply(state, a_round_of(strategy, params, delta_of(1.0), 1.0))
        assert state.round == expected


def test_params_keep_their_dtype(strategy: Strategy, params: Params) -> None:
    state = strategy.init(params)
    for _ in range(2):
        state = strategy.apply(state, a_round_of(strategy, params, delta_of(1.0), 1.0))
    for k in params:
        assert state.params[k].dtype == np.float32, k


def test_result_with_no_updates_raises(strategy: Strategy, params: Params) -> None:
    acc = strategy.accumulator(params)
    with pytest.raises(ValueError, match="no updates"):
        acc.result()


def test_add_refuses_a_missing_tensor(strategy: Strategy, params: Params) -> None:
    acc = strategy.accumulator(params)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        acc.add({"w": delta_of(1.0)["w"]}, 1.0)
    assert acc.count == 0


def test_add_refuses_an_extra_tensor(strategy: Strategy, params: Params) -> None:
    acc = strategy.accumulator(params)
    with pytest.raises(ValueError, match=r"unexpected \['z'\]"):
        acc.add({**delta_of(1.0), "z": np.zeros(1, dtype=np.float32)}, 1.0)


def test_add_refuses_a_wrong_shape(strategy: Strategy, params: Params) -> None:
    acc = strategy.accumulator(params)
    bad = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(1, dtype=np.float32)}
    with pytest.raises(ValueError, match="'w'"):
        acc.add(bad, 1.0)
    assert acc.count == 0


def test_apply_refuses_an_aggregate_of_another_structure(
    strategy: Strategy, params: Params
) -> None:
    state = strategy.init(params)
    wrong_shape = Aggregate(
        delta={"w": np.zeros((4,), dtype=np.float32), "b": np.zeros(1, dtype=np.float32)},
        total_weight=1.0,
        count=1,
    )
    with pytest.raises(ValueError, match="'w'"):
        strategy.apply(state, wrong_shape)
    missing = Aggregate(delta={"w": np.zeros((2, 2), dtype=np.float32)}, total_weight=1.0, count=1)
    with pytest.raises(ValueError, match="missing"):
        strategy.apply(state, missing)


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_add_refuses_a_bad_weight(strategy: Strategy, params: Params, weight: float) -> None:
    acc = strategy.accumulator(params)
    with pytest.raises(ValueError, match="weight"):
        acc.add(delta_of(1.0), weight)
    assert acc.count == 0
    for _ in range(min_updates(strategy)):  # the accumulator still works, and holds only these
        acc.add(delta_of(1.0), 1.0)
    assert acc.count == min_updates(strategy)
    assert_params_close(acc.result().delta, delta_of(1.0))


def test_merge_refuses_a_foreign_accumulator(strategy: Strategy, params: Params) -> None:
    class Other:
        count = 1

    acc = strategy.accumulator(params)
    with pytest.raises(TypeError, match="Other"):
        acc.merge(Other())  # type: ignore[arg-type]


# --- known answers --------------------------------------------------------------------


def one(x: float) -> Params:
    """A 1-element float64 tensor, so that hand arithmetic carries over exactly."""
    return {"x": np.array([x], dtype=np.float64)}


def step(strategy: Strategy, state: ServerState, delta: float) -> ServerState:
    return strategy.apply(state, Aggregate(delta=one(delta), total_weight=1.0, count=1))


def test_fedavg_server_lr_half() -> None:
    s = build_strategy("fedavg", {"server_lr": 0.5})
    p = {"w": np.array([1.0, 2.0], dtype=np.float64)}
    d = {"w": np.array([0.2, -0.4], dtype=np.float64)}
    new = s.apply(s.init(p), Aggregate(delta=d, total_weight=1.0, count=1))
    np.testing.assert_allclose(new.params["w"], [1.1, 1.8])
    assert dict(new.opt_state) == {}


def test_fedavg_default_is_the_weighted_mean_of_device_models() -> None:
    # Server lr 1: the new global model is the example-weighted mean of device models.
    s = build_strategy("fedavg")
    start = one(1.0)
    dev_a, dev_b = 3.0, 5.0  # device models after local training; 1 and 3 examples
    acc = s.accumulator(start)
    acc.add(one(dev_a - 1.0), 1.0)
    acc.add(one(dev_b - 1.0), 3.0)
    new = s.apply(s.init(start), acc.result())
    assert new.params["x"][0] == pytest.approx((3.0 * 1 + 5.0 * 3) / 4)  # 4.5


def test_fedavgm_momentum_two_rounds() -> None:
    s = build_strategy("fedavgm", {"server_lr": 0.5, "momentum": 0.9})
    state = s.init(one(0.0))
    np.testing.assert_array_equal(state.opt_state["momentum"]["x"], [0.0])
    state = step(s, state, 1.0)
    # m1 = 0.9 * 0 + 1 = 1;  x1 = 0 + 0.5 * 1 = 0.5
    assert state.opt_state["momentum"]["x"][0] == pytest.approx(1.0)
    assert state.params["x"][0] == pytest.approx(0.5)
    state = step(s, state, 0.5)
    # m2 = 0.9 * 1 + 0.5 = 1.4;  x2 = 0.5 + 0.5 * 1.4 = 1.2
    assert state.opt_state["momentum"]["x"][0] == pytest.approx(1.4)
    assert state.params["x"][0] == pytest.approx(1.2)


def test_fedadagrad_two_steps() -> None:
    # tau = 0.3 and deltas 0.4, -1.2 give perfect squares: 0.09 + 0.16 = 0.25, 0.25 + 1.44 = 1.69
    s = build_strategy("fedadagrad", {"server_lr": 0.1, "beta1": 0.0, "tau": 0.3})
    state = s.init(one(1.0))
    assert state.opt_state["v"]["x"][0] == pytest.approx(0.09)
    state = step(s, state, 0.4)
    # m1 = 0.4;  v1 = 0.09 + 0.16 = 0.25;  x1 = 1 + 0.1 * 0.4 / (0.5 + 0.3) = 1.05
    assert state.opt_state["m"]["x"][0] == pytest.approx(0.4)
    assert state.opt_state["v"]["x"][0] == pytest.approx(0.25)
    assert state.params["x"][0] == pytest.approx(1.05)
    state = step(s, state, -1.2)
    # m2 = -1.2;  v2 = 0.25 + 1.44 = 1.69;  x2 = 1.05 + 0.1 * -1.2 / (1.3 + 0.3) = 0.975
    assert state.opt_state["v"]["x"][0] == pytest.approx(1.69)
    assert state.params["x"][0] == pytest.approx(0.975)


def test_fedadagrad_with_momentum() -> None:
    s = build_strategy("fedadagrad", {"server_lr": 0.1, "beta1": 0.5, "tau": 0.3})
    state = step(s, s.init(one(1.0)), 0.4)
    # m1 = 0.5 * 0 + 0.5 * 0.4 = 0.2;  v1 = 0.25;  x1 = 1 + 0.1 * 0.2 / 0.8 = 1.025
    assert state.params["x"][0] == pytest.approx(1.025)


def test_fedadam_two_steps() -> None:
    s = build_strategy("fedadam", {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.1})
    state = s.init(one(1.0))
    assert state.opt_state["m"]["x"][0] == 0.0
    assert state.opt_state["v"]["x"][0] == pytest.approx(0.01)  # tau ** 2
    state = step(s, state, 0.5)
    # m1 = 0.1 * 0.5 = 0.05;  v1 = 0.99 * 0.01 + 0.01 * 0.25 = 0.0124
    x1 = 1.0 + 0.1 * 0.05 / (math.sqrt(0.0124) + 0.1)
    assert state.opt_state["m"]["x"][0] == pytest.approx(0.05)
    assert state.opt_state["v"]["x"][0] == pytest.approx(0.0124)
    assert state.params["x"][0] == pytest.approx(x1)
    assert x1 == pytest.approx(1.023657, abs=1e-6)  # no bias correction: not 1 + 0.1
    state = step(s, state, -1.0)
    # m2 = 0.9 * 0.05 + 0.1 * -1 = -0.055;  v2 = 0.99 * 0.0124 + 0.01 * 1 = 0.022276
    assert state.opt_state["m"]["x"][0] == pytest.approx(-0.055)
    assert state.opt_state["v"]["x"][0] == pytest.approx(0.022276)
    assert state.params["x"][0] == pytest.approx(x1 + 0.1 * -0.055 / (math.sqrt(0.022276) + 0.1))


def test_fedyogi_two_steps() -> None:
    s = build_strategy("fedyogi", {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.1})
    state = step(s, s.init(one(1.0)), 0.5)
    # v0 = 0.01 < d^2 = 0.25, so sign(v0 - d^2) = -1:  v1 = 0.01 + 0.01 * 0.25 = 0.0125
    x1 = 1.0 + 0.1 * 0.05 / (math.sqrt(0.0125) + 0.1)
    assert state.opt_state["v"]["x"][0] == pytest.approx(0.0125)
    assert state.params["x"][0] == pytest.approx(x1)
    state = step(s, state, -1.0)
    # v2 = 0.0125 + 0.01 * 1 = 0.0225 (sqrt 0.15);  m2 = -0.055
    # x2 = x1 + 0.1 * -0.055 / (0.15 + 0.1) = x1 - 0.022
    assert state.opt_state["v"]["x"][0] == pytest.approx(0.0225)
    assert state.opt_state["m"]["x"][0] == pytest.approx(-0.055)
    assert state.params["x"][0] == pytest.approx(x1 - 0.022)


def test_fedyogi_shrinks_v_when_it_exceeds_the_squared_delta() -> None:
    s = build_strategy("fedyogi", {"server_lr": 0.1, "beta1": 0.0, "beta2": 0.5, "tau": 1.0})
    state = step(s, s.init(one(0.0)), 0.5)
    # v0 = 1 > 0.25:  v1 = 1 - 0.5 * 0.25 * 1 = 0.875 (Adam would give 0.625)
    assert state.opt_state["v"]["x"][0] == pytest.approx(0.875)
    assert state.params["x"][0] == pytest.approx(0.1 * 0.5 / (math.sqrt(0.875) + 1.0))


def test_fedadam_and_fedyogi_differ_only_in_v() -> None:
    opts = {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 0.1}
    adam, yogi = build_strategy("fedadam", opts), build_strategy("fedyogi", opts)
    a = step(adam, adam.init(one(1.0)), 0.5)
    y = step(yogi, yogi.init(one(1.0)), 0.5)
    assert a.opt_state["m"]["x"][0] == y.opt_state["m"]["x"][0]
    assert a.opt_state["v"]["x"][0] != pytest.approx(y.opt_state["v"]["x"][0])


def test_fedprox_exposes_device_mu_and_otherwise_equals_fedavg(params: Params) -> None:
    prox = build_strategy("fedprox", {"mu": 0.1, "server_lr": 0.5})
    avg = build_strategy("fedavg", {"server_lr": 0.5})
    assert prox.device_mu == 0.1
    assert prox.name == "fedprox"
    agg = aggregate(avg, params, (delta_of(1.0), 1.0), (delta_of(-2.0), 3.0))
    assert_params_equal(prox.apply(prox.init(params), agg).params,
                        avg.apply(avg.init(params), agg).params)
    assert dict(prox.init(params).opt_state) == {}


@pytest.mark.parametrize("name", sorted(set(CONTRACT_SPECS) - {"fedprox"}))
def test_only_fedprox_asks_for_a_proximal_term(name: str) -> None:
    assert build_strategy(name).device_mu == 0.0


def test_fedprox_accepts_mu_zero() -> None:
    assert build_strategy("fedprox", {"mu": 0.0}).device_mu == 0.0


# --- the registry ---------------------------------------------------------------------


def test_registry_names() -> None:
    assert set(STRATEGIES) == {
        "fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox",
        "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "norm-bound",
    }


@pytest.mark.parametrize("spec", CONTRACT_SPECS)
def test_build_by_name_gives_that_strategy(spec: str) -> None:
    assert build_strategy(spec).name == spec.partition(":")[0]


def test_unknown_strategy_lists_known_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_strategy("fedsgd")
    assert info.value.name == "fedsgd"
    assert info.value.known == sorted(STRATEGIES)
    msg = str(info.value)
    assert "'fedsgd'" in msg
    for name in STRATEGIES:
        assert name in msg
    assert isinstance(info.value, ConfigError)


def test_strategy_options_of_unknown_name() -> None:
    with pytest.raises(UnknownNameError, match="'nope'"):
        strategy_options("nope")


@pytest.mark.parametrize(
    ("name", "option"),
    [("fedavg", "momentum"), ("fedavgm", "beta1"), ("fedadagrad", "beta2"), ("fedadam", "mu")],
)
def test_unknown_option_names_it(name: str, option: str) -> None:
    with pytest.raises(ConfigError, match=f"no option '{option}'"):
        build_strategy(name, {option: 0.5})


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("fedavg", "server_lr", 0.0),
        ("fedavg", "server_lr", -1.0),
        ("fedavg", "server_lr", math.nan),
        ("fedavg", "server_lr", math.inf),
        ("fedavgm", "momentum", 1.0),
        ("fedavgm", "momentum", -0.1),
        ("fedadam", "beta1", 1.0),
        ("fedadam", "beta2", -0.1),
        ("fedyogi", "beta2", -0.1),
        ("fedyogi", "beta2", 1.0),
        ("fedadam", "tau", 0.0),
        ("fedadagrad", "tau", 0.0),
        ("fedyogi", "tau", -1e-3),
        ("fedadagrad", "server_lr", 0.0),
        ("fedprox", "mu", -1.0),
        ("fedprox", "mu", math.inf),
        ("fedprox", "server_lr", 0.0),
    ],
)
def test_bad_option_value_is_a_config_error_naming_it(
    name: str, option: str, value: float
) -> None:
    with pytest.raises(ConfigError, match=rf"strategy '{name}': {option} must be"):
        build_strategy(name, {option: value})


def test_non_numeric_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'fedavg'"):
        build_strategy("fedavg", {"server_lr": "fast"})  # type: ignore[dict-item]


def test_momentum_zero_is_plain_fedavg(params: Params) -> None:
    m0 = build_strategy("fedavgm", {"momentum": 0.0})
    avg = build_strategy("fedavg")
    agg = aggregate(avg, params, (delta_of(1.0), 1.0))
    assert_params_equal(m0.apply(m0.init(params), agg).params,
                        avg.apply(avg.init(params), agg).params)


def test_strategy_options_returns_defaults() -> None:
    assert strategy_options("fedavg") == {"server_lr": 1.0}
    assert strategy_options("fedavgm") == {"server_lr": 1.0, "momentum": 0.9}
    assert strategy_options("fedadagrad") == {"server_lr": 0.1, "beta1": 0.0, "tau": 1e-3}
    assert strategy_options("fedadam") == {
        "server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3,
    }
    assert strategy_options("fedyogi") == strategy_options("fedadam")
    assert strategy_options("fedprox") == {"mu": 0.01, "server_lr": 1.0}
    robust = {"f": 0.0, "server_lr": 1.0, "bucket": 1.0, "seed": 0.0}  # mix: a word, in the spec
    assert strategy_options("median") == robust
    assert strategy_options("krum") == strategy_options("bulyan") == strategy_options("median")
    assert strategy_options("trimmed-mean") == {"beta": 0.2, **robust}
    assert strategy_options("multi-krum") == {"m": 0.0, **robust}
    # What the spec sets is no longer an option to set.
    assert strategy_options("median:mix=nnm:f=1") == {"server_lr": 1.0, "bucket": 1.0, "seed": 0.0}
    assert strategy_options("trimmed-mean:0.4:bucket=2") == {"f": 0.0, "server_lr": 1.0, "seed": 0.0}
    # norm-bound's own options, and those of the strategy it wraps.
    assert strategy_options("norm-bound:1") == {"noise": 0.0, "seed": 0.0, "server_lr": 1.0}
    assert strategy_options("norm-bound:1:krum") == {
        "noise": 0.0, "seed": 0.0, "f": 0.0, "server_lr": 1.0, "bucket": 1.0,
    }


@pytest.mark.parametrize("name", CONTRACT_SPECS)
def test_every_default_option_builds(name: str) -> None:
    # Passing each default explicitly is the same as passing nothing.
    assert build_strategy(name, strategy_options(name)) == build_strategy(name)
