"""What the deployment files rely on: the agent healthcheck, the admin token put in place with the
CA's files (a Kubernetes Secret, a restored backup), and per-device data files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.state import StateLock
from fedge.coordinator.identity import Identity, init_ca, tls_files
from fedge.data.export import write_split
from fedge.errors import ConfigError
from fedge.healthcheck import check_agent, check_coordinator
from fedge.store import Store


def test_agent_healthcheck_follows_the_agents_lock(tmp_path: Path) -> None:
    state = tmp_path / "state"
    healthy, why = check_agent(state)
    assert not healthy and "agent.lock is missing" in why
    lock = StateLock(state)
    try:
        assert check_agent(state) == (True, f"an agent holds {state}")
    finally:
        lock.release()
    healthy, why = check_agent(state)
    assert not healthy and "no agent is running" in why


def test_coordinator_healthcheck_without_a_ca_or_a_listener(tmp_path: Path) -> None:
    healthy, why = check_coordinator(host="127.0.0.1", port=1, insecure=False, ca_file=tmp_path / "ca.crt")
    assert not healthy and "no CA certificate" in why
    healthy, why = check_coordinator(host="0.0.0.0", port=1, insecure=True, ca_file=None, timeout_s=2)
    assert not healthy and "http://127.0.0.1:1/healthz" in why


def _adopted_world(tmp_path: Path) -> tuple[Path, str]:
    """A CA made in one folder, then its files copied to a new data directory with a new store."""
    made = tmp_path / "made"
    _, token = init_ca(made)
    target = tmp_path / "target"
    (target / "ca").mkdir(parents=True)
    shutil.copy2(made / "ca" / "ca.crt", target / "ca" / "ca.crt")
    shutil.copy2(made / "ca" / "ca.key", target / "ca" / "ca.key")
    shutil.copy2(made / "admin.token", target / "admin.token")
    return target, token


def test_an_admin_token_file_put_in_place_is_adopted(tmp_path: Path) -> None:
    target, token = _adopted_world(tmp_path)
    with Store(target) as store:
        assert store.admin_token_hash() is None
        identity = Identity(target, store)
        identity.check_admin(f"Bearer {token}")
    # A later start keeps the hash it learnt (and the file stays the operator's copy).
    with Store(target) as store:
        Identity(target, store).check_admin(f"Bearer {token}")


def test_an_admin_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    target, _ = _adopted_world(tmp_path)
    tls_files(target).admin_token.chmod(0o644)
    with Store(target) as store, pytest.raises(ConfigError, match="readable by other users"):
        Identity(target, store)


def test_an_admin_token_file_with_garbage_is_refused(tmp_path: Path) -> None:
    target, _ = _adopted_world(tmp_path)
    tls_files(target).admin_token.write_text("not a token\n")
    with Store(target) as store, pytest.raises(ConfigError, match="does not hold an admin token"):
        Identity(target, store)


def test_data_split_writes_files_the_agent_reads(tmp_path: Path) -> None:
    paths, test = write_split(tmp_path / "d", devices=3, seed=1)
    assert [p.name for p in paths] == ["device-0.npz", "device-1.npz", "device-2.npz"]
    total = 0
    for p in paths:
        with np.load(p) as f:
            assert f["x"].shape[1] == 64 and f["x"].shape[0] == f["y"].shape[0]
            total += f["y"].shape[0]
    with np.load(test) as f:
        total += f["y"].shape[0]
    assert total == 1797  # every digit in exactly one file
    with pytest.raises(ConfigError, match="already holds device data"):
        write_split(tmp_path / "d", devices=3)


@pytest.mark.parametrize(("args", "message"), [
    (["--devices", "0"], "--devices must be >= 1"),
    (["--devices", "2", "--data", "nosuchdata"], "unknown data"),
    (["--devices", "2", "--partition", "dirichlet:-1"], "dirichlet"),
])
def test_data_split_cli_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from fedge.cli import main; sys.exit(main())", "data", "split",
         "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stderr.startswith("fedge: error:"), result.stderr
    assert message in result.stderr


def test_backup_of_a_store_is_a_data_directory_that_resumes(tmp_path: Path) -> None:
    from fedge.backup import backup_data_dir
    from fedge.strategies import ServerState

    data = tmp_path / "data"
    init_ca(data)
    with Store(data) as store:
        for r in (1, 2):
            attempt = store.open_round(r, cohort=["a"], min_updates=1, opened_at=0.0, deadline_at=1.0)
            store.complete_round(r, attempt, ServerState({"w": np.full(3, float(r), np.float32)}, round=r),
                                 closed_at=1.0, reported=["a"], dropped=[], metrics={})
        counts = backup_data_dir(data, tmp_path / "backup")  # while the store is open
    assert counts == {"checkpoints": 2, "files": 3}
    backup = tmp_path / "backup"
    assert (backup / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert backup.stat().st_mode & 0o777 == 0o700
    with Store(backup) as restored:
        assert restored.last_complete_round() == 2
        assert restored.load_checkpoint(2).params["w"].tolist() == [2.0, 2.0, 2.0]
        assert restored.admin_token_hash() is not None


def test_backup_refuses_a_folder_without_a_store_and_an_existing_destination(tmp_path: Path) -> None:
    from fedge.backup import backup_data_dir

    with pytest.raises(ConfigError, match="holds no fedge store"):
        backup_data_dir(tmp_path / "nothing", tmp_path / "out")
    Store(tmp_path / "data").close()
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="exists; a backup goes into a new folder"):
        backup_data_dir(tmp_path / "data", tmp_path / "out")
