"""``fedge device status``: what an operator runs on a device to see why it is (not) training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from fedge.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def _config(tmp_path: Path, policy: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('coordinator = "http://127.0.0.1:9"\ninsecure = true\ndata = "d.npz"\n'
                    f'state_dir = "state"\n[policy]\n{policy}\n')
    return path


def test_status_names_the_reasons_in_text_and_json(tmp_path: Path) -> None:
    config = _config(tmp_path, "min_memory_mb = 100000000\nmax_rounds_per_day = 5")
    text = fedge("device", "status", "--config", str(config))
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("training: not now: memory available")
    assert "rounds today: 0" in text.stdout and "cpu load (others)" in text.stdout
    as_json = fedge("device", "status", "--config", str(config), "--json")
    status = json.loads(as_json.stdout)
    assert status["verdict"]["ok"] is False
    assert status["readings"]["cores"] >= 1 and status["readings"]["memory_available_mb"] > 0
    assert status["readings"]["disk_free_mb"] > 0  # of the nearest existing folder
    assert not (tmp_path / "state").exists()  # a status never creates state


def test_status_of_an_empty_policy_allows_training(tmp_path: Path) -> None:
    result = fedge("device", "status", "--config", str(_config(tmp_path, "")), "--json")
    assert json.loads(result.stdout)["verdict"] == {"ok": True, "reasons": [], "notes": []}


@pytest.mark.parametrize(("policy", "message"), [
    ("max_temperature_c = 500", "max_temperature_c must be between -40 and 150"),
    ("windows = [\"7am-9am\"]", "window '7am-9am' is not HH:MM-HH:MM"),
])
def test_status_refuses_a_bad_policy(tmp_path: Path, policy: str, message: str) -> None:
    result = fedge("device", "status", "--config", str(_config(tmp_path, policy)))
    assert result.returncode == 2 and message in result.stderr
