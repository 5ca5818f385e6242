"""DP in the simulator and the CLI: epsilon per round, summary, the budget, every bad flag."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.errors import ConfigError
from fedge.privacy.accounting import Accountant, RoundEvent, epsilon_for
from fedge.sim.config import SimConfig
from fedge.sim.engine import simulate

FAST: dict[str, object] = dict(rounds=6, devices=40, eval_every=1)


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_central_dp_with_poisson_sampling_reports_epsilon_every_round() -> None:
    result = simulate(**FAST, sample_rate=0.25, dp="central", noise_multiplier=1.0, clip_norm=0.5)  # type: ignore[arg-type]
    expected = [epsilon_for(noise_multiplier=1.0, sample_rate=0.25, rounds=t, delta=1e-5)
                for t in range(1, 7)]
    assert [r.epsilon for r in result.history] == pytest.approx(expected, rel=1e-9)
    assert {r.clip_norm for r in result.history} == {0.5}
    summary = result.summary()
    assert summary["epsilon"] == pytest.approx(expected[-1]) and summary["delta"] == 1e-5
    assert summary["privacy"]["sampling"] == "poisson" and summary["stopped"] is None
    assert summary["accuracy"] is not None


def test_dp_runs_are_reproducible_for_a_seed_and_noise_changes_the_model() -> None:
    args: dict[str, object] = dict(FAST, sample_rate=0.5, dp="central", noise_multiplier=0.5)
    a = simulate(**args)  # type: ignore[arg-type]
    b = simulate(**args)  # type: ignore[arg-type]
    c = simulate(**dict(args, noise_multiplier=5.0))  # type: ignore[arg-type]
    assert a.metrics == b.metrics
    assert a.metrics != c.metrics


def test_fixed_cohorts_and_full_participation_use_their_own_assumption() -> None:
    fixed = simulate(**FAST, cohort=10, dp="central", noise_multiplier=2.0)  # type: ignore[arg-type]
    assert fixed.privacy is not None and fixed.privacy["sampling"] == "fixed"
    event = RoundEvent(2.0, sampling="fixed", population=40, cohort=10)
    assert fixed.privacy["epsilon"] == pytest.approx(Accountant(delta=1e-5).epsilon([event] * 6))
    full = simulate(**FAST, dp="central", noise_multiplier=2.0)  # type: ignore[arg-type]
    assert full.privacy is not None and full.privacy["sampling"] == "full"


def test_the_budget_stops_the_simulation_before_the_round_that_would_exceed_it() -> None:
    budget = epsilon_for(noise_multiplier=1.0, sample_rate=0.25, rounds=3, delta=1e-5) * 1.01
    result = simulate(**FAST, sample_rate=0.25, dp="central", noise_multiplier=1.0,  # type: ignore[arg-type]
                      epsilon_budget=budget)
    assert len(result.history) == 3
    assert result.stopped is not None and "stopped before round 4" in result.stopped
    assert result.history[-1].metrics is not None  # the final model is evaluated
    assert result.summary()["epsilon"] <= budget


def test_target_epsilon_calibrates_for_the_planned_rounds() -> None:
    result = simulate(**FAST, sample_rate=0.25, dp="central", target_epsilon=4.0)  # type: ignore[arg-type]
    assert result.stopped is None and len(result.history) == 6
    assert 3.9 < result.privacy["epsilon"] <= 4.0  # type: ignore[index]


def test_local_and_adaptive() -> None:
    local = simulate(**FAST, cohort=10, dp="local", noise_multiplier=1.0)  # type: ignore[arg-type]
    assert local.privacy is not None and local.privacy["sampling"] == "local"
    adaptive = simulate(**dict(FAST, devices=200, rounds=5), sample_rate=0.5, dp="central",  # type: ignore[arg-type]
                        noise_multiplier=1.0, clip_norm="adaptive")
    clips = [r.clip_norm for r in adaptive.history]
    assert clips[0] == 0.1 and len(set(clips)) > 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(clip_norm=1.0), "--clip-norm need --dp"),
        (dict(noise_multiplier=1.0, delta=1e-5), "--noise-multiplier, --delta need --dp"),
        (dict(dp="central"), "exactly one of --noise-multiplier and --target-epsilon"),
        (dict(dp="central", noise_multiplier=1.0, target_epsilon=2.0), "exactly one"),
        (dict(dp="central", noise_multiplier=1.0, clip_norm="tight"), "--clip-norm must be"),
        (dict(dp="central", noise_multiplier=1.0, delta=2.0), "--delta must be"),
        (dict(dp="central", noise_multiplier=1.0, epsilon_budget=-3.0), "--epsilon-budget must be"),
        (dict(dp="central", noise_multiplier=1.0, accountant="gdp"), "--accountant must be"),
        (dict(dp="secret", noise_multiplier=1.0), "--dp must be one of"),
    ],
)
def test_bad_dp_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**settings)  # type: ignore[arg-type]


def test_distributed_is_refused_without_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="--dp distributed needs secure aggregation"):
        simulate(**FAST, dp="distributed", noise_multiplier=1.0)  # type: ignore[arg-type]


def test_a_target_no_noise_reaches_is_refused() -> None:
    with pytest.raises(ConfigError, match="no noise multiplier"):
        simulate(**FAST, dp="central", target_epsilon=1e-6)  # type: ignore[arg-type]


def test_cli_simulate_with_dp_writes_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = fedge("simulate", "--rounds", "3", "--devices", "30", "--sample-rate", "0.3", "--dp", "central",
              "--noise-multiplier", "1.0", "--clip-norm", "0.5", "--out", str(out), "--no-plot", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "epsilon" in r.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert all(a["epsilon"] < b["epsilon"] for a, b in itertools.pairwise(lines))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(lines[-1]["epsilon"]) and summary["delta"] == 1e-5
    assert summary["config"]["dp"] == "central"


def test_cli_simulate_says_why_it_stopped(tmp_path: Path) -> None:
    r = fedge("simulate", "--rounds", "5", "--devices", "30", "--dp", "central", "--noise-multiplier", "1",
              "--epsilon-budget", "1", "--out", str(tmp_path / "run"), "--no-plot", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "privacy budget reached" in r.stderr and "stopped before round 1" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--dp", "distributed", "--noise-multiplier", "1"], "needs secure aggregation"),
        (["simulate", "--clip-norm", "1"], "need --dp"),
        (["simulate", "--dp", "central", "--noise-multiplier", "1", "--target-epsilon", "2"], "not allowed"),
        (["simulate", "--dp", "central", "--noise-multiplier", "x"], "expected a number"),
    ],
)
def test_cli_refuses_bad_dp_flags(args: list[str], message: str) -> None:
    r = fedge(*args, "--no-plot", "--quiet")
    assert r.returncode == 2
    assert message in r.stderr


def test_cli_privacy_epsilon_and_calibrate() -> None:
    r = fedge("privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--rounds", "1000",
              "--delta", "1e-5")
    assert r.returncode == 0, r.stderr
    eps = float(r.stdout.split()[1])
    assert eps == pytest.approx(2.10, rel=0.01)
    r = fedge("privacy", "calibrate", "--target-epsilon", "2.1", "--sample-rate", "0.01", "--rounds", "1000",
              "--delta", "1e-5")
    assert r.returncode == 0, r.stderr
    z = float(r.stdout.split()[2])
    assert z == pytest.approx(1.0, rel=0.01)
    assert epsilon_for(noise_multiplier=z, sample_rate=0.01, rounds=1000, delta=1e-5) <= 2.1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["epsilon", "--noise-multiplier", "0", "--sample-rate", "0.1", "--rounds", "5", "--delta", "1e-5"],
         "noise multiplier must be"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "2", "--rounds", "5", "--delta", "1e-5"],
         "sample rate must be"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "0", "--delta", "1e-5"],
         "rounds must be"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--rounds", "5", "--delta", "0"],
         "delta must be"),
        (["epsilon", "--sample-rate", "0.1", "--rounds", "5", "--delta", "1e-5"], "required"),
        (["calibrate", "--target-epsilon", "-1", "--sample-rate", "0.1", "--rounds", "5", "--delta", "1e-5"],
         "target epsilon must be"),
        (["calibrate", "--target-epsilon", "1e-9", "--sample-rate", "0.1", "--rounds", "5",
          "--delta", "1e-5"],
         "no noise multiplier"),
        (["calibrate", "--target-epsilon", "1", "--sample-rate", "0.1", "--rounds", "5", "--delta", "1e-5",
          "--accountant", "gdp"], "invalid choice"),
    ],
)
def test_cli_privacy_refuses_bad_arguments(args: list[str], message: str) -> None:
    r = fedge("privacy", *args)
    assert r.returncode == 2, r.stdout
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_nan_noise_multiplier_is_refused() -> None:
    with pytest.raises(ConfigError, match="noise-multiplier"):
        SimConfig(dp="central", noise_multiplier=math.nan)


class _KeepsEveryUpdate:
    """Stands for a robust rule (median, Krum): its accumulator keeps each update."""

    needs_every_update = True


def test_dp_refuses_strategies_that_keep_every_update() -> None:
    from fedge.coordinator import service
    from fedge.coordinator.config import CoordinatorConfig
    from fedge.sim import engine

    config = SimConfig(dp="central", noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="needs a strategy that sums updates"):
        engine._privacy_of(config, 20, _KeepsEveryUpdate())  # type: ignore[arg-type]
    federation = CoordinatorConfig(num_features=4, num_classes=3, dp="central", noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="needs a strategy that sums updates"):
        service._privacy_of(federation, _KeepsEveryUpdate())  # type: ignore[arg-type]
