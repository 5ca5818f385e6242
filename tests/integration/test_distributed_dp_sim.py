"""``fedge simulate --secagg --dp distributed``: noise shares on the grid, accounting, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.errors import ConfigError
from fedge.privacy.accounting import epsilon_for
from fedge.privacy.distributed import effective_noise_multiplier
from fedge.sim.config import SimConfig
from fedge.sim.engine import Simulation, simulate

FAST: dict[str, object] = dict(rounds=4, devices=30, eval_every=1, secagg=True, dp="distributed")


def _max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_distributed_dp_reports_the_effective_epsilon_every_round() -> None:
    result = simulate(**FAST, sample_rate=0.5, noise_multiplier=1.0, clip_norm=0.5)  # type: ignore[arg-type]
    privacy = result.privacy
    assert privacy is not None and privacy["mode"] == "distributed"
    assert privacy["device_noise_multiplier"] == 1.0
    # The accountant charges the nominal multiplier less the grid's rounding inflation.
    z_eff = effective_noise_multiplier(noise_multiplier=1.0, clip_norm=0.5, scale=privacy["grid_step"],
                                       dim=650, min_contributors=1)
    assert privacy["noise_multiplier"] == pytest.approx(z_eff)
    assert 0.999 < z_eff < 1.0
    expected = [epsilon_for(noise_multiplier=z_eff, sample_rate=0.5, rounds=t, delta=1e-5)
                for t in range(1, 5)]
    assert [r.epsilon for r in result.history] == pytest.approx(expected, rel=1e-9)
    assert all(r.state == "complete" for r in result.history)
    summary = result.summary()
    assert summary["epsilon"] == pytest.approx(expected[-1]) and summary["delta"] == 1e-5
    assert summary["privacy"]["grid_bits"] == privacy["grid_bits"] <= 24


def test_distributed_dp_is_reproducible_backend_independent_and_noised() -> None:
    args: dict[str, object] = dict(FAST, noise_multiplier=0.5, clip_norm=0.5)
    a = simulate(**args)  # type: ignore[arg-type]
    b = simulate(**args)  # type: ignore[arg-type]
    procs = simulate(**args, backend="processes", workers=2)  # type: ignore[arg-type]
    louder = simulate(**dict(args, noise_multiplier=5.0))  # type: ignore[arg-type]
    assert _max_abs_diff(a.params, b.params) == 0.0
    # The device side (keys, shares, noise) runs in the workers; integer sums do not care.
    assert _max_abs_diff(a.params, procs.params) == 0.0
    assert _max_abs_diff(a.params, louder.params) > 0.0


def test_the_noise_in_a_round_has_the_planned_scale() -> None:
    """One round, full participation, every update clipped to 0.01: the mean is mostly noise."""
    n, z, clip = 30, 2.0, 0.01
    sim = Simulation(SimConfig(**dict(FAST, rounds=1, noise_multiplier=z, clip_norm=clip,  # type: ignore[arg-type]
                                      dp_min_contributors=n)))
    start = sim.strategy.init(sim.task.init_params(np.random.default_rng([0, 1, 0]))).params
    result = sim.run()
    step = np.concatenate([(result.params[k] - start[k]).ravel() for k in start])
    # step = (sum of clipped updates + N(0, (z C)^2)) / n; the updates' part is at most C / n in norm.
    noise_norm_bound = clip / n
    spread = float(np.std(step))
    assert spread == pytest.approx(z * clip / n, rel=0.15)
    assert np.linalg.norm(step) > 10 * noise_norm_bound


def test_the_budget_stops_a_distributed_run() -> None:
    result = simulate(**dict(FAST, rounds=10), sample_rate=0.5, target_epsilon=3.0)  # type: ignore[arg-type]
    assert result.privacy is not None and result.privacy["epsilon"] <= 3.0
    assert result.privacy["rounds_charged"] == 10 and result.stopped is None
    capped = simulate(**dict(FAST, rounds=10), sample_rate=0.5, noise_multiplier=0.8,  # type: ignore[arg-type]
                      epsilon_budget=3.0)
    assert capped.stopped is not None and "privacy budget reached" in capped.stopped
    assert capped.privacy is not None and capped.privacy["epsilon"] <= 3.0


def test_too_few_contributors_abandon_the_round_and_it_is_still_charged() -> None:
    strict = simulate(**dict(FAST, devices=12, rounds=2), noise_multiplier=1.0,  # type: ignore[arg-type]
                      secagg_dropout={"upload": 0.3}, dp_min_contributors=12)
    assert all(r.state == "abandoned" for r in strict.history)
    assert all(r.epsilon is not None for r in strict.history)
    lenient = simulate(**dict(FAST, devices=12, rounds=4), noise_multiplier=1.0,  # type: ignore[arg-type]
                       secagg_dropout={"upload": 0.3}, dp_min_contributors=7)
    # A round is released exactly when at least 7 noise shares are in its sum.
    assert [r.state == "complete" for r in lenient.history] == [
        r.reported >= 7 for r in lenient.history]
    assert {r.state for r in lenient.history} == {"complete", "abandoned"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(dp="distributed", noise_multiplier=1.0), "--dp distributed needs secure aggregation"),
        (dict(secagg=True, dp="central", noise_multiplier=1.0, dp_min_contributors=5),
         "--dp-min-contributors needs --dp distributed"),
        (dict(secagg=True, dp="distributed", noise_multiplier=1.0, dp_min_contributors=0),
         "--dp-min-contributors must be"),
        (dict(secagg=True, dp="distributed", noise_multiplier=1.0, clip_norm="adaptive"),
         "adaptive needs --dp central"),
    ],
)
def test_bad_distributed_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**settings)  # type: ignore[arg-type]


def test_a_grid_without_room_for_the_noise_is_refused_before_any_round() -> None:
    with pytest.raises(ConfigError, match="wrap"):
        Simulation(SimConfig(**dict(FAST, noise_multiplier=1.0, secagg_bits=32)))  # type: ignore[arg-type]


def test_central_dp_with_secagg_encodes_weight_one_updates_on_a_weight_one_grid() -> None:
    """Under DP every update weighs 1, so the grid's weight range is 1 (no precision lost)."""
    sim = Simulation(SimConfig(rounds=1, devices=12, secagg=True, dp="central", noise_multiplier=0.5))
    assert sim.secagg is not None
    _, jobs, _, grid = sim.secagg.prepare(1, sim.task.init_params(np.random.default_rng(0)), range(12))
    assert grid.max_weight == 1 and len(jobs) == 12
    plain = simulate(rounds=2, devices=12, dp="central", noise_multiplier=0.5)
    secure = simulate(rounds=2, devices=12, secagg=True, dp="central", noise_multiplier=0.5)
    # Each device's rounding moves the noised sum by under a step of the 2^23-level grid.
    assert _max_abs_diff(plain.params, secure.params) <= 2 * 12 * grid.step


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True, text=True,
                          timeout=180, check=False)


def test_cli_distributed_writes_epsilon_and_refuses_without_secagg(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = fedge("simulate", "--rounds", "2", "--devices", "20", "--secagg", "--dp", "distributed",
              "--noise-multiplier", "1", "--clip-norm", "0.5", "--dp-min-contributors", "15",
              "--out", str(out), "--no-plot", "--quiet")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2] and lines[0]["epsilon"] < lines[1]["epsilon"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["mode"] == "distributed" and summary["config"]["dp_min_contributors"] == 15
    for args, message in ((["--dp", "distributed", "--noise-multiplier", "1"], "needs secure aggregation"),
                          (["--dp", "central", "--noise-multiplier", "1", "--dp-min-contributors", "3"],
                           "needs --dp distributed")):
        r = fedge("simulate", *args, "--no-plot", "--quiet")
        assert r.returncode == 2 and message in r.stderr
