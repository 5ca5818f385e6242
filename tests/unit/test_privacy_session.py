"""fedge.privacy.session: settings, the budget, the release, the ledger and its restore."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedge.errors import ConfigError, PrivacyBudgetError
from fedge.privacy.accounting import epsilon_for
from fedge.privacy.distributed import DistributedGrid, effective_noise_multiplier
from fedge.privacy.session import PrivacyConfig, PrivacySession
from fedge.strategies.base import Aggregate


def session(**kwargs: object) -> PrivacySession:
    settings: dict[str, object] = dict(noise_multiplier=1.0, clip_norm=1.0)
    settings.update(kwargs.pop("settings", {}))  # type: ignore[call-overload]
    args: dict[str, object] = dict(sampling="poisson", sample_rate=0.1, expected_reports=10.0,
                                   planned_rounds=10, seed=0)
    args.update(kwargs)
    return PrivacySession(PrivacyConfig(**settings), **args)  # type: ignore[arg-type]


def test_the_budget_refuses_the_round_that_would_exceed_it() -> None:
    per_round = [epsilon_for(noise_multiplier=1.0, sample_rate=0.1, rounds=t, delta=1e-5)
                 for t in range(1, 6)]
    budget = (per_round[2] + per_round[3]) / 2  # three rounds fit, a fourth does not
    s = session(settings=dict(budget=budget))
    for r in (1, 2, 3):
        s.check_budget()
        entry = s.charge(r)
        assert entry.epsilon == pytest.approx(per_round[r - 1])
    with pytest.raises(PrivacyBudgetError, match="one more round would make it") as info:
        s.check_budget()
    assert info.value.spent == pytest.approx(per_round[2])
    assert info.value.would_be == pytest.approx(per_round[3])
    assert info.value.budget == budget


def test_a_restored_ledger_keeps_the_refusal() -> None:
    spent = epsilon_for(noise_multiplier=1.0, sample_rate=0.1, rounds=2, delta=1e-5)
    s = session(settings=dict(budget=spent))
    s.charge(1)
    s.charge(2)
    fresh = session(settings=dict(budget=s.config.budget))
    fresh.check_budget()  # nothing spent yet
    fresh.restore(s.ledger)
    assert fresh.epsilon == s.epsilon
    with pytest.raises(PrivacyBudgetError):
        fresh.check_budget()


def test_restore_refuses_another_delta() -> None:
    s = session()
    s.charge(1)
    other = session(settings=dict(delta=1e-6))
    with pytest.raises(ConfigError, match="delta"):
        other.restore(s.ledger)


def test_target_epsilon_is_calibrated_and_is_the_default_budget() -> None:
    s = session(settings=dict(noise_multiplier=None, target_epsilon=3.0), planned_rounds=50)
    assert s.config.effective_budget == 3.0
    for r in range(1, 51):
        s.check_budget()
        s.charge(r)
    assert 2.95 < s.epsilon <= 3.0
    with pytest.raises(PrivacyBudgetError):
        s.check_budget()


def test_central_release_adds_noise_of_z_c_over_the_fixed_denominator() -> None:
    s = session(settings=dict(noise_multiplier=2.0, clip_norm=0.5), expected_reports=4.0)
    # Three weight-1 updates whose mean is 1: the sum is 3.
    agg = Aggregate(delta={"w": np.ones(200_000)}, total_weight=3.0, count=3)
    s.device_privacy()
    out = s.release(1, agg, unclipped=3)
    assert np.mean(out.delta["w"]) == pytest.approx(3 / 4, abs=0.01)
    assert np.std(out.delta["w"]) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)


def test_local_release_adds_nothing_more_and_accounts_as_local() -> None:
    s = session(settings=dict(mode="local"), expected_reports=4.0)
    assert s.device_privacy().local_stddev == 1.0
    out = s.release(1, Aggregate(delta={"w": np.ones(5)}, total_weight=2.0, count=2), unclipped=0)
    np.testing.assert_allclose(out.delta["w"], np.full(5, 0.5))
    assert s.charge(1).sampling == "local"


def test_adaptive_session_moves_the_clip_and_uses_the_corrected_multiplier() -> None:
    s = session(settings=dict(clip_norm="adaptive"), expected_reports=100.0)
    assert s.clip_norm == 0.1
    assert s.update_noise_multiplier > s.noise_multiplier
    s.device_privacy()
    s.release(1, Aggregate(delta={"w": np.zeros(3)}, total_weight=100.0, count=100), unclipped=100)
    entry = s.charge(1)
    assert entry.clip_norm == 0.1 and entry.next_clip_norm < 0.1  # every update was under: it shrinks
    second = s.charge(2)  # a round with no update: the clip stays
    assert second.clip_norm == second.next_clip_norm == entry.next_clip_norm


def test_distributed_needs_the_secure_aggregation_grid() -> None:
    with pytest.raises(ConfigError, match="needs secure aggregation"):
        session(settings=dict(mode="distributed"))
    with pytest.raises(ConfigError, match="grid was given for --dp central"):
        session(grid=DistributedGrid(value_range=1.0, dim=10, max_cohort=10))
    with pytest.raises(ConfigError, match="noise shares are for --dp distributed"):
        session().noise_share_stddev(5)


def test_distributed_charges_the_effective_multiplier_of_the_docs_formula() -> None:
    """docs/privacy.md: the accountant charges z / (1 + s sqrt(d) / C), every round."""
    grid = DistributedGrid(value_range=1.0, dim=5_000, max_cohort=40, bits=14)
    s = session(settings=dict(mode="distributed", noise_multiplier=1.3), grid=grid)
    plan = s.distributed
    assert plan is not None and plan.bits == 14 and plan.noise_multiplier == 1.3
    z_eff = effective_noise_multiplier(noise_multiplier=1.3, clip_norm=1.0, scale=plan.step,
                                       dim=5_000, min_contributors=7)
    assert s.noise_multiplier == pytest.approx(z_eff) == pytest.approx(
        1.3 / (1 + plan.step * math.sqrt(5_000)))
    for r in range(1, 11):
        s.check_budget()
        entry = s.charge(r)
    want = epsilon_for(noise_multiplier=z_eff, sample_rate=0.1, rounds=10, delta=1e-5)
    assert entry.epsilon == pytest.approx(want, rel=1e-9)
    assert entry.noise_multiplier == pytest.approx(z_eff)
    # Each device's share: the nominal multiplier split over the contributors.
    assert s.noise_share_stddev(13) == pytest.approx(1.3 * 1.0 / math.sqrt(13))
    summary = s.summary()
    assert summary["device_noise_multiplier"] == 1.3 and summary["grid_bits"] == 14
    assert summary["sensitivity_inflation"] == pytest.approx(1.3 / z_eff)


def test_distributed_target_epsilon_calibrates_what_is_charged() -> None:
    grid = DistributedGrid(value_range=1.0, dim=5_000, max_cohort=40, bits=14)
    s = session(settings=dict(mode="distributed", noise_multiplier=None, target_epsilon=2.0),
                grid=grid)
    central = session(settings=dict(noise_multiplier=None, target_epsilon=2.0))
    assert s.noise_multiplier == central.noise_multiplier  # the same accounting target
    assert s.distributed is not None
    assert s.distributed.noise_multiplier > s.noise_multiplier  # devices add the inflation on top
    for r in range(1, 11):
        s.check_budget()
        s.charge(r)
    assert s.epsilon <= 2.0
    with pytest.raises(PrivacyBudgetError):
        s.check_budget()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(mode="shuffle"), "must be one of"),
        (dict(clip_norm="auto"), "clip-norm"),
        (dict(clip_norm=0.0), "clip-norm"),
        (dict(clip_norm=math.inf), "clip-norm"),
        (dict(clip_norm=True), "clip-norm"),
        (dict(noise_multiplier=None), "exactly one"),
        (dict(target_epsilon=1.0), "exactly one"),
        (dict(noise_multiplier=0.0), "noise-multiplier"),
        (dict(noise_multiplier=None, target_epsilon=-1.0), "target-epsilon"),
        (dict(budget=math.nan), "epsilon-budget"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(accountant="moments"), "accountant"),
        (dict(mode="local", clip_norm="adaptive"), "adaptive needs --dp central"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, object], message: str) -> None:
    args: dict[str, object] = dict(noise_multiplier=1.0)
    args.update(settings)
    with pytest.raises(ConfigError, match=message):
        PrivacyConfig(**args)  # type: ignore[arg-type]


def test_a_numeric_clip_string_is_a_number() -> None:
    assert PrivacyConfig(noise_multiplier=1.0, clip_norm="0.5").clip_norm == 0.5


def test_a_non_positive_expected_cohort_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected cohort"):
        session(expected_reports=0.0)
