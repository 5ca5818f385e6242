"""Tests for fedge.store: the coordinator's SQLite + checkpoint state, restarts and crashes."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from params_asserts import assert_params_equal

from fedge.errors import FedgeError
from fedge.params import Params
from fedge.store import SCHEMA_VERSION, DeviceRow, RoundRow, Store, StoreError
from fedge.strategies.base import ServerState


def make_state(round: int) -> ServerState:
    """A small state with float32 and float64 tensors, a scalar and two optimizer slots."""
    params: Params = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3) + round,
        "layer/b": np.array([0.5, -1.5], dtype=np.float64) * round,
        "scale": np.array(2.0 + round, dtype=np.float32),
    }
    opt_state = {
        "m": {k: np.full_like(v, 0.25 * round) for k, v in params.items()},
        "v": {k: np.full_like(v, 1e-3) for k, v in params.items()},
    }
    return ServerState(params=params, opt_state=opt_state, round=round)


def assert_states_equal(a: ServerState, b: ServerState) -> None:
    assert a.round == b.round
    assert_params_equal(a.params, b.params)
    assert list(a.opt_state) == list(b.opt_state)
    for slot in a.opt_state:
        assert_params_equal(a.opt_state[slot], b.opt_state[slot])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "data") as s:
        yield s


def open_round(store: Store, round: int, cohort: tuple[str, ...] = ("a", "b", "c")) -> int:
    return store.open_round(round, cohort=cohort, min_updates=2, opened_at=100.0, deadline_at=160.0)


def complete(store: Store, round: int, attempt: int, state: ServerState | None = None) -> Path:
    return store.complete_round(
        round, attempt, state or make_state(round), closed_at=150.0, reported=["a", "b"],
        dropped=["c"], metrics={"accuracy": 0.75},
    )


def record_update(store: Store, round: int, attempt: int, device_id: str, at: float = 120.0) -> None:
    store.record_update(round, attempt, device_id, digest="d" * 64, size_bytes=1234, num_examples=10,
                        received_at=at, metrics={"loss": 0.5})


# ---------------------------------------------------------------- opening and layout


def test_creates_layout_with_private_directories(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    with Store(data_dir) as s:
        s.set_meta("k", "v")
        assert s.db_path == data_dir / "fedge.db"
    for d in (tmp_path / "a", data_dir, data_dir / "checkpoints"):
        assert d.stat().st_mode & 0o777 == 0o700, d
    conn = sqlite3.connect(data_dir / "fedge.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_reopening_keeps_everything(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.set_meta("fingerprint", "abc")
    with Store(tmp_path) as s:
        assert s.get_meta("fingerprint") == "abc"


def test_garbage_database_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "fedge.db").write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(StoreError, match=r"fedge\.db is not a usable fedge store"):
        Store(tmp_path)


def test_foreign_sqlite_database_is_a_store_error(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "fedge.db")
    conn.execute("CREATE TABLE meta (x INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a usable fedge store"):
        Store(tmp_path)


def test_newer_schema_version_is_a_store_error(tmp_path: Path) -> None:
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "fedge.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Store(tmp_path)


def test_data_dir_that_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create the store directory"):
        Store(tmp_path / "file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "checkpoints").write_text("x")
    with pytest.raises(StoreError, match="cannot create the store directory"):
        Store(tmp_path / "d")


def test_database_path_that_is_a_directory_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "fedge.db").mkdir()
    with pytest.raises(StoreError, match=r"cannot open .*fedge\.db"):
        Store(tmp_path)


def test_store_error_is_a_fedge_error() -> None:
    assert issubclass(StoreError, FedgeError)


def test_closed_store_refuses_calls_and_close_is_idempotent(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="is closed"):
        s.get_meta("k")
    with pytest.raises(StoreError, match="is closed"):
        s.set_meta("k", "v")


def test_concurrent_calls_from_several_threads_are_serialised(store: Store) -> None:
    attempt = open_round(store, 1, cohort=tuple(f"d{i}" for i in range(80)))
    errors: list[BaseException] = []

    def report(first: int) -> None:
        try:
            for i in range(first, first + 10):
                record_update(store, 1, attempt, f"d{i}", at=float(i))
                store.record_refusal(code="late", device_id=f"d{i}", round=1, at=float(i))
        except BaseException as e:  # surfaced below; a thread's exception would vanish
            errors.append(e)

    threads = [threading.Thread(target=report, args=(k * 10,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [u["device_id"] for u in store.updates(1, attempt)] == [f"d{i}" for i in range(80)]
    assert store.refusal_counts() == {"late": 80}


# ---------------------------------------------------------------- meta and devices


def test_meta_round_trip(store: Store) -> None:
    assert store.get_meta("k") is None
    store.set_meta("k", "one")
    store.set_meta("k", "two")
    assert store.get_meta("k") == "two"


def test_check_meta_sets_when_absent_and_accepts_same_value(store: Store) -> None:
    store.check_meta("fingerprint", "task=softmax;features=64")
    store.check_meta("fingerprint", "task=softmax;features=64")
    assert store.get_meta("fingerprint") == "task=softmax;features=64"


def test_check_meta_mismatch_names_key_and_both_values(store: Store) -> None:
    store.check_meta("fingerprint", "old")
    with pytest.raises(StoreError, match=r"fingerprint='old', not 'new'"):
        store.check_meta("fingerprint", "new")
    assert store.get_meta("fingerprint") == "old"


def test_upsert_device_keeps_first_seen_and_updates_the_rest(store: Store) -> None:
    store.upsert_device("pi-2", now=10.0, num_examples=5, profile={"arch": "arm64"})
    store.upsert_device("pi-1", now=11.0, num_examples=7, profile={})
    store.upsert_device("pi-2", now=20.0, num_examples=6,
                        profile={"arch": "arm64", "ram_mb": 4096, "charging": True, "temp_c": 51.5})
    assert store.devices() == [
        DeviceRow("pi-1", 11.0, 11.0, 7, {}),
        DeviceRow("pi-2", 10.0, 20.0, 6, {"arch": "arm64", "ram_mb": 4096, "charging": True, "temp_c": 51.5}),
    ]


def test_upsert_device_refuses_negative_example_count(store: Store) -> None:
    with pytest.raises(ValueError, match="num_examples must be >= 0, got -1"):
        store.upsert_device("pi-1", now=1.0, num_examples=-1, profile={})
    assert store.devices() == []


# ---------------------------------------------------------------- opening rounds


def test_open_round_records_the_row(store: Store) -> None:
    assert store.last_complete_round() == 0
    assert open_round(store, 1) == 1
    row = RoundRow(round=1, attempt=1, state="open", cohort=("a", "b", "c"), min_updates=2,
                   opened_at=100.0, deadline_at=160.0, closed_at=None, reported=(), dropped=(),
                   checkpoint=None, metrics={})
    assert store.round_row(1, 1) == row
    assert store.rounds() == [row]
    assert store.round_row(1, 2) is None


def test_open_round_refuses_while_another_is_open(store: Store) -> None:
    open_round(store, 1)
    with pytest.raises(ValueError, match="round 1 attempt 1 is open"):
        open_round(store, 1)


@pytest.mark.parametrize("round", [0, 2, -1])
def test_open_round_refuses_a_round_other_than_the_next(store: Store, round: int) -> None:
    with pytest.raises(ValueError, match=f"cannot open round {round}: the next round is 1"):
        open_round(store, round)


def test_open_round_refuses_a_completed_round_again(store: Store) -> None:
    complete(store, 1, open_round(store, 1))
    with pytest.raises(ValueError, match="the next round is 2"):
        open_round(store, 1)
    assert open_round(store, 2) == 1


def test_attempts_grow_across_restarts(tmp_path: Path) -> None:
    for expected in (1, 2, 3):
        with Store(tmp_path) as s:
            interrupted = s.interrupt_open_rounds(at=50.0 + expected)
            assert interrupted == ([(1, expected - 1)] if expected > 1 else [])
            assert open_round(s, 1) == expected
    with Store(tmp_path) as s:
        assert s.interrupt_open_rounds(at=99.0) == [(1, 3)]
        assert s.interrupt_open_rounds(at=100.0) == []
        rows = s.rounds()
    assert [(r.attempt, r.state, r.closed_at) for r in rows] == [
        (1, "interrupted", 52.0), (2, "interrupted", 53.0), (3, "interrupted", 99.0)
    ]


# ---------------------------------------------------------------- updates, metrics, refusals


def test_record_update_round_trip_in_arrival_order(store: Store) -> None:
    attempt = open_round(store, 1)
    record_update(store, 1, attempt, "b", at=121.0)
    record_update(store, 1, attempt, "a", at=122.0)
    rows = store.updates(1, attempt)
    assert [r["device_id"] for r in rows] == ["b", "a"]
    assert rows[0] == {"round": 1, "attempt": 1, "device_id": "b", "digest": "d" * 64, "size_bytes": 1234,
                       "num_examples": 10, "received_at": 121.0, "metrics": {"loss": 0.5}}
    assert store.updates(1, 2) == []


def test_duplicate_update_is_refused(store: Store) -> None:
    attempt = open_round(store, 1)
    record_update(store, 1, attempt, "a")
    with pytest.raises(ValueError, match="device 'a' already sent an update to round 1 attempt 1"):
        record_update(store, 1, attempt, "a")
    assert len(store.updates(1, attempt)) == 1


def test_update_to_a_missing_or_closed_attempt_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="round 1 attempt 1: no such attempt"):
        record_update(store, 1, 1, "a")
    attempt = open_round(store, 1)
    store.abandon_round(1, attempt, closed_at=160.0, reported=[], dropped=["a", "b", "c"])
    with pytest.raises(ValueError, match="round 1 attempt 1: it is abandoned"):
        record_update(store, 1, attempt, "a")


def test_metrics_round_trip_and_filters(store: Store) -> None:
    store.record_metrics(0, 1, None, kind="central", num_examples=500, metrics={"accuracy": 0.1}, at=1.0)
    store.record_metrics(1, 1, "a", kind="eval", num_examples=20, metrics={"accuracy": 0.5}, at=2.0)
    store.record_metrics(1, 2, "b", kind="eval", num_examples=30, metrics={"loss": 1.25}, at=3.0)
    store.record_metrics(1, 2, None, kind="central", num_examples=500,
                         metrics={"accuracy": np.float64(0.75)}, at=4.0)
    assert store.metrics(0) == [{"round": 0, "attempt": 1, "device_id": None, "kind": "central",
                                 "num_examples": 500, "metrics": {"accuracy": 0.1}, "at": 1.0}]
    assert [m["at"] for m in store.metrics(1)] == [2.0, 3.0, 4.0]
    assert [m["at"] for m in store.metrics(1, attempt=2)] == [3.0, 4.0]
    assert [m["at"] for m in store.metrics(1, kind="eval")] == [2.0, 3.0]
    assert store.metrics(1, attempt=2, kind="central")[0]["metrics"] == {"accuracy": 0.75}
    assert store.metrics(7) == []


def test_refusal_counts(store: Store) -> None:
    assert store.refusal_counts() == {}
    store.record_refusal(code="late", device_id="a", round=1, at=1.0)
    store.record_refusal(code="duplicate", device_id="a", round=1, at=2.0)
    store.record_refusal(code="late", device_id=None, round=None, at=3.0)
    assert store.refusal_counts() == {"duplicate": 1, "late": 2}


# ---------------------------------------------------------------- closing rounds


def test_abandon_round_then_the_same_round_opens_again(store: Store) -> None:
    attempt = open_round(store, 1)
    store.abandon_round(1, attempt, closed_at=160.0, reported=["a"], dropped=["b", "c"])
    row = store.round_row(1, 1)
    assert row is not None
    assert (row.state, row.closed_at, row.reported, row.dropped, row.checkpoint) == (
        "abandoned", 160.0, ("a",), ("b", "c"), None
    )
    assert store.last_complete_round() == 0
    assert open_round(store, 1) == 2


def test_abandon_refuses_a_row_that_is_not_open(store: Store) -> None:
    with pytest.raises(ValueError, match="cannot abandon round 1 attempt 1: no such attempt"):
        store.abandon_round(1, 1, closed_at=1.0, reported=[], dropped=[])
    attempt = open_round(store, 1)
    store.abandon_round(1, attempt, closed_at=1.0, reported=[], dropped=[])
    with pytest.raises(ValueError, match="it is abandoned"):
        store.abandon_round(1, attempt, closed_at=2.0, reported=[], dropped=[])


def test_complete_round_then_restart_loads_the_same_state(tmp_path: Path) -> None:
    saved = make_state(1)
    with Store(tmp_path) as s:
        attempt = open_round(s, 1)
        path = complete(s, 1, attempt, saved)
    assert path == tmp_path / "checkpoints" / "round-000001.safetensors"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000001.safetensors"]
    with Store(tmp_path) as s:
        assert s.interrupt_open_rounds(at=200.0) == []
        assert s.last_complete_round() == 1
        row = s.round_row(1, attempt)
        loaded = s.load_checkpoint(1)
    assert row is not None
    assert (row.state, row.closed_at, row.reported, row.dropped, row.metrics) == (
        "complete", 150.0, ("a", "b"), ("c",), {"accuracy": 0.75}
    )
    assert row.checkpoint == "checkpoints/round-000001.safetensors"
    assert_states_equal(loaded, saved)
    assert loaded.params["w"].dtype == np.float32
    assert loaded.opt_state["m"]["layer/b"].dtype == np.float64
    assert all(x.flags.writeable for x in loaded.params.values())
    loaded.params["w"][0, 0] = 42.0  # a writable copy, not a view of the file


def test_checkpoint_reads_with_a_stock_safetensors_reader(store: Store) -> None:
    from safetensors.numpy import load_file

    path = complete(store, 1, open_round(store, 1))
    tensors = load_file(str(path))
    np.testing.assert_array_equal(tensors["w"], make_state(1).params["w"])
    assert "__opt__/m/layer/b" in tensors


def test_complete_round_without_optimizer_slots(store: Store) -> None:
    plain = ServerState(params={"w": np.ones(3, dtype=np.float32)}, round=1)
    complete(store, 1, open_round(store, 1), plain)
    assert_states_equal(store.load_checkpoint(1), plain)


def test_complete_round_refuses_a_row_that_is_not_open(store: Store) -> None:
    with pytest.raises(ValueError, match="cannot complete round 1 attempt 1: no such attempt"):
        complete(store, 1, 1)
    attempt = open_round(store, 1)
    complete(store, 1, attempt)
    with pytest.raises(ValueError, match="cannot complete round 1 attempt 1: it is complete"):
        complete(store, 1, attempt)


def test_complete_round_refuses_a_state_of_another_round(store: Store) -> None:
    attempt = open_round(store, 1)
    with pytest.raises(ValueError, match="with the state of round 2"):
        complete(store, 1, attempt, make_state(2))
    row = store.round_row(1, attempt)
    assert row is not None and row.state == "open"
    assert not list((store.data_dir / "checkpoints").iterdir())


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (ServerState(params={"__opt__/m/w": np.ones(1)}, round=1), "param name '__opt__/m/w' is reserved"),
        (ServerState(params={"__metadata__": np.ones(1)}, round=1), "param name '__metadata__' is reserved"),
        (ServerState(params={"w": np.ones(1)}, opt_state={"a/b": {"w": np.ones(1)}}, round=1),
         "slot name 'a/b' must be non-empty"),
        (ServerState(params={"w": np.ones(1)}, opt_state={"": {"w": np.ones(1)}}, round=1),
         "slot name '' must be non-empty"),
        (ServerState(params={"w": np.ones(1)}, opt_state={"m": {"x": np.ones(1)}}, round=1),
         "slot 'm' does not hold the same tensor names"),
    ],
)
def test_complete_round_refuses_names_a_checkpoint_cannot_hold(
    store: Store, state: ServerState, message: str
) -> None:
    attempt = open_round(store, 1)
    with pytest.raises(ValueError, match=message):
        complete(store, 1, attempt, state)
    assert store.last_complete_round() == 0


def test_second_round_follows_the_first(store: Store) -> None:
    complete(store, 1, open_round(store, 1))
    attempt = open_round(store, 2)
    complete(store, 2, attempt, make_state(2))
    assert store.last_complete_round() == 2
    assert_states_equal(store.load_checkpoint(1), make_state(1))
    assert_states_equal(store.load_checkpoint(2), make_state(2))


# ---------------------------------------------------------------- damaged checkpoints


def test_tampered_checkpoint_is_a_store_error(store: Store) -> None:
    path = complete(store, 1, open_round(store, 1))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"round-000001\.safetensors differs from the one written"):
        store.load_checkpoint(1)


def test_missing_checkpoint_is_a_store_error(store: Store) -> None:
    complete(store, 1, open_round(store, 1)).unlink()
    with pytest.raises(StoreError, match=r"checkpoint of round 1 cannot be read: .*round-000001"):
        store.load_checkpoint(1)


def _forge_digest(store: Store, path: Path, data: bytes) -> None:
    """Replace the file and its recorded digest, as only a bug or an intruder could."""
    path.write_bytes(data)
    with contextlib.closing(sqlite3.connect(store.db_path)) as conn, conn:
        conn.execute("UPDATE rounds SET checkpoint_sha256 = ?", (hashlib.sha256(data).hexdigest(),))


def test_malformed_checkpoint_with_matching_digest_is_a_store_error(store: Store) -> None:
    path = complete(store, 1, open_round(store, 1))
    _forge_digest(store, path, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(StoreError, match="is malformed"):
        store.load_checkpoint(1)


def test_checkpoint_of_another_round_is_a_store_error(store: Store, tmp_path: Path) -> None:
    with Store(tmp_path / "other") as other:
        foreign = complete(other, 1, open_round(other, 1), make_state(1))
        complete(other, 2, open_round(other, 2), make_state(2))
        wrong = foreign.with_name("round-000002.safetensors").read_bytes()
    path = complete(store, 1, open_round(store, 1))
    _forge_digest(store, path, wrong)
    with pytest.raises(StoreError, match="holds round 2, not 1"):
        store.load_checkpoint(1)


def test_checkpoint_with_unexpected_tensors_is_a_store_error(store: Store) -> None:
    from safetensors.numpy import save

    path = complete(store, 1, open_round(store, 1))
    meta = {"fedge.round": "1", "fedge.params": '["w"]', "fedge.opt_slots": "[]"}
    _forge_digest(store, path, save({"w": np.ones(1), "extra": np.ones(1)}, metadata=meta))
    with pytest.raises(StoreError, match=r"unexpected tensors \['extra'\]"):
        store.load_checkpoint(1)


def test_load_checkpoint_of_a_round_never_completed_is_refused(store: Store) -> None:
    open_round(store, 1)
    with pytest.raises(ValueError, match="round 1 has no complete attempt"):
        store.load_checkpoint(1)


def test_orphan_checkpoint_files_do_not_count(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "round-000001.safetensors").write_bytes(b"left by a crash before the commit")
    (ckpt / ".round-000001.safetensors.tmp").write_bytes(b"half written")
    with Store(tmp_path) as s:
        assert s.last_complete_round() == 0
        with pytest.raises(ValueError, match="no complete attempt"):
            s.load_checkpoint(1)
        complete(s, 1, open_round(s, 1))
        assert_states_equal(s.load_checkpoint(1), make_state(1))
    assert not (ckpt / ".round-000001.safetensors.tmp").exists()


# ---------------------------------------------------------------- real crashes

_CRASH_SCRIPT = """
import os, signal, sys
import numpy as np
import fedge.store
from fedge.store import Store
from fedge.strategies.base import ServerState

mode, data_dir = sys.argv[1], sys.argv[2]
s = Store(data_dir)
state = ServerState(params={"w": np.arange(4, dtype=np.float32)}, opt_state={}, round=1)
if mode == "between":  # die after the checkpoint file is in place, before the commit
    write = fedge.store.atomic_write
    def write_then_die(path, data):
        write(path, data)
        os._exit(1)
    fedge.store.atomic_write = write_then_die
a = s.open_round(1, cohort=["a", "b"], min_updates=1, opened_at=1.0, deadline_at=9.0)
s.record_update(1, a, "a", digest="x", size_bytes=1, num_examples=3, received_at=2.0, metrics={})
s.complete_round(1, a, state, closed_at=3.0, reported=["a"], dropped=["b"], metrics={"accuracy": 0.5})
a = s.open_round(2, cohort=["a", "b"], min_updates=1, opened_at=4.0, deadline_at=9.0)
s.record_update(2, a, "b", digest="y", size_bytes=1, num_examples=3, received_at=5.0, metrics={})
if mode == "exit":
    os._exit(1)
conn = s._conn  # sigkill: die holding the write lock, mid-transaction
conn.execute("BEGIN IMMEDIATE")
conn.execute("UPDATE rounds SET state = 'complete' WHERE round = 2")
os.kill(os.getpid(), signal.SIGKILL)
"""


def _crash(data_dir: Path, mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, mode, str(data_dir)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
def test_crash_mid_round_resumes_after_the_last_complete_round(tmp_path: Path, mode: str) -> None:
    returncode = _crash(tmp_path, mode)
    assert returncode == (1 if mode == "exit" else -signal.SIGKILL)
    with Store(tmp_path) as s:
        assert s.last_complete_round() == 1
        assert [(r.round, r.attempt, r.state) for r in s.rounds()] == [(1, 1, "complete"), (2, 1, "open")]
        assert [u["device_id"] for u in s.updates(2, 1)] == ["b"]
        loaded = s.load_checkpoint(1)
        assert s.interrupt_open_rounds(at=10.0) == [(2, 1)]
        assert open_round(s, 2) == 2
    np.testing.assert_array_equal(loaded.params["w"], np.arange(4, dtype=np.float32))
    assert loaded.params["w"].dtype == np.float32


def test_crash_between_checkpoint_file_and_commit_reruns_the_round(tmp_path: Path) -> None:
    assert _crash(tmp_path, "between") == 1
    assert (tmp_path / "checkpoints" / "round-000001.safetensors").exists()  # the orphan
    with Store(tmp_path) as s:
        assert s.last_complete_round() == 0
        assert s.interrupt_open_rounds(at=10.0) == [(1, 1)]
        attempt = open_round(s, 1)
        assert attempt == 2
        complete(s, 1, attempt)  # overwrites the orphan
        assert_states_equal(s.load_checkpoint(1), make_state(1))


def test_failed_completion_leaves_the_round_open(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedge.store

    def no_space(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fedge.store, "atomic_write", no_space)
    attempt = open_round(store, 1)
    with pytest.raises(StoreError, match=r"cannot write checkpoint .*round-000001\.safetensors"):
        complete(store, 1, attempt)
    row = store.round_row(1, attempt)
    assert row is not None and row.state == "open"
    monkeypatch.undo()
    complete(store, 1, attempt)
    assert store.last_complete_round() == 1



def test_rounds_version_moves_when_a_round_opens_ends_or_gains_a_metric(store: Store) -> None:
    versions = [store.rounds_version()]
    attempt = open_round(store, 1)
    versions.append(store.rounds_version())
    complete(store, 1, attempt)
    versions.append(store.rounds_version())
    store.set_round_metric(1, attempt, "phase_store_s", 0.01)  # written after the round completed
    versions.append(store.rounds_version())
    assert len(set(versions)) == len(versions)
    assert store.rounds()[0].metrics["phase_store_s"] == 0.01
    with pytest.raises(ValueError, match="no round 2 attempt 1"):
        store.set_round_metric(2, 1, "phase_store_s", 0.01)
