"""The lab's derived files: the devices' data (the simulator's partitions), coordinator.toml, a twin run."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedge import cli
from fedge.coordinator.config import load_coordinator_config
from fedge.coordinator.service import Coordinator
from fedge.data import load_federated, load_npz
from fedge.errors import ConfigError
from fedge.lab.data import coordinator_toml, simulate_args, write_device_data
from fedge.lab.spec import COORDINATOR_PORT, LabSpec, load_spec, parse_spec
from fedge.sim.config import SimConfig
from fedge.sim.engine import Simulation

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "deploy" / "lab" / "ci.toml"


def ci() -> dict[str, Any]:
    return tomllib.loads(CI.read_text())


def sim_config(spec: LabSpec) -> SimConfig:
    """What ``fedge simulate ARGS`` runs, through the real command-line parser."""
    config: SimConfig = cli._build_config(cli.build_parser().parse_args(["simulate", *simulate_args(spec)]))
    return config


def test_device_files_are_the_simulator_s_partitions(tmp_path: Path) -> None:
    spec = load_spec(CI)
    files = write_device_data(spec, tmp_path / "data")
    names = [d.name for d in spec.devices()]
    assert list(files.devices) == names
    assert all(files.devices[n] == tmp_path / "data" / f"{n}.npz" for n in names)
    simulation = Simulation(sim_config(spec))  # builds the data exactly as `fedge simulate` does
    for name, share in zip(names, simulation.data.devices, strict=True):
        written = load_npz(files.devices[name])
        np.testing.assert_array_equal(written.x, share.x)
        np.testing.assert_array_equal(written.y, share.y)
        assert files.num_examples[name] == len(share) > 0
    test = load_npz(files.test)
    np.testing.assert_array_equal(test.x, simulation.data.test.x)
    np.testing.assert_array_equal(test.y, simulation.data.test.y)
    assert sum(files.num_examples.values()) + len(test) == 1797  # digits, all of them, once
    assert (files.num_features, files.num_classes) == (64, 10)


def test_another_seed_gives_another_split(tmp_path: Path) -> None:
    data = ci()
    data["lab"]["seed"] = 5
    spec = parse_spec(data, base_dir=CI.parent, name="ci.toml")
    files = write_device_data(spec, tmp_path)
    fed0 = load_federated("digits", partition="dirichlet:0.5", num_devices=4, seed=0)
    fed5 = load_federated("digits", partition="dirichlet:0.5", num_devices=4, seed=5)
    first = load_npz(files.devices["pi-0"])
    np.testing.assert_array_equal(first.y, fed5.devices[0].y)
    assert len(first) != len(fed0.devices[0]) or not np.array_equal(first.y, fed0.devices[0].y)
    args = simulate_args(spec)
    assert args[args.index("--seed") + 1] == "5"


def test_rewriting_replaces_the_files(tmp_path: Path) -> None:
    spec = load_spec(CI)
    first = write_device_data(spec, tmp_path)
    before = first.devices["x86-1"].read_bytes()
    again = write_device_data(spec, tmp_path)
    assert again.devices["x86-1"].read_bytes() == before
    assert not list(tmp_path.glob("*.tmp*"))


def test_simulate_args_carry_the_federation() -> None:
    data = ci()
    data["federation"] = {
        "task": {"name": "mlp:16"},
        "strategy": {"name": "fedadam", "options": {"server_lr": 0.05}},
        "rounds": {"count": 7, "cohort_size": 3, "min_updates": 2, "eval_every": 2},
        "train": {"local_epochs": 2, "batch_size": 16, "lr": 0.05},
        "privacy": {"mode": "central", "clip_norm": 1.5, "noise_multiplier": 0.3, "delta": 1e-6},
    }
    data["fault"] = []
    spec = parse_spec(data, base_dir=CI.parent, name="ci.toml")
    c = sim_config(spec)
    assert (c.task, c.strategy, dict(c.strategy_options)) == ("mlp:16", "fedadam", {"server_lr": 0.05})
    assert (c.rounds, c.cohort, c.devices, c.eval_every) == (7, 3, 4, 2)
    assert (c.local_epochs, c.batch_size, c.lr) == (2, 16, 0.05)
    assert c.clip_norm is not None and float(c.clip_norm) == 1.5  # the flag's text; SimConfig parses it
    assert (c.dp, c.noise_multiplier, c.delta) == ("central", 0.3, 1e-6)
    assert (c.data, c.partition, c.seed, c.secagg) == ("digits", "dirichlet:0.5", 0, False)


def test_simulate_args_with_secure_aggregation() -> None:
    c = sim_config(load_spec(CI))
    assert c.secagg and c.secagg_clip == 1.0 and (c.rounds, c.cohort, c.devices) == (5, 4, 4)


def test_simulate_args_refuse_a_test_fraction_the_simulator_cannot_hold_out() -> None:
    data = ci()
    data["data"]["test_fraction"] = 0.3
    spec = parse_spec(data, base_dir=CI.parent, name="ci.toml")
    with pytest.raises(ConfigError, match=r"data\.test_fraction: fedge simulate holds out 0\.2"):
        simulate_args(spec)


def test_synthetic_data_matches_the_simulator_too(tmp_path: Path) -> None:
    data = ci()
    data["data"] = {"source": "synthetic:0.5,0.5,4"}
    spec = parse_spec(data, base_dir=CI.parent, name="ci.toml")
    args = simulate_args(spec)
    assert "--partition" not in args and "--devices" not in args
    files = write_device_data(spec, tmp_path)
    simulation = Simulation(sim_config(spec))
    for d, share in zip(spec.devices(), simulation.data.devices, strict=True):
        np.testing.assert_array_equal(load_npz(files.devices[d.name]).y, share.y)


def test_fedge_simulate_runs_with_the_args(tmp_path: Path) -> None:
    spec = load_spec(CI)
    done = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", *simulate_args(spec),
                           "--out", str(tmp_path), "--no-plot", "--quiet"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["rounds_complete"], summary["devices"], summary["examples"]) == (5, 4, 1438)
    assert 0.5 < summary["accuracy"] <= 1.0


def test_coordinator_toml_is_what_the_coordinator_runs(tmp_path: Path) -> None:
    data = ci()
    data["federation"]["server"] = {"seed": 11}
    spec = parse_spec(data, base_dir=CI.parent, name="ci.toml")
    files = write_device_data(spec, tmp_path / "data")
    path = tmp_path / "coordinator.toml"
    path.write_text(coordinator_toml(spec, data_dir=tmp_path / "store", eval_data=files.test))
    config = load_coordinator_config(path)
    assert (config.host, config.port, config.seed) == ("10.213.0.1", COORDINATOR_PORT, 11)
    assert (config.data_dir, config.eval_data) == (str(tmp_path / "store"), str(files.test))
    assert (config.rounds, config.cohort_size, config.secagg) == (5, 4, True)
    coordinator = Coordinator(config)  # reads the test split for the task's shape, opens the store
    try:
        assert (coordinator.spec.num_features, coordinator.spec.num_classes) == (64, 10)
    finally:
        coordinator.close()


def test_coordinator_toml_quotes_keys_and_strings(tmp_path: Path) -> None:
    data = ci()
    data["federation"]["strategy"] = {"name": "fedavgm", "options": {"momentum": 0.9}}
    spec = parse_spec(data, base_dir=CI.parent, name="ci.toml")
    odd = tmp_path / 'we"ird dir'
    text = coordinator_toml(spec, data_dir=odd, eval_data=odd / "t.npz", port=9000)
    parsed = tomllib.loads(text)
    assert parsed["server"] == {"host": "10.213.0.1", "port": 9000, "data_dir": str(odd), "seed": 0}
    assert parsed["strategy"] == {"name": "fedavgm", "options": {"momentum": 0.9}}
    assert parsed["task"] == {"name": "logreg", "eval_data": str(odd / "t.npz")}
