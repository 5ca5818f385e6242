"""Robust aggregation and simulated attacks in the simulator, the CLI and the coordinator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_coordinator_app import Clock, Fleet, delta_like, make_config, wait_until

from fedge.cli import main
from fedge.coordinator.app import create_app
from fedge.coordinator.config import load_coordinator_config
from fedge.coordinator.service import Coordinator
from fedge.errors import ConfigError
from fedge.sim import SimConfig, Simulation, simulate
from fedge.wire import encode_update

ATTACKED = {"attack": "sign-flip:10", "malicious": 0.2}


# --- the simulator ------------------------------------------------------------------------


def test_sign_flipping_devices_break_fedavg_not_the_robust_rules() -> None:
    clean = simulate(rounds=8).metrics["accuracy"]
    assert clean > 0.85
    assert simulate(rounds=8, **ATTACKED).metrics["accuracy"] < 0.3
    for rule in ("trimmed-mean", "median", "multi-krum"):
        assert simulate(rounds=8, strategy=rule, **ATTACKED).metrics["accuracy"] > clean - 0.08, rule


def test_a_run_says_which_devices_were_malicious() -> None:
    sim = Simulation(SimConfig(rounds=2, strategy="krum", cohort=10, **ATTACKED))
    result = sim.run()
    summary = result.summary()
    attack = summary["attack"]
    assert attack["attack"] == "sign-flip:10" and attack["malicious_fraction"] == 0.2
    assert attack["malicious_devices"] == 4 and len(attack["malicious_ids"]) == 4
    assert attack["strategy_f"] == 2  # 4 of 20 devices, 10 a round: 2 on average
    assert sorted(sim.attack.malicious) == attack["malicious_ids"]  # type: ignore[union-attr]
    for record in result.history:
        row = record.to_json()
        assert 0 <= row["malicious"] <= 4
    # Unattacked runs keep their old shape.
    plain = simulate(rounds=1)
    assert "attack" not in plain.summary() and "malicious" not in plain.history[0].to_json()


def test_attacks_run_the_same_on_both_backends() -> None:
    cfg = SimConfig(rounds=3, strategy="median", attack="gaussian:0.5", malicious=0.25, seed=3)
    inline = simulate(cfg)
    procs = simulate(cfg.replace(backend="processes", workers=2))
    for k in inline.params:
        np.testing.assert_allclose(inline.params[k], procs.params[k], rtol=1e-5, atol=1e-6)
    assert [r.malicious for r in inline.history] == [r.malicious for r in procs.history] == [5, 5, 5]


@pytest.mark.parametrize("strategy", ["median:mix=nnm", "trimmed-mean:0.4:bucket=2"])
def test_mixing_runs_the_same_on_both_backends(strategy: str) -> None:
    # The processes backend merges partial stacks in another order: nearest-neighbour
    # mixing does not depend on it, and the bucketing shuffle is keyed by the updates.
    cfg = SimConfig(rounds=3, strategy=strategy, seed=2, **ATTACKED)
    inline = simulate(cfg)
    procs = simulate(cfg.replace(backend="processes", workers=2))
    for k in inline.params:
        np.testing.assert_allclose(inline.params[k], procs.params[k], rtol=1e-5, atol=1e-6)
    assert inline.metrics["accuracy"] == pytest.approx(procs.metrics["accuracy"], abs=2e-3)


def test_nnm_keeps_median_and_trimmed_mean_near_clean_fedavg_under_sign_flips() -> None:
    clean = simulate(rounds=8).metrics["accuracy"]
    for rule in ("median:mix=nnm", "trimmed-mean:mix=nnm"):
        assert simulate(rounds=8, strategy=rule, **ATTACKED).metrics["accuracy"] > clean - 0.03, rule


def test_bucketing_takes_the_run_seed_unless_set() -> None:
    sim = Simulation(SimConfig(strategy="median:bucket=2", seed=5))
    assert sim.strategy.rule.mixing.seed == 5  # type: ignore[attr-defined]
    sim = Simulation(SimConfig(strategy="median:bucket=2:seed=2", seed=5))
    assert sim.strategy.rule.mixing.seed == 2  # type: ignore[attr-defined]


def test_label_flip_poisons_only_the_malicious_devices_data() -> None:
    clean = Simulation(SimConfig(rounds=1))
    sim = Simulation(SimConfig(rounds=1, attack="label-flip", malicious=0.2))
    assert sim.attack is not None
    for d, (a, b) in enumerate(zip(clean.data.devices, sim.data.devices, strict=True)):
        expected = 9 - a.y if d in sim.attack.malicious else a.y
        np.testing.assert_array_equal(b.y, expected)
    np.testing.assert_array_equal(clean.data.test.y, sim.data.test.y)


def test_f_defaults_from_malicious_and_an_explicit_f_wins() -> None:
    assert Simulation(SimConfig(strategy="krum", **ATTACKED)).strategy.f == 4  # type: ignore[attr-defined]
    assert Simulation(SimConfig(strategy="krum")).strategy.f == 0  # type: ignore[attr-defined]
    sim = Simulation(SimConfig(strategy="krum", strategy_options={"f": 1}, **ATTACKED))
    assert sim.strategy.f == 1  # type: ignore[attr-defined]
    wrapped = Simulation(SimConfig(strategy="norm-bound:1:median", **ATTACKED))
    assert wrapped.strategy.inner.f == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # 9 of 20 malicious: Krum needs 2 * 9 + 3 = 21 updates a round.
        ({"strategy": "krum", "attack": "sign-flip:1", "malicious": 0.45}, "n >= 2f \\+ 3.*n=20"),
        ({"strategy": "bulyan", "cohort": 14, **ATTACKED}, "n >= 4f \\+ 3.*at least 15"),
        ({"strategy": "bulyan", "cohort": 10, "strategy_options": {"f": 2}}, "--cohort 10"),
        ({"strategy": "trimmed-mean:0.1", **ATTACKED}, "floor\\(beta \\* n\\) >= f"),
        # 4 malicious of 20 in 10 buckets of 2: the trimmed mean must trim 4 of 10 at each end.
        ({"strategy": "trimmed-mean:bucket=2", **ATTACKED}, "bucket means.*at least 39"),
        ({"strategy": "median:mix=nnm", "cohort": 10, "strategy_options": {"f": 5}},
         "n >= 2f \\+ 1 \\(mix=nnm.*at least 11"),
        ({"strategy": "median", "cohort": 6, "stragglers": 0.5, "drop_stragglers": True,
          "local_epochs": 2, "strategy_options": {"f": 2}}, "less 3 dropped stragglers"),
        ({"attack": "sign-flip:2", "malicious": 0.01}, "makes no device malicious"),
    ],
)
def test_the_f_condition_is_checked_before_round_1(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Simulation(SimConfig(**changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attack": "sign-flip:10"}, "--attack needs --malicious"),
        ({"malicious": 0.2}, "--malicious needs --attack"),
        ({"attack": "sign-flip:10", "malicious": 1.0}, r"--malicious must be a fraction in \[0, 1\)"),
        ({"attack": "sign-flip:10", "malicious": -0.5}, "--malicious must be a fraction"),
        ({"attack": "flip", "malicious": 0.2}, "unknown attack 'flip'"),
        ({"attack": "gaussian:-1", "malicious": 0.2}, "SIGMA must be a positive"),
        ({"attack": 3, "malicious": 0.2}, "attack must be str"),
    ],
)
def test_bad_attack_settings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SimConfig(**changes)  # type: ignore[arg-type]


def test_rounds_too_small_for_the_rule_are_abandoned_not_aggregated() -> None:
    # Poisson sampling at 0.2 of 20 devices invites about 4; Krum with f = 0 needs 3.
    result = simulate(rounds=12, strategy="krum", sample_rate=0.2, seed=1)
    small = [r for r in result.history if r.invited < 3]
    assert small and all(r.state == "abandoned" for r in small)
    assert all(r.state == "complete" for r in result.history if r.invited >= 3)


# --- the command line ---------------------------------------------------------------------


def test_cli_attack_flags_and_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('rounds = 2\nstrategy = "trimmed-mean:0.25"\nattack = "scale:5"\nmalicious = 0.1\n')
    out = tmp_path / "o"
    code = main(["simulate", "--config", str(cfg), "--malicious", "0.2", "--quiet", "--no-plot",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["attack"] == "scale:5" and summary["config"]["malicious"] == 0.2
    assert summary["config"]["strategy"] == "trimmed-mean:0.25"
    assert summary["attack"]["malicious_devices"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["malicious"] for r in rows] == [4, 4]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attack", "sign-flip"], "needs its SCALE"),
        (["--attack", "label-flip", "--malicious", "2"], "--malicious must be a fraction"),
        (["--malicious", "0.3"], "--malicious needs --attack"),
        (["--strategy", "krum", "--attack", "label-flip", "--malicious", "0.45"], "n >= 2f \\+ 3"),
        (["--strategy", "median:2"], "takes no ':ARG'"),
        (["--strategy", "norm-bound"], "needs its bound"),
        (["--strategy", "median:mix=nnm"], "with f = 0 that is every update"),
        (["--strategy", "median:mix=nnm", "--strategy-option", "bucket=2", "--attack", "scale:3",
          "--malicious", "0.1"], "choose one"),
        (["--strategy", "median:bucket=2", "--strategy-option", "bucket=3"], "sets bucket twice"),
    ],
)
def test_cli_refusals_are_one_line_and_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--rounds", "1", "--quiet", "--no-plot", "--out", str(tmp_path), *argv])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("fedge: error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err


# --- the coordinator ------------------------------------------------------------------------


def test_federation_toml_takes_robust_names(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('[task]\nnum_features=4\nnum_classes=3\n'
                    '[strategy]\nname = "trimmed-mean:0.2"\noptions = { f = 2 }\n'
                    '[rounds]\ncohort_size = 10\n')
    config = load_coordinator_config(path)
    assert config.strategy == "trimmed-mean:0.2" and config.strategy_options == {"f": 2.0}


def test_federation_toml_takes_mixing(tmp_path: Path) -> None:
    for name, options in (("median:mix=nnm", "{ f = 2 }"), ("median:bucket=2", "{ f = 2, seed = 9 }"),
                          ("median", "{ f = 2, bucket = 2 }")):
        path = tmp_path / "coordinator.toml"
        path.write_text(f'[task]\nnum_features=4\nnum_classes=3\n[strategy]\nname = "{name}"\n'
                        f'options = {options}\n[rounds]\ncohort_size = 10\n')
        config = load_coordinator_config(path)
        assert config.strategy == name


@pytest.mark.parametrize(
    ("strategy", "rounds", "message"),
    [
        ('name = "trimmed-mean:0.2"\noptions = { f = 2 }', "cohort_size = 9",
         "floor\\(beta \\* n\\) >= f.*n=9"),
        ('name = "krum"\noptions = { f = 2 }', "cohort_size = 8\nmin_updates = 6",
         "rounds.min_updates.*n=6.*at least 7"),
        ('name = "bulyan"\noptions = { f = 1 }', "cohort_size = 7\nmin_devices = 5",
         "rounds.min_devices \\(5\\) must be at least the 7"),
        ('name = "median:3"', "cohort_size = 3", "takes no ':ARG'"),
        ('name = "median:bucket=2"\noptions = { f = 2 }', "cohort_size = 8",
         "bucket means.*n=8.*at least 9"),
        ('name = "median:mix=nnm"', "cohort_size = 3", "with f = 0 that is every update"),
        ('name = "krum"\noptions = { f = -1 }', "cohort_size = 3", "f \\(malicious devices"),
    ],
)
def test_federation_toml_refuses_a_broken_f_condition_at_load(
    tmp_path: Path, strategy: str, rounds: str, message: str
) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(f"[task]\nnum_features=4\nnum_classes=3\n[strategy]\n{strategy}\n[rounds]\n{rounds}\n")
    with pytest.raises(ConfigError, match=message):
        load_coordinator_config(path)


def test_a_coordinator_round_with_the_median_ignores_an_outlier(tmp_path: Path) -> None:
    clock = Clock()
    config = make_config(tmp_path, rounds=1, cohort_size=3, min_updates=3, min_devices=3,
                         strategy="median", strategy_options={"f": 1})
    coordinator = Coordinator(config, clock=clock)
    with TestClient(create_app(coordinator)) as client:
        fleet = Fleet(client, coordinator, clock)
        fleet.check_in("a")
        fleet.check_in("b")
        fleet.plan("c")
        params, _ = fleet.params(1, "a")
        before = {k: v.copy() for k, v in coordinator.state.params.items()}
        for device, value, count in (("a", 0.01, 10), ("b", 0.02, 10), ("c", 1e6, 10_000)):
            body = encode_update(delta_like(params, value), round=1, attempt=1, num_examples=count)
            assert fleet.upload(device, body, 1)[0] == 200
        wait_until(lambda: coordinator.state.round == 1)
        for k, v in before.items():
            np.testing.assert_allclose(coordinator.state.params[k], v + np.float32(0.02), rtol=1e-6)
    coordinator.close()


def test_a_coordinator_round_with_nnm_and_the_median(tmp_path: Path) -> None:
    clock = Clock()
    config = make_config(tmp_path, rounds=1, cohort_size=3, min_updates=3, min_devices=3,
                         strategy="median:mix=nnm", strategy_options={"f": 1})
    coordinator = Coordinator(config, clock=clock)
    with TestClient(create_app(coordinator)) as client:
        fleet = Fleet(client, coordinator, clock)
        fleet.check_in("a")
        fleet.check_in("b")
        fleet.plan("c")
        params, _ = fleet.params(1, "a")
        before = {k: v.copy() for k, v in coordinator.state.params.items()}
        for device, value, count in (("a", 0.01, 10), ("b", 0.02, 10), ("c", 1e6, 10_000)):
            body = encode_update(delta_like(params, value), round=1, attempt=1, num_examples=count)
            assert fleet.upload(device, body, 1)[0] == 200
        wait_until(lambda: coordinator.state.round == 1)
        # Two nearest each: a and b mix to 0.015, c to (1e6 + 0.02) / 2; the median is 0.015.
        for k, v in before.items():
            np.testing.assert_allclose(coordinator.state.params[k], v + np.float32(0.015), rtol=1e-6)
    coordinator.close()


def test_norm_bound_noise_follows_the_run_seed_unless_set() -> None:
    assert Simulation(SimConfig(strategy="norm-bound:1", seed=5)).strategy.seed == 5  # type: ignore[attr-defined]
    sim = Simulation(SimConfig(strategy="norm-bound:1", seed=5, strategy_options={"seed": 2}))
    assert sim.strategy.seed == 2  # type: ignore[attr-defined]
    noisy = SimConfig(rounds=2, strategy="norm-bound:1", strategy_options={"noise": 0.01})
    a, b = simulate(noisy), simulate(noisy)
    c = simulate(noisy.replace(seed=1))
    np.testing.assert_array_equal(a.params["weight"], b.params["weight"])
    assert a.metrics != c.metrics
