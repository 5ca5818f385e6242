"""Tests for fedge.store's identity state (schema version 2): the migration from version 1,
enrolment tokens, issued certificates, device revocation and the admin token hash."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import fedge.store
from fedge.errors import FedgeError
from fedge.store import (
    SCHEMA_VERSION,
    TOKEN_REASONS,
    CertificateRow,
    DeviceRow,
    Store,
    StoreError,
    TokenError,
    TokenRow,
)
from fedge.strategies.base import ServerState


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "data") as s:
        yield s


def make_token(store: Store, name: str = "tok", *, uses: int = 1, device_id: str | None = None,
               expires_at: float = 200.0, now: float = 100.0, note: str | None = None) -> str:
    token_hash = sha(name)
    store.create_token(token_hash=token_hash, expires_at=expires_at, uses=uses, device_id=device_id,
                       now=now, note=note)
    return token_hash


def record_cert(store: Store, serial: str, device_id: str, issued_at: float = 100.0) -> None:
    store.record_certificate(serial=serial, device_id=device_id, fingerprint=sha(serial),
                             not_before=issued_at, not_after=issued_at + 86400.0, issued_at=issued_at)


def refusal(store: Store, token_hash: str, device_id: str, now: float) -> str:
    """The reason ``consume_token`` refuses with (it must refuse)."""
    with pytest.raises(TokenError) as info:
        store.consume_token(token_hash=token_hash, device_id=device_id, now=now)
    return info.value.reason


def run_threads(n: int, target: Callable[[int], None]) -> None:
    """Run ``target(i)`` for i in range(n) on n threads released together."""
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        target(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)


# ---------------------------------------------------------------- schema and migration

# The schema of version 1, as fedge wrote it before enrolment existed (a copy, frozen: the
# migration must keep upgrading files made with exactly this).
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE devices (device_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    num_examples INTEGER NOT NULL, profile TEXT NOT NULL);
CREATE TABLE rounds (round INTEGER NOT NULL, attempt INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'complete', 'abandoned', 'interrupted')),
    cohort TEXT NOT NULL, min_updates INTEGER NOT NULL, opened_at REAL NOT NULL,
    deadline_at REAL NOT NULL, closed_at REAL, reported TEXT NOT NULL DEFAULT '[]',
    dropped TEXT NOT NULL DEFAULT '[]', checkpoint TEXT, checkpoint_sha256 TEXT,
    metrics TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (round, attempt));
CREATE TABLE updates (round INTEGER NOT NULL, attempt INTEGER NOT NULL, device_id TEXT NOT NULL,
    digest TEXT NOT NULL, size_bytes INTEGER NOT NULL, num_examples INTEGER NOT NULL,
    received_at REAL NOT NULL, metrics TEXT NOT NULL, PRIMARY KEY (round, attempt, device_id),
    FOREIGN KEY (round, attempt) REFERENCES rounds (round, attempt));
CREATE TABLE metrics (id INTEGER PRIMARY KEY, round INTEGER NOT NULL, attempt INTEGER NOT NULL,
    device_id TEXT, kind TEXT NOT NULL, num_examples INTEGER NOT NULL, metrics TEXT NOT NULL,
    at REAL NOT NULL);
CREATE TABLE refusals (id INTEGER PRIMARY KEY, code TEXT NOT NULL, device_id TEXT, round INTEGER,
    at REAL NOT NULL);
"""

_V1_STATE = ServerState(params={"w": np.arange(4, dtype=np.float32)}, round=1)


def make_v1_store(data_dir: Path, tmp_path: Path) -> None:
    """A version-1 store as the old build left it: round 1 complete, round 2 open with one update."""
    with Store(tmp_path / "donor") as donor:  # only to make a valid checkpoint of round 1
        attempt = donor.open_round(1, cohort=["pi-1"], min_updates=1, opened_at=1.0, deadline_at=9.0)
        ckpt = donor.complete_round(1, attempt, _V1_STATE, closed_at=3.0, reported=["pi-1"],
                                    dropped=[], metrics={"accuracy": 0.5})
    (data_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, data_dir / "checkpoints" / ckpt.name)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    conn = sqlite3.connect(data_dir / "fedge.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(f"BEGIN; {_V1_SCHEMA} PRAGMA user_version=1; COMMIT")
        with conn:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO meta VALUES ('fingerprint', 'task=softmax')")
            conn.execute("INSERT INTO devices VALUES ('pi-1', 1.0, 5.0, 30, '{\"arch\": \"arm64\"}')")
            conn.execute("INSERT INTO rounds (round, attempt, state, cohort, min_updates, opened_at, "
                         "deadline_at, closed_at, reported, checkpoint, checkpoint_sha256, metrics) VALUES "
                         "(1, 1, 'complete', '[\"pi-1\"]', 1, 1.0, 9.0, 3.0, '[\"pi-1\"]', ?, ?, "
                         "'{\"accuracy\": 0.5}')", (f"checkpoints/{ckpt.name}", digest))
            conn.execute("INSERT INTO rounds (round, attempt, state, cohort, min_updates, opened_at, "
                         "deadline_at) VALUES (2, 1, 'open', '[\"pi-1\"]', 1, 4.0, 9.0)")
            conn.execute("INSERT INTO updates VALUES (2, 1, 'pi-1', 'abc', 10, 30, 5.0, '{\"loss\": 0.25}')")
            conn.execute("INSERT INTO metrics VALUES (NULL, 1, 1, NULL, 'central', 100, "
                         "'{\"accuracy\": 0.5}', 3.0)")
            conn.execute("INSERT INTO refusals VALUES (NULL, 'late', 'pi-1', 1, 3.5)")
    finally:
        conn.close()


def user_version(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def schema_of(db: Path) -> dict[str, list[tuple[str, str]]]:
    """Each table's and index's columns (name, declared type): what a migration must make equal."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index') "
                                            "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        out: dict[str, list[tuple[str, str]]] = {}
        for name in names:
            info = conn.execute(f"PRAGMA table_info({name})").fetchall()
            out[name] = ([(r[1], r[2]) for r in info] if info
                         else [(r[2], "") for r in conn.execute(f"PRAGMA index_info({name})")])
        return out


def test_fresh_store_is_created_at_the_current_version(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 3  # 3 added the privacy ledger (tests/unit/test_privacy_store.py)
    Store(tmp_path).close()
    assert user_version(tmp_path / "fedge.db") == SCHEMA_VERSION
    schema = schema_of(tmp_path / "fedge.db")
    assert [c for c, _ in schema["devices"]][-2:] == ["enrolled_at", "revoked_at"]
    assert [c for c, _ in schema["tokens"]] == ["hash", "created_at", "expires_at", "uses_left",
                                                 "device_id", "note"]
    assert [c for c, _ in schema["certificates"]] == ["serial", "device_id", "fingerprint", "not_before",
                                                       "not_after", "issued_at", "revoked_at"]
    assert schema["certificates_by_device"] == [("device_id", "")]


def test_version_1_store_is_upgraded_keeping_every_row(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    make_v1_store(data_dir, tmp_path)
    assert user_version(data_dir / "fedge.db") == 1
    with Store(data_dir) as s:
        assert user_version(data_dir / "fedge.db") == SCHEMA_VERSION
        assert s.get_meta("fingerprint") == "task=softmax"
        assert s.devices() == [DeviceRow("pi-1", 1.0, 5.0, 30, {"arch": "arm64"}, None, None)]
        assert s.last_complete_round() == 1
        loaded = s.load_checkpoint(1)
        assert [(r.round, r.attempt, r.state) for r in s.rounds()] == [(1, 1, "complete"), (2, 1, "open")]
        assert s.updates(2, 1)[0]["metrics"] == {"loss": 0.25}
        assert s.metrics(1)[0]["metrics"] == {"accuracy": 0.5}
        assert s.refusal_counts() == {"late": 1}
        assert s.interrupt_open_rounds(at=10.0) == [(2, 1)]
        assert s.open_round(2, cohort=["pi-1"], min_updates=1, opened_at=11.0, deadline_at=20.0) == 2
        # the new methods work on the upgraded file
        s.enrol_device("pi-1", now=12.0)
        record_cert(s, "0a1b", "pi-1", issued_at=12.0)
        assert not s.is_revoked("pi-1", "0a1b")
        s.consume_token(token_hash=make_token(s, now=12.0), device_id="pi-2", now=13.0)
        s.set_admin_token_hash(sha("admin"))
    np.testing.assert_array_equal(loaded.params["w"], _V1_STATE.params["w"])
    with Store(data_dir) as s:  # and again after a restart, with nothing left to migrate
        assert s.devices()[0] == DeviceRow("pi-1", 1.0, 12.0, 30, {"arch": "arm64"}, 12.0, None)
        assert not s.is_revoked("pi-1", "0a1b")
        assert s.admin_token_hash() == sha("admin")
    assert schema_of(data_dir / "fedge.db") == schema_of(tmp_path / "donor" / "fedge.db")


def test_failed_upgrade_changes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    make_v1_store(data_dir, tmp_path)
    with contextlib.closing(sqlite3.connect(data_dir / "fedge.db")) as conn, conn:
        conn.execute("CREATE TABLE certificates (x INTEGER)")  # the upgrade fails half way through
    before = schema_of(data_dir / "fedge.db")
    with pytest.raises(StoreError, match="not a usable fedge store: table certificates already exists"):
        Store(data_dir)
    assert user_version(data_dir / "fedge.db") == 1
    assert schema_of(data_dir / "fedge.db") == before  # the columns added first were rolled back too


def test_concurrent_opens_of_a_version_1_store_upgrade_it_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    make_v1_store(data_dir, tmp_path)
    errors: list[BaseException] = []

    def open_store(_: int) -> None:
        try:
            Store(data_dir).close()
        except BaseException as e:  # surfaced below
            errors.append(e)

    run_threads(8, open_store)
    assert errors == []
    assert user_version(data_dir / "fedge.db") == SCHEMA_VERSION


# ---------------------------------------------------------------- enrolment tokens


def test_create_and_list_tokens(store: Store) -> None:
    assert store.tokens(now=100.0) == []
    h1 = make_token(store, "one", uses=3, now=100.0, expires_at=150.0, note="lab pis")
    h2 = make_token(store, "two", device_id="pi-7", now=101.0, expires_at=300.0)
    assert store.tokens(now=120.0) == [
        TokenRow(h1[:8], 150.0, 3, None, False, 100.0, "lab pis"),
        TokenRow(h2[:8], 300.0, 1, "pi-7", False, 101.0, None),
    ]
    assert [t.expired for t in store.tokens(now=150.0)] == [True, False]
    assert store.token_device(h2) == "pi-7"
    assert store.token_device(h1) is None
    assert store.token_device(sha("unknown")) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uses": 0}, r"uses must be an integer >= 1, got 0"),
        ({"uses": -1}, r"uses must be an integer >= 1, got -1"),
        ({"uses": True}, r"uses must be an integer >= 1, got True"),
        ({"expires_at": 100.0}, r"expires_at must be after now \(100\.0\), got 100\.0"),
        ({"expires_at": 99.0}, r"expires_at must be after now"),
        ({"expires_at": float("nan")}, r"expires_at must be after now"),
        ({"token_hash": "k7PWs2-raw-token-not-a-hash"}, "never the secret itself"),
        ({"token_hash": sha("x").upper()}, "64 lowercase hex digits"),
        ({"token_hash": sha("x")[:63]}, "64 lowercase hex digits"),
    ],
)
def test_create_token_refusals(store: Store, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"token_hash": sha("x"), "expires_at": 200.0, "uses": 1, "device_id": None,
                               "now": 100.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        store.create_token(**args)  # type: ignore[arg-type]
    assert store.tokens(now=100.0) == []


def test_create_token_refuses_a_known_hash(store: Store) -> None:
    h = make_token(store, uses=2)
    with pytest.raises(ValueError, match=f"hash {h[:8]}... already exists"):
        make_token(store, uses=5)
    assert store.tokens(now=100.0)[0].uses_left == 2


def test_consume_token_until_used(store: Store) -> None:
    h = make_token(store, uses=2)
    store.consume_token(token_hash=h, device_id="pi-1", now=110.0)
    assert store.tokens(now=110.0)[0].uses_left == 1
    store.consume_token(token_hash=h, device_id="pi-2", now=120.0)
    assert store.tokens(now=120.0)[0].uses_left == 0
    assert refusal(store, h, "pi-3", 130.0) == "used_token"
    assert store.tokens(now=130.0)[0].uses_left == 0


def test_consume_token_refuses_an_expired_token(store: Store) -> None:
    h = make_token(store, uses=5, expires_at=200.0)
    store.consume_token(token_hash=h, device_id="pi-1", now=199.9)
    for now in (200.0, 1e9):
        assert refusal(store, h, "pi-2", now) == "expired_token"
    assert store.tokens(now=100.0)[0].uses_left == 4


def test_consume_token_bound_to_a_device(store: Store) -> None:
    h = make_token(store, device_id="pi-7")
    assert refusal(store, h, "pi-8", 110.0) == "wrong_device"
    assert store.tokens(now=110.0)[0].uses_left == 1
    store.consume_token(token_hash=h, device_id="pi-7", now=111.0)
    assert refusal(store, h, "pi-7", 112.0) == "used_token"


def test_consume_unknown_token(store: Store) -> None:
    make_token(store, "real")
    assert refusal(store, sha("guess"), "pi-1", 110.0) == "unknown_token"
    assert refusal(store, "real", "pi-1", 110.0) == "unknown_token"


def test_refusal_reasons_are_checked_in_order(store: Store) -> None:
    """Expired beats used beats wrong device: the reason names the first rule broken."""
    h = make_token(store, device_id="pi-7", expires_at=200.0)
    store.consume_token(token_hash=h, device_id="pi-7", now=110.0)
    assert refusal(store, h, "pi-8", 120.0) == "used_token"
    assert refusal(store, h, "pi-8", 250.0) == "expired_token"


def test_token_error_is_a_store_error_with_a_stable_reason() -> None:
    assert TOKEN_REASONS == ("unknown_token", "expired_token", "used_token", "wrong_device")
    for reason in TOKEN_REASONS:
        e = TokenError(reason)
        assert isinstance(e, StoreError) and isinstance(e, FedgeError)
        assert e.reason == reason
        assert str(e).startswith(f"{reason}: ")


def test_one_use_token_consumed_from_8_threads_succeeds_once(store: Store) -> None:
    h = make_token(store, uses=1)
    outcomes: list[str] = []

    def consume(i: int) -> None:
        try:
            store.consume_token(token_hash=h, device_id=f"pi-{i}", now=110.0)
            outcomes.append("ok")
        except TokenError as e:
            outcomes.append(e.reason)

    run_threads(8, consume)
    assert sorted(outcomes) == ["ok"] + ["used_token"] * 7
    assert store.tokens(now=110.0)[0].uses_left == 0


def test_one_use_token_consumed_through_8_connections_succeeds_once(tmp_path: Path) -> None:
    """As from 8 processes: the database, not the store's lock, makes consumption atomic."""
    with Store(tmp_path) as s:
        h = make_token(s, uses=1)
    stores = [Store(tmp_path) for _ in range(8)]
    outcomes: list[str] = []

    def consume(i: int) -> None:
        try:
            stores[i].consume_token(token_hash=h, device_id=f"pi-{i}", now=110.0)
            outcomes.append("ok")
        except TokenError as e:
            outcomes.append(e.reason)

    try:
        run_threads(8, consume)
    finally:
        for s in stores:
            s.close()
    assert sorted(outcomes) == ["ok"] + ["used_token"] * 7


def test_tokens_survive_a_restart_and_the_token_is_never_stored(tmp_path: Path) -> None:
    token = "k7PWs2x-the-secret-token-itself-0123456789ab"
    with Store(tmp_path) as s:
        s.create_token(token_hash=sha(token), expires_at=200.0, uses=2, device_id=None, now=100.0)
        s.consume_token(token_hash=sha(token), device_id="pi-1", now=110.0)
    with Store(tmp_path) as s:
        assert s.tokens(now=120.0)[0].uses_left == 1
        s.consume_token(token_hash=sha(token), device_id="pi-2", now=120.0)
        assert refusal(s, sha(token), "pi-3", 130.0) == "used_token"
    for f in tmp_path.glob("fedge.db*"):
        assert token.encode() not in f.read_bytes()


# ---------------------------------------------------------------- enrolment of devices


def test_enrol_a_new_device_then_it_checks_in(store: Store) -> None:
    store.enrol_device("pi-1", now=100.0)
    assert store.devices() == [DeviceRow("pi-1", 100.0, 100.0, 0, {}, enrolled_at=100.0, revoked_at=None)]
    store.upsert_device("pi-1", now=110.0, num_examples=12, profile={"arch": "arm64"})
    assert store.devices() == [DeviceRow("pi-1", 100.0, 110.0, 12, {"arch": "arm64"}, 100.0, None)]


def test_enrol_a_device_that_already_checked_in(store: Store) -> None:
    store.upsert_device("pi-1", now=50.0, num_examples=12, profile={"arch": "arm64"})
    store.enrol_device("pi-1", now=100.0)
    store.enrol_device("pi-1", now=90.0)  # last_seen never goes back
    assert store.devices() == [DeviceRow("pi-1", 50.0, 100.0, 12, {"arch": "arm64"}, 90.0, None)]


def test_enrol_a_revoked_device_needs_allow_revoked(store: Store) -> None:
    store.enrol_device("pi-1", now=100.0)
    record_cert(store, "01", "pi-1", issued_at=100.0)
    assert store.revoke_device("pi-1", now=150.0) == 1
    with pytest.raises(ValueError, match="device 'pi-1' is revoked; enrolling it again needs a token"):
        store.enrol_device("pi-1", now=160.0)
    assert store.devices()[0].revoked_at == 150.0
    assert store.devices()[0].enrolled_at == 100.0
    store.enrol_device("pi-1", now=170.0, allow_revoked=True)
    assert (store.devices()[0].enrolled_at, store.devices()[0].revoked_at) == (170.0, None)
    assert store.is_revoked("pi-1", "01")  # the old certificate stays revoked
    record_cert(store, "02", "pi-1", issued_at=170.0)
    assert not store.is_revoked("pi-1", "02")


def test_enrol_with_allow_revoked_on_an_active_device_is_a_plain_enrolment(store: Store) -> None:
    store.enrol_device("pi-1", now=100.0)
    store.enrol_device("pi-1", now=110.0, allow_revoked=True)
    assert store.devices() == [DeviceRow("pi-1", 100.0, 110.0, 0, {}, 110.0, None)]


# ---------------------------------------------------------------- certificates and revocation


def test_record_and_list_certificates(store: Store) -> None:
    store.enrol_device("pi-1", now=100.0)
    store.enrol_device("pi-2", now=100.0)
    record_cert(store, "0AbC", "pi-1", issued_at=101.0)
    record_cert(store, "ff", "pi-2", issued_at=102.0)
    record_cert(store, "12", "pi-1", issued_at=103.0)
    first = CertificateRow("0abc", "pi-1", sha("0AbC"), 101.0, 101.0 + 86400.0, 101.0, None)
    assert store.certificates("pi-1") == [
        first, CertificateRow("12", "pi-1", sha("12"), 103.0, 103.0 + 86400.0, 103.0, None)
    ]
    assert [c.serial for c in store.certificates()] == ["0abc", "ff", "12"]
    assert store.certificates("pi-9") == []


@pytest.mark.parametrize(
    ("serial", "device_id", "not_after", "message"),
    [
        ("01", "pi-9", 200.0, "unknown device 'pi-9': enrol it before"),
        ("", "pi-1", 200.0, "serial must be 1 to 64 hex digits, got ''"),
        ("0x01", "pi-1", 200.0, "serial must be 1 to 64 hex digits, got '0x01'"),
        ("1" * 65, "pi-1", 200.0, "serial must be 1 to 64 hex digits"),
        ("01", "pi-1", 100.0, r"not_after \(100\.0\) must be after not_before \(100\.0\)"),
    ],
)
def test_record_certificate_refusals(
    store: Store, serial: str, device_id: str, not_after: float, message: str
) -> None:
    store.enrol_device("pi-1", now=100.0)
    with pytest.raises(ValueError, match=message):
        store.record_certificate(serial=serial, device_id=device_id, fingerprint="f", not_before=100.0,
                                 not_after=not_after, issued_at=100.0)
    assert store.certificates() == []


def test_record_certificate_refuses_a_known_serial(store: Store) -> None:
    store.enrol_device("pi-1", now=100.0)
    store.enrol_device("pi-2", now=100.0)
    record_cert(store, "ab", "pi-1")
    with pytest.raises(ValueError, match="serial ab is already recorded"):
        record_cert(store, "AB", "pi-2")
    assert [c.device_id for c in store.certificates()] == ["pi-1"]


def test_is_revoked(store: Store) -> None:
    store.enrol_device("pi-1", now=100.0)
    store.enrol_device("pi-2", now=100.0)
    record_cert(store, "0abc", "pi-1")
    record_cert(store, "0def", "pi-2")
    assert not store.is_revoked("pi-1", "0abc")
    assert not store.is_revoked("pi-1", "0ABC")  # serials are hex: case does not matter
    assert store.is_revoked("pi-1", "9999")  # never recorded: not trusted
    assert store.is_revoked("pi-1", "0def")  # a serial of another device
    assert store.is_revoked("pi-9", "0abc")  # an unknown device
    assert store.revoke_device("pi-1", now=150.0) == 1
    assert store.is_revoked("pi-1", "0abc")
    assert not store.is_revoked("pi-2", "0def")


def test_revoke_device_revokes_every_certificate_once(store: Store) -> None:
    store.enrol_device("pi-1", now=100.0)
    store.enrol_device("pi-2", now=100.0)
    for serial in ("01", "02", "03"):
        record_cert(store, serial, "pi-1")
    record_cert(store, "04", "pi-2")
    assert store.revoke_device("pi-1", now=150.0) == 3
    assert [(c.serial, c.revoked_at) for c in store.certificates()] == [
        ("01", 150.0), ("02", 150.0), ("03", 150.0), ("04", None)
    ]
    assert store.revoke_device("pi-1", now=160.0) == 0  # again: the first time stands
    assert store.devices()[0].revoked_at == 150.0
    assert {c.revoked_at for c in store.certificates("pi-1")} == {150.0}


def test_revoke_an_unknown_device_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown device 'pi-9'"):
        store.revoke_device("pi-9", now=1.0)


def test_certificate_recorded_for_a_revoked_device_is_born_revoked(store: Store) -> None:
    """Issued while the device was being revoked: lifting the revocation must not bring it to life."""
    store.enrol_device("pi-1", now=100.0)
    store.revoke_device("pi-1", now=150.0)
    record_cert(store, "0a", "pi-1", issued_at=151.0)
    assert store.certificates("pi-1")[0].revoked_at == 150.0
    store.enrol_device("pi-1", now=170.0, allow_revoked=True)
    assert store.is_revoked("pi-1", "0a")


def test_identity_survives_a_restart(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.enrol_device("pi-1", now=100.0)
        s.enrol_device("pi-2", now=100.0)
        record_cert(s, "01", "pi-1")
        record_cert(s, "02", "pi-2")
        s.revoke_device("pi-2", now=150.0)
    with Store(tmp_path) as s:
        assert not s.is_revoked("pi-1", "01")
        assert s.is_revoked("pi-2", "02")
        assert [(d.device_id, d.enrolled_at, d.revoked_at) for d in s.devices()] == [
            ("pi-1", 100.0, None), ("pi-2", 100.0, 150.0)
        ]
        assert [c.revoked_at for c in s.certificates()] == [None, 150.0]


def test_revocation_through_another_store_is_seen_at_once(tmp_path: Path) -> None:
    """The CLI revokes in its own process while the coordinator runs: the next check refuses."""
    with Store(tmp_path) as coordinator:
        coordinator.enrol_device("pi-1", now=100.0)
        record_cert(coordinator, "01", "pi-1")
        assert not coordinator.is_revoked("pi-1", "01")
        with Store(tmp_path) as cli:
            assert cli.revoke_device("pi-1", now=150.0) == 1
        assert coordinator.is_revoked("pi-1", "01")


def test_is_revoked_does_not_wait_for_a_write_in_progress(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.enrol_device("pi-1", now=100.0)
    record_cert(store, "01", "pi-1")
    writing, release = threading.Event(), threading.Event()
    write = fedge.store.atomic_write

    def slow_write(path: Path, data: bytes) -> None:  # a big checkpoint, held under the write lock
        writing.set()
        assert release.wait(timeout=30)
        write(path, data)

    monkeypatch.setattr(fedge.store, "atomic_write", slow_write)
    attempt = store.open_round(1, cohort=["pi-1"], min_updates=1, opened_at=1.0, deadline_at=9.0)
    writer = threading.Thread(target=store.complete_round, args=(1, attempt, _V1_STATE),
                              kwargs={"closed_at": 2.0, "reported": [], "dropped": [], "metrics": {}})
    writer.start()
    try:
        assert writing.wait(timeout=30)
        answers: list[bool] = []
        reader = threading.Thread(target=lambda: answers.append(store.is_revoked("pi-1", "01")))
        reader.start()
        reader.join(timeout=5)
        assert answers == [False]
    finally:
        release.set()
        writer.join(timeout=30)
    assert store.last_complete_round() == 1


def test_is_revoked_is_one_indexed_read(store: Store) -> None:
    for i in range(1, 301):
        store.enrol_device(f"pi-{i % 7}", now=100.0)
        record_cert(store, format(i, "x"), f"pi-{i % 7}")
    with contextlib.closing(sqlite3.connect(store.db_path)) as conn:
        sql = "EXPLAIN QUERY PLAN " + fedge.store._IS_REVOKED_SQL
        plan = [str(r[3]) for r in conn.execute(sql, ("1", "pi-1"))]
    assert len(plan) == 2 and all(p.startswith("SEARCH") for p in plan), plan
    n = 2000
    start = time.perf_counter()
    for i in range(n):
        store.is_revoked("pi-1", format(i % 300 + 1, "x"))
    per_call = (time.perf_counter() - start) / n
    assert per_call < 500e-6, f"is_revoked took {per_call * 1e6:.0f} µs a call"  # about 10 µs in fact


def test_is_revoked_on_a_closed_store_is_a_store_error(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.close()
    with pytest.raises(StoreError, match="is closed"):
        s.is_revoked("pi-1", "01")


# ---------------------------------------------------------------- the admin token


def test_admin_token_hash(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        assert s.admin_token_hash() is None
        s.set_admin_token_hash(sha("first"))
        s.set_admin_token_hash(sha("second"))
        assert s.admin_token_hash() == sha("second")
    with Store(tmp_path) as s:
        assert s.admin_token_hash() == sha("second")


@pytest.mark.parametrize("value", ["the-admin-token-itself", sha("x").upper(), ""])
def test_admin_token_hash_must_be_a_sha256(store: Store, value: str) -> None:
    with pytest.raises(ValueError, match="never the secret itself"):
        store.set_admin_token_hash(value)
    assert store.admin_token_hash() is None
