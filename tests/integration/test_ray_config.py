"""Ray and auto backend settings: flags, TOML, the Python API, refusals, and --backend auto's rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.cli import main
from fedge.data import load_federated
from fedge.errors import ConfigError
from fedge.sim import backend_choice
from fedge.sim.backend_choice import choose_backend
from fedge.sim.config import SimConfig
from fedge.sim.engine import Simulation, simulate
from fedge.tasks import LogReg, TrainConfig


def test_ray_settings_from_toml_and_flags(tmp_path: Path) -> None:
    from fedge.cli import _build_config, build_parser

    toml = tmp_path / "sim.toml"
    toml.write_text('backend = "ray"\nray-address = "10.0.0.5:6379"\nray_cpus_per_device = 0.5\n'
                    'ray_on_failure = "dropout"\n')
    cfg = _build_config(build_parser().parse_args(["simulate", "--config", str(toml)]))
    assert (cfg.backend, cfg.ray_address, cfg.ray_cpus_per_device, cfg.ray_on_failure) == (
        "ray", "10.0.0.5:6379", 0.5, "dropout")
    cfg = _build_config(build_parser().parse_args(
        ["simulate", "--config", str(toml), "--ray-address", "auto", "--ray-cpus-per-device", "2"]))
    assert (cfg.ray_address, cfg.ray_cpus_per_device) == ("auto", 2.0)


def test_api_defaults() -> None:
    cfg = SimConfig(backend="ray")
    assert (cfg.ray_address, cfg.ray_cpus_per_device, cfg.ray_on_failure) == (None, 1.0, "retry")
    assert SimConfig(backend="ray", ray_address="[::1]:6379").ray_address == "[::1]:6379"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"ray_address": "auto"}, "--ray-address needs --backend ray (or auto), not --backend inline"),
        ({"backend": "processes", "ray_address": "h:1"}, "not --backend processes"),
        ({"backend": "ray", "ray_address": ""}, "must be 'auto' or HOST:PORT, got ''"),
        ({"backend": "ray", "ray_address": "headnode"}, "got 'headnode'"),
        ({"backend": "ray", "ray_address": "h:0"}, "got 'h:0'"),
        ({"backend": "ray", "ray_address": "h:70000"}, "got 'h:70000'"),
        ({"backend": "ray", "ray_address": "ray://h:10001"}, "got 'ray://h:10001'"),
        ({"backend": "ray", "ray_address": ":6379"}, "got ':6379'"),
        ({"backend": "ray", "ray_cpus_per_device": 0}, "--ray-cpus-per-device must be a number in (0, 1024]"),
        ({"backend": "ray", "ray_cpus_per_device": -1}, "got -1.0"),
        ({"backend": "ray", "ray_cpus_per_device": float("nan")}, "got nan"),
        ({"backend": "ray", "ray_cpus_per_device": 4096}, "got 4096.0"),
        ({"backend": "ray", "ray_on_failure": "ignore"}, "--ray-on-failure must be one of retry, dropout"),
        ({"backend": "ray", "ray_cpus_per_device": "1"}, "ray_cpus_per_device must be float"),
        ({"backend": "ray", "ray_address": 6379}, "ray_address must be str"),
    ],
)
def test_config_refuses_bad_ray_settings(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        SimConfig(**settings)  # type: ignore[arg-type]
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ray-address", "auto"], "--ray-address needs --backend ray"),
        (["--backend", "ray", "--ray-cpus-per-device", "0"], "--ray-cpus-per-device must be"),
        (["--backend", "ray", "--ray-cpus-per-device", "lots"], "expected a number, got 'lots'"),
        (["--backend", "ray", "--ray-on-failure", "shrug"], "invalid choice: 'shrug'"),
        (["--backend", "gpu"], "invalid choice: 'gpu'"),
        (["--data", "synthetic:1,1,0"], "DEVICES must be an integer between 1 and 1,000,000"),
    ],
)
def test_cli_refuses_bad_ray_flags(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        code = main(["simulate", *argv, "--no-plot", "--quiet", "--out", str(tmp_path / "o")])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1 or "usage:" in err


def test_auto_picks_inline_for_a_small_run() -> None:
    result = simulate(rounds=2, backend="auto")
    assert result.summary()["backend"]["name"] == "inline"
    assert result.config.backend == "auto"


def test_auto_with_an_address_is_ray() -> None:
    fed = load_federated("digits", partition=None, num_devices=4, seed=0)
    cfg = SimConfig(backend="auto", ray_address="auto")
    train = TrainConfig(local_epochs=1, batch_size=32, lr=0.1, mu=0.0)
    choice = choose_backend(cfg, fed, LogReg(fed.spec), train)
    assert choice.backend == "ray"


def test_auto_rule_weighs_estimated_training_against_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    fed = load_federated("digits", partition=None, num_devices=20, seed=0)
    task, train = LogReg(fed.spec), TrainConfig(local_epochs=1, batch_size=32, lr=0.1, mu=0.0)
    monkeypatch.setattr(backend_choice, "_usable_cores", lambda: 2)
    one = choose_backend(SimConfig(backend="auto", rounds=1), fed, task, train)
    assert one.backend == "inline" and one.estimated_train_s is not None and one.estimated_train_s > 0
    # The estimate is one real train call scaled to the run's device-rounds.
    ten = choose_backend(SimConfig(backend="auto", rounds=10), fed, task, train)
    assert ten.estimated_train_s is not None and 3 < ten.estimated_train_s / one.estimated_train_s < 30
    shipped = sum(d.x.nbytes + d.y.nbytes for d in fed.devices) / backend_choice.PROCESS_SHIP_BYTES_PER_S
    cost = backend_choice.PROCESS_START_S + 10 * backend_choice.PROCESS_ROUND_S + shipped
    # With 2 workers the saving is half the estimate; processes needs it >= 2x the cost.
    for estimate, expected in ((4 * cost * 0.99, "inline"), (4 * cost * 1.01, "processes")):
        monkeypatch.setattr(backend_choice, "_estimate_inline_train_s", lambda *a, e=estimate: e)
        got = choose_backend(SimConfig(backend="auto", rounds=10), fed, task, train)
        assert got.backend == expected, got.reason
    monkeypatch.setattr(backend_choice, "_usable_cores", lambda: 1)
    assert choose_backend(SimConfig(backend="auto", rounds=10), fed, task, train).backend == "inline"


def test_simulation_records_auto_choice() -> None:
    sim = Simulation(SimConfig(backend="auto", rounds=1, workers=1))
    assert sim.backend_choice.backend == "inline"
    assert "1 worker" in sim.backend_choice.reason
