"""The coordinator's durable state: SQLite in WAL mode plus one checkpoint file per round.

``data_dir/fedge.db`` holds meta, devices, rounds, updates, metrics and
refusals; ``data_dir/checkpoints/round-000005.safetensors`` holds the
:class:`ServerState` after round 5. Why a coordinator killed at any instant
restarts at the last complete round, losing and repeating none:

* A round is complete exactly when its row says so, and that row names the
  checkpoint and its sha256. So the checkpoint is written first (temporary
  name, fsync, rename, fsync of the directory) and only then is the row
  marked complete, in one transaction committed with ``synchronous=FULL``
  (durable across a power cut). A crash before that commit leaves at worst a
  file no row names, overwritten when the round completes later; no instant
  has a complete row without its file.
* Other writes commit with ``synchronous=NORMAL``: in WAL mode a commit
  survives the death of the process, if not a power cut. They describe the
  round in flight, which is re-run anyway.
* A round open at startup was in flight at the crash. Its updates were summed
  only in memory, so it cannot be finished: it is marked "interrupted" and
  the same round number opens again as a new attempt. Attempt numbers only
  grow, so an update sent to a dead attempt is never taken for a live one.

The privacy ledger (schema version 3) has one row per complete round run
under differential privacy: the mechanism (noise multiplier, sampling, clip)
and epsilon after it. The row is inserted in the transaction that marks the
round complete, so a round's cost is on record exactly when its model is: a
coordinator restarted after its budget ran out refuses the next round again.

Identity (schema version 2) lives here too: enrolment tokens (their sha256
only, never the token), the certificates the fedge CA issued, and device
revocation. Those writes are rare and security-relevant, so they commit with
``synchronous=FULL``: a revocation or a spent one-time token survives a power
cut. :meth:`Store.is_revoked` runs on every authenticated request, so it is one
indexed SELECT on a second, read-only connection: WAL readers never wait for
the writer, so a long checkpoint write does not stall authentication, and a
revocation is seen by the first request after its commit.

The store never reads the clock: every timestamp is an argument.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.errors import StoreError
from fedge.params import Params
from fedge.privacy.accounting import LedgerEntry
from fedge.strategies.base import ServerState

__all__ = [
    "PHASES",
    "SCHEMA_VERSION",
    "SECAGG_PHASES",
    "TOKEN_REASONS",
    "CertificateRow",
    "DeviceRow",
    "EventRow",
    "RoundRow",
    "RoundStats",
    "Store",
    "StoreError",
    "TokenError",
    "TokenRow",
    "atomic_write",
]

#: The schema this build writes (``PRAGMA user_version``); older ones are upgraded, a newer one is refused.
SCHEMA_VERSION = 4

#: The phases a round's profile times (``phase_NAME_s`` in its metrics; docs/observability.md).
PHASES = ("selection", "download", "keys", "training", "upload", "decode", "aggregation", "unmask",
          "evaluation", "store")

#: The phases of a secure round a device can drop out in (``secagg_dropped_<phase>`` in its metrics).
SECAGG_PHASES = ("advertise", "share", "upload", "unmask")

#: The :attr:`TokenError.reason` codes of :meth:`Store.consume_token`.
TOKEN_REASONS = ("unknown_token", "expired_token", "used_token", "wrong_device")

_CHECKPOINTS = "checkpoints"
_OPT_PREFIX = "__opt__/"
#: ``_MIGRATIONS[v]`` takes a database from version ``v - 1`` to ``v``, statement by statement
#: (``executescript`` would commit the enclosing transaction). A new file runs them all, so a new
#: database and an upgraded one have the same schema.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE devices (device_id TEXT PRIMARY KEY, first_seen REAL NOT NULL,
    last_seen REAL NOT NULL, num_examples INTEGER NOT NULL, profile TEXT NOT NULL)""",
        """CREATE TABLE rounds (round INTEGER NOT NULL, attempt INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'complete', 'abandoned', 'interrupted')),
    cohort TEXT NOT NULL, min_updates INTEGER NOT NULL, opened_at REAL NOT NULL,
    deadline_at REAL NOT NULL, closed_at REAL, reported TEXT NOT NULL DEFAULT '[]',
    dropped TEXT NOT NULL DEFAULT '[]', checkpoint TEXT, checkpoint_sha256 TEXT,
    metrics TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (round, attempt))""",
        """CREATE TABLE updates (round INTEGER NOT NULL, attempt INTEGER NOT NULL, device_id TEXT NOT NULL,
    digest TEXT NOT NULL, size_bytes INTEGER NOT NULL, num_examples INTEGER NOT NULL,
    received_at REAL NOT NULL, metrics TEXT NOT NULL, PRIMARY KEY (round, attempt, device_id),
    FOREIGN KEY (round, attempt) REFERENCES rounds (round, attempt))""",
        """CREATE TABLE metrics (id INTEGER PRIMARY KEY, round INTEGER NOT NULL, attempt INTEGER NOT NULL,
    device_id TEXT, kind TEXT NOT NULL, num_examples INTEGER NOT NULL, metrics TEXT NOT NULL,
    at REAL NOT NULL)""",
        """CREATE TABLE refusals (id INTEGER PRIMARY KEY, code TEXT NOT NULL, device_id TEXT, round INTEGER,
    at REAL NOT NULL)""",
    ),
    2: (
        "ALTER TABLE devices ADD COLUMN enrolled_at REAL",
        "ALTER TABLE devices ADD COLUMN revoked_at REAL",
        """CREATE TABLE tokens (hash TEXT PRIMARY KEY, created_at REAL NOT NULL, expires_at REAL NOT NULL,
    uses_left INTEGER NOT NULL CHECK (uses_left >= 0), device_id TEXT, note TEXT)""",
        """CREATE TABLE certificates (serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices (device_id), fingerprint TEXT NOT NULL,
    not_before REAL NOT NULL, not_after REAL NOT NULL, issued_at REAL NOT NULL, revoked_at REAL)""",
        "CREATE INDEX certificates_by_device ON certificates (device_id)",
    ),
    3: (
        """CREATE TABLE privacy_ledger (round INTEGER PRIMARY KEY, attempt INTEGER NOT NULL,
    mode TEXT NOT NULL, noise_multiplier REAL NOT NULL, sampling TEXT NOT NULL, sample_rate REAL NOT NULL,
    population INTEGER, cohort INTEGER, clip_norm REAL NOT NULL, next_clip_norm REAL NOT NULL,
    epsilon REAL NOT NULL, delta REAL NOT NULL, at REAL NOT NULL,
    FOREIGN KEY (round, attempt) REFERENCES rounds (round, attempt))""",
    ),
    4: (
        """CREATE TABLE events (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, at REAL NOT NULL,
    received_at REAL NOT NULL, kind TEXT NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL,
    fields TEXT NOT NULL)""",
        "CREATE INDEX events_by_time ON events (received_at)",
        "CREATE INDEX events_by_device ON events (device_id, received_at)",
    ),
}
_ADMIN_TOKEN_KEY = "admin_token_sha256"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SERIAL_HEX = re.compile(r"[0-9a-f]{1,64}")
# True unless the certificate is recorded for this very device and neither it nor the device is
# revoked; no row (an unknown serial, or one of another device) reads as revoked. Two primary-key lookups.
_IS_REVOKED_SQL = ("SELECT c.revoked_at IS NOT NULL OR d.revoked_at IS NOT NULL OR d.device_id IS NULL "
                   "FROM certificates AS c LEFT JOIN devices AS d ON d.device_id = c.device_id "
                   "WHERE c.serial = ? AND c.device_id = ?")

ProfileValue = str | int | float | bool


@dataclass(frozen=True)
class RoundStats:
    """What ``/metrics`` reports from the store: attempts by state, complete rounds' durations,
    updates received and events stored."""

    by_state: dict[str, int]
    durations: list[float]
    updates: int
    events: int
    phases: dict[str, float]  # seconds spent in each phase, summed over complete rounds
    bytes_up: float = 0.0  # request bodies of updates, every attempt
    bytes_down: float = 0.0  # params sent, every attempt
    # Secure rounds, every ended attempt: devices that dropped out in each phase, and
    # attempts abandoned in each phase (below the threshold).
    secagg_dropped: dict[str, float] = field(default_factory=dict)
    secagg_aborted: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EventRow:
    """A notable event a device reported (a policy skip, an abort, an error, enrolment...).

    ``at`` is the device's own clock, ``received_at`` the coordinator's.
    """

    id: int
    device_id: str
    at: float
    received_at: float
    kind: str
    level: str
    message: str
    fields: dict[str, ProfileValue]

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "device": self.device_id, "at": self.at, "received_at": self.received_at,
                "kind": self.kind, "level": self.level, "message": self.message, "fields": self.fields}


@dataclass(frozen=True)
class RoundRow:
    """One attempt of one round; ``checkpoint`` (relative to ``data_dir``) is set once complete."""

    round: int
    attempt: int
    state: str  # "open" | "complete" | "abandoned" | "interrupted"
    cohort: tuple[str, ...]
    min_updates: int
    opened_at: float
    deadline_at: float
    closed_at: float | None
    reported: tuple[str, ...]
    dropped: tuple[str, ...]
    checkpoint: str | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class DeviceRow:
    """A device the coordinator has heard from, with its latest example count and profile.

    ``first_seen`` and ``last_seen`` count check-ins and enrolment; a device
    enrolled but never checked in has 0 examples and an empty profile.
    ``enrolled_at`` is its latest enrolment (None: it predates enrolment, or
    runs without TLS); ``revoked_at`` is set while it is revoked.
    """

    device_id: str
    first_seen: float
    last_seen: float
    num_examples: int
    profile: dict[str, ProfileValue]
    enrolled_at: float | None = None
    revoked_at: float | None = None


@dataclass(frozen=True)
class TokenRow:
    """An enrolment token as listed: never the token, and only the first 8 hex digits of its hash."""

    hash_prefix: str
    expires_at: float
    uses_left: int
    device_id: str | None  # the only device id it may enrol; None: any
    expired: bool  # at the ``now`` given to :meth:`Store.tokens`
    created_at: float
    note: str | None


@dataclass(frozen=True)
class CertificateRow:
    """A device certificate the fedge CA issued (``serial`` in lowercase hex)."""

    serial: str
    device_id: str
    fingerprint: str
    not_before: float
    not_after: float
    issued_at: float
    revoked_at: float | None


class TokenError(StoreError):
    """:meth:`Store.consume_token` refused a token; ``reason`` is one of :data:`TOKEN_REASONS`.

    The reason is for the coordinator's log and its own choice of reply; the
    message holds no part of the token.
    """

    _TEXT: Mapping[str, str] = {
        "unknown_token": "no such enrolment token",
        "expired_token": "the enrolment token has expired",
        "used_token": "the enrolment token has no uses left",
        "wrong_device": "the enrolment token is bound to another device id",
    }

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {self._TEXT.get(reason, 'the enrolment token is refused')}")


class Store:
    """The coordinator's durable state in ``data_dir`` (created with mode 0700 if missing).

    One lock serialises every call, so the event loop and worker threads may
    share a store.

    Raises:
        StoreError: ``data_dir`` cannot be created, or ``fedge.db`` is not a
            fedge store, is corrupt, or has a newer schema.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / "fedge.db"
        self._lock = threading.Lock()
        self._reader_lock = threading.Lock()
        # Metrics added to a stored round (set_round_metric) move neither the count nor the
        # latest close, so rounds_version counts them too (only this process writes rounds).
        self._metric_writes = 0
        try:
            _make_dirs(self.data_dir / _CHECKPOINTS)
        except OSError as e:
            raise StoreError(f"cannot create the store directory {str(self.data_dir)!r}: {e}") from e
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]  # a foreign file fails here
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.db_path} cannot use WAL journaling (got {mode!r})")
            conn.executescript("PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL")
            if self._version(conn) != SCHEMA_VERSION:
                self._migrate(conn)
            reader = self._connect()
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"{self.db_path} is not a usable fedge store: {e}") from e
        except BaseException:
            conn.close()
            raise
        try:  # the second connection only ever reads (see is_revoked)
            reader.execute("PRAGMA query_only=ON")
        except sqlite3.DatabaseError as e:
            reader.close()
            conn.close()
            raise StoreError(f"{self.db_path} is not a usable fedge store: {e}") from e
        self._conn: sqlite3.Connection | None = conn
        self._reader: sqlite3.Connection | None = reader

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open {self.db_path}: {e}") from e
        return conn

    def _version(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.db_path} has schema version {version}, newer than this "
                             f"build's {SCHEMA_VERSION}: upgrade fedge")
        return version

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create or upgrade the schema in one transaction: all of it or, on any failure, none.

        The version is read again under the write lock: another process may
        have upgraded the file meanwhile.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            for version in range(self._version(conn) + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def close(self) -> None:
        """Close the database (idempotent); later calls raise :class:`StoreError`."""
        with self._lock, self._reader_lock:
            for conn in (self._conn, self._reader):
                if conn is not None:
                    conn.close()
            self._conn = self._reader = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock; turn database failures into :class:`StoreError` naming the file."""
        with self._lock:
            if self._conn is None:
                raise StoreError(f"the store {self.db_path} is closed")
            try:
                yield self._conn
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.db_path}: {e}") from e

    @contextmanager
    def _write(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; ``durable`` commits with synchronous=FULL."""
        with self._read() as conn:
            if durable:  # the level cannot change inside a transaction
                conn.execute("PRAGMA synchronous=FULL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:  # the body raised, or COMMIT failed
                    conn.execute("ROLLBACK")
                if durable:
                    conn.execute("PRAGMA synchronous=NORMAL")

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[Any]:
        with self._read() as conn:
            return conn.execute(sql, args).fetchall()

    def _exec(self, sql: str, args: Sequence[object]) -> None:
        with self._write() as conn:
            conn.execute(sql, args)

    # ---------------------------------------------------------------- meta and devices

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._exec("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def check_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` if absent, else insist it is unchanged.

        Raises:
            StoreError: ``key`` holds another value (say the config fingerprint
                of another task: resuming would mix two runs).
        """
        with self._write() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
            elif row[0] != value:
                raise StoreError(f"{self.db_path} was made with {key}={row[0]!r}, not {value!r}; "
                                 "start a different run in another data directory")

    def upsert_device(
        self, device_id: str, *, now: float, num_examples: int, profile: Mapping[str, ProfileValue]
    ) -> None:
        """Record that ``device_id`` checked in at ``now`` with this example count and profile.

        Enrolment and revocation are left as they are.
        """
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples!r}")
        self._exec(
            "INSERT INTO devices (device_id, first_seen, last_seen, num_examples, profile) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
            "last_seen = excluded.last_seen, num_examples = excluded.num_examples, "
            "profile = excluded.profile",
            (device_id, now, now, num_examples, json.dumps(dict(profile))),
        )

    def devices(self) -> list[DeviceRow]:
        """Every device, by id."""
        rows = self._query("SELECT device_id, first_seen, last_seen, num_examples, profile, enrolled_at, "
                           "revoked_at FROM devices ORDER BY device_id")
        return [DeviceRow(str(r[0]), float(r[1]), float(r[2]), int(r[3]), json.loads(r[4]),
                          _opt_float(r[5]), _opt_float(r[6])) for r in rows]

    # ---------------------------------------------------------------- identity: the admin token

    def set_admin_token_hash(self, token_hash: str) -> None:
        """Keep the sha256 (lowercase hex) of the admin token, replacing any earlier one.

        Raises:
            ValueError: ``token_hash`` is not 64 lowercase hex digits (say, the token itself).
        """
        _check_sha256(token_hash, "token_hash")
        with self._write(durable=True) as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_ADMIN_TOKEN_KEY, token_hash))

    def admin_token_hash(self) -> str | None:
        """The admin token's sha256, None before ``fedge ca init`` set one."""
        return self.get_meta(_ADMIN_TOKEN_KEY)

    # ---------------------------------------------------------------- identity: enrolment tokens

    def create_token(
        self, *, token_hash: str, expires_at: float, uses: int, device_id: str | None, now: float,
        note: str | None = None,
    ) -> None:
        """Keep a new enrolment token: its sha256 only, good for ``uses`` enrolments until ``expires_at``.

        A token with ``device_id`` enrols that id only (and may re-enrol it
        when revoked: see :meth:`enrol_device`).

        Raises:
            ValueError: ``token_hash`` is not 64 lowercase hex digits or is
                already known, ``uses < 1``, or ``expires_at <= now``.
        """
        _check_sha256(token_hash, "token_hash")
        if isinstance(uses, bool) or not isinstance(uses, int) or uses < 1:
            raise ValueError(f"uses must be an integer >= 1, got {uses!r}")
        if not expires_at > now:  # also refuses NaN
            raise ValueError(f"expires_at must be after now ({now!r}), got {expires_at!r}")
        with self._write(durable=True) as conn:
            try:
                conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                             (token_hash, now, expires_at, uses, device_id, note))
            except sqlite3.IntegrityError:
                raise ValueError(f"a token with hash {token_hash[:8]}... already exists") from None

    def consume_token(self, *, token_hash: str, device_id: str, now: float) -> None:
        """Spend one use of a token to enrol ``device_id``, in one write transaction.

        Concurrent calls (threads or processes) with a token of one use left
        give exactly one success.

        Raises:
            TokenError: ``unknown_token``, ``expired_token`` (``now >= expires_at``),
                ``used_token`` (no use left) or ``wrong_device`` (bound to
                another id); the token is then left unchanged.
        """
        with self._write(durable=True) as conn:
            row = conn.execute("SELECT expires_at, uses_left, device_id FROM tokens WHERE hash = ?",
                               (token_hash,)).fetchone()
            if row is None:
                raise TokenError("unknown_token")
            expires_at, uses_left, bound = row
            if not now < expires_at:
                raise TokenError("expired_token")
            if uses_left < 1:
                raise TokenError("used_token")
            if bound is not None and bound != device_id:
                raise TokenError("wrong_device")
            conn.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?", (token_hash,))

    def token_device(self, token_hash: str) -> str | None:
        """The device id a token is bound to; None if it is unbound or unknown."""
        rows = self._query("SELECT device_id FROM tokens WHERE hash = ?", (token_hash,))
        return None if not rows or rows[0][0] is None else str(rows[0][0])

    def token_refusal(self, *, token_hash: str, device_id: str, now: float) -> str | None:
        """Why ``consume_token`` would refuse this token now (a reason code), or None; changes nothing.

        Lets a caller refuse a bad token before it reveals anything else, and
        check other conditions before spending a use.
        """
        rows = self._query(
            "SELECT expires_at, uses_left, device_id FROM tokens WHERE hash = ?", (token_hash,)
        )
        if not rows:
            return "unknown_token"
        expires_at, uses_left, bound = rows[0]
        if now >= expires_at:
            return "expired_token"
        if uses_left < 1:
            return "used_token"
        if bound is not None and bound != device_id:
            return "wrong_device"
        return None

    def tokens(self, now: float) -> list[TokenRow]:
        """Every token, spent and expired ones included, oldest first."""
        rows = self._query("SELECT hash, expires_at, uses_left, device_id, created_at, note FROM tokens "
                           "ORDER BY created_at, hash")
        return [TokenRow(hash_prefix=str(h)[:8], expires_at=float(e), uses_left=int(u),
                         device_id=None if d is None else str(d), expired=not now < float(e),
                         created_at=float(c), note=None if n is None else str(n))
                for h, e, u, d, c, n in rows]

    # ---------------------------------------------------------------- identity: devices and certificates

    def enrol_device(self, device_id: str, *, now: float, allow_revoked: bool = False) -> None:
        """Record that ``device_id`` enrolled at ``now`` (a new device, or one enrolling again).

        A new device gets ``first_seen = last_seen = now``, 0 examples and an
        empty profile until it checks in. ``allow_revoked`` lifts a revocation
        (re-enrolling a revoked device is an admin's decision: a token bound
        to its id); the certificates revoked with it stay revoked.

        Raises:
            ValueError: the device is revoked and ``allow_revoked`` is False.
        """
        with self._write(durable=True) as conn:
            row = conn.execute("SELECT revoked_at FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO devices (device_id, first_seen, last_seen, num_examples, profile, "
                             "enrolled_at) VALUES (?, ?, ?, 0, '{}', ?)", (device_id, now, now, now))
                return
            if row[0] is not None and not allow_revoked:
                raise ValueError(f"device {device_id!r} is revoked; enrolling it again needs a token "
                                 "bound to its id")
            conn.execute("UPDATE devices SET enrolled_at = ?, revoked_at = NULL, "
                         "last_seen = MAX(last_seen, ?) WHERE device_id = ?", (now, now, device_id))

    def record_certificate(
        self, *, serial: str, device_id: str, fingerprint: str, not_before: float, not_after: float,
        issued_at: float,
    ) -> None:
        """Record a certificate issued to an enrolled device (``serial`` in hex, any case).

        A certificate recorded for a device that is revoked meanwhile is
        recorded as revoked at the same time, so lifting the revocation later
        cannot bring it to life.

        Raises:
            ValueError: ``serial`` is not 1 to 64 hex digits or is already
                recorded, ``not_after <= not_before``, or the device is unknown
                (call :meth:`enrol_device` first).
        """
        serial = serial.lower()
        if not _SERIAL_HEX.fullmatch(serial):
            raise ValueError(f"serial must be 1 to 64 hex digits, got {serial!r}")
        if not not_after > not_before:
            raise ValueError(f"not_after ({not_after!r}) must be after not_before ({not_before!r})")
        with self._write(durable=True) as conn:
            row = conn.execute("SELECT revoked_at FROM devices WHERE device_id = ?", (device_id,)).fetchone()
            if row is None:
                raise ValueError(f"unknown device {device_id!r}: enrol it before recording its certificate")
            try:
                conn.execute("INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (serial, device_id, fingerprint, not_before, not_after, issued_at, row[0]))
            except sqlite3.IntegrityError:
                raise ValueError(f"certificate serial {serial} is already recorded") from None

    def certificates(self, device_id: str | None = None) -> list[CertificateRow]:
        """Every recorded certificate (or those of ``device_id``), in issue order."""
        rows = self._query("SELECT serial, device_id, fingerprint, not_before, not_after, issued_at, "
                           "revoked_at FROM certificates WHERE ? IS NULL OR device_id = ? "
                           "ORDER BY issued_at, serial", (device_id, device_id))
        return [CertificateRow(str(r[0]), str(r[1]), str(r[2]), float(r[3]), float(r[4]), float(r[5]),
                               _opt_float(r[6])) for r in rows]

    def revoke_device(self, device_id: str, *, now: float) -> int:
        """Revoke a device and every certificate of it not yet revoked; return how many that was.

        Revoking a revoked device again keeps the first revocation time and
        returns 0 (unless certificates were recorded since).

        Raises:
            ValueError: the device is unknown.
        """
        with self._write(durable=True) as conn:
            cur = conn.execute("UPDATE devices SET revoked_at = COALESCE(revoked_at, ?) WHERE device_id = ?",
                               (now, device_id))
            if cur.rowcount == 0:
                raise ValueError(f"unknown device {device_id!r}")
            cur = conn.execute("UPDATE certificates SET revoked_at = ? WHERE device_id = ? "
                               "AND revoked_at IS NULL", (now, device_id))
            return int(cur.rowcount)

    def is_revoked(self, device_id: str, serial: str) -> bool:
        """Whether to refuse a request from ``device_id`` presenting certificate ``serial`` (hex).

        True if the device or the certificate is revoked, or if this store
        never recorded that serial for that device: a certificate this
        coordinator did not record is not trusted. One indexed read on a
        connection of its own, so it never waits for a write in progress
        and sees every revocation committed before it.
        """
        with self._reader_lock:
            if self._reader is None:
                raise StoreError(f"the store {self.db_path} is closed")
            try:
                row = self._reader.execute(_IS_REVOKED_SQL, (serial.lower(), device_id)).fetchone()
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.db_path}: {e}") from e
        return row is None or bool(row[0])

    # ---------------------------------------------------------------- rounds

    def open_round(
        self, round: int, *, cohort: Sequence[str], min_updates: int, opened_at: float, deadline_at: float
    ) -> int:
        """Open a new attempt of ``round``; return its number (1 + the highest ever recorded).

        Raises:
            ValueError: a round is open, or ``round`` is not the last complete one + 1.
        """
        with self._write() as conn:
            busy = conn.execute("SELECT round, attempt FROM rounds WHERE state = 'open'").fetchone()
            if busy is not None:
                raise ValueError(f"cannot open round {round}: round {busy[0]} attempt {busy[1]} is open")
            if round != _last_complete(conn) + 1:
                raise ValueError(f"cannot open round {round}: the next round is {_last_complete(conn) + 1}")
            last = conn.execute("SELECT MAX(attempt) FROM rounds WHERE round = ?", (round,)).fetchone()[0]
            attempt = 1 if last is None else int(last) + 1
            conn.execute(
                "INSERT INTO rounds (round, attempt, state, cohort, min_updates, opened_at, deadline_at) "
                "VALUES (?, ?, 'open', ?, ?, ?, ?)",
                (round, attempt, json.dumps(list(cohort)), min_updates, opened_at, deadline_at),
            )
        return attempt

    def record_update(
        self, round: int, attempt: int, device_id: str, *, digest: str, size_bytes: int,
        num_examples: int, received_at: float, metrics: Mapping[str, float],
    ) -> None:
        """Record a received update's digest and size (never its tensors).

        Raises:
            ValueError: the attempt is not open, or ``device_id`` already sent it an update.
        """
        with self._write() as conn:
            _require_open(conn, round, attempt, "record an update for")
            row = (round, attempt, device_id, digest, size_bytes, num_examples, received_at, _json(metrics))
            try:
                conn.execute("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError:
                raise ValueError(f"device {device_id!r} already sent an update to round {round} "
                                 f"attempt {attempt}") from None

    def updates(self, round: int, attempt: int) -> list[dict[str, object]]:
        """The updates recorded for one attempt, in arrival order."""
        with self._read() as conn:
            return _dicts(conn.execute("SELECT * FROM updates WHERE round = ? AND attempt = ? "
                                       "ORDER BY received_at, device_id", (round, attempt)))

    def record_metrics(
        self, round: int, attempt: int, device_id: str | None, *, kind: str, num_examples: int,
        metrics: Mapping[str, float], at: float,
    ) -> None:
        """Record metrics of ``kind`` ("eval" from a device, "central" with ``device_id`` None)."""
        self._exec("INSERT INTO metrics VALUES (NULL, ?, ?, ?, ?, ?, ?, ?)",
                   (round, attempt, device_id, kind, num_examples, _json(metrics), at))

    def metrics(
        self, round: int, attempt: int | None = None, kind: str | None = None
    ) -> list[dict[str, object]]:
        """Metrics rows of ``round`` (optionally of one attempt and one kind), in recording order."""
        with self._read() as conn:
            return _dicts(conn.execute(
                "SELECT round, attempt, device_id, kind, num_examples, metrics, at FROM metrics "
                "WHERE round = ? AND (? IS NULL OR attempt = ?) AND (? IS NULL OR kind = ?) ORDER BY id",
                (round, attempt, attempt, kind, kind),
            ))

    def record_refusal(self, *, code: str, device_id: str | None, round: int | None, at: float) -> None:
        """Count one refused request (``code`` is a key of :data:`fedge.wire.REFUSALS`)."""
        self._exec("INSERT INTO refusals VALUES (NULL, ?, ?, ?, ?)", (code, device_id, round, at))

    def record_events(
        self, device_id: str, events: Sequence[tuple[float, str, str, str, Mapping[str, object]]], *,
        received_at: float,
    ) -> None:
        """Store a device's batch of events, each (at, kind, level, message, fields), in one transaction."""
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO events VALUES (NULL, ?, ?, ?, ?, ?, ?, ?)",
                [(device_id, at, received_at, kind, level, message, json.dumps(dict(fields)))
                 for at, kind, level, message, fields in events],
            )

    def events(self, *, device_id: str | None = None, since: float | None = None,
               limit: int = 1000) -> list[EventRow]:
        """The latest ``limit`` events, newest last, optionally of one device and after ``since``."""
        where: list[str] = []
        args: list[object] = []
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if since is not None:
            where.append("received_at >= ?")
            args.append(since)
        sql = ("SELECT id, device_id, at, received_at, kind, level, message, fields FROM events"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?")
        rows = self._query(sql, (*args, int(limit)))
        return [EventRow(int(r[0]), str(r[1]), float(r[2]), float(r[3]), str(r[4]), str(r[5]), str(r[6]),
                         json.loads(r[7])) for r in reversed(rows)]

    def devices_version(self) -> tuple[int, float, float, float]:
        """Changes whenever a device is added, checks in (as stored), enrols or is revoked (for caches)."""
        row = self._query("SELECT COUNT(*), COALESCE(MAX(last_seen), 0), COALESCE(MAX(enrolled_at), 0), "
                          "COALESCE(MAX(revoked_at), 0) FROM devices")[0]
        return int(row[0]), float(row[1]), float(row[2]), float(row[3])

    def set_round_metric(self, round: int, attempt: int, name: str, value: float) -> None:
        """Add one metric to a round attempt's metrics (a timing known only after it was stored)."""
        with self._write() as conn:
            row = conn.execute("SELECT metrics FROM rounds WHERE round = ? AND attempt = ?",
                               (round, attempt)).fetchone()
            if row is None:
                raise ValueError(f"no round {round} attempt {attempt}")
            metrics = json.loads(row[0])
            metrics[name] = value
            conn.execute("UPDATE rounds SET metrics = ? WHERE round = ? AND attempt = ?",
                         (_json(metrics), round, attempt))
            self._metric_writes += 1

    def rounds_version(self) -> tuple[int, float, int]:
        """(attempts recorded, latest close, metrics added since): it changes whenever a round
        opens or ends or gains a metric (for caches)."""
        row = self._query("SELECT COUNT(*), COALESCE(MAX(closed_at), 0) FROM rounds")[0]
        return int(row[0]), float(row[1]), self._metric_writes

    def round_stats(self) -> RoundStats:
        """Counts for ``/metrics``, in one read transaction."""
        with self._read() as conn:
            by_state = {str(s): int(n) for s, n in
                        conn.execute("SELECT state, COUNT(*) FROM rounds GROUP BY state").fetchall()}
            durations = [float(d) for (d,) in conn.execute(
                "SELECT closed_at - opened_at FROM rounds WHERE state = 'complete'").fetchall()]
            updates = int(conn.execute("SELECT COUNT(*) FROM updates").fetchone()[0])
            events = int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            sums = conn.execute(
                "SELECT " + ", ".join(f"TOTAL(json_extract(metrics, '$.phase_{p}_s'))" for p in PHASES)
                + " FROM rounds WHERE state = 'complete'"
            ).fetchone()
            up, down = conn.execute(
                "SELECT TOTAL(CASE WHEN j.key LIKE 'up:%' THEN j.value END), "
                "TOTAL(CASE WHEN j.key LIKE 'down:%' THEN j.value END) "
                "FROM metrics AS m, json_each(m.metrics) AS j WHERE m.kind = 'traffic'"
            ).fetchone()
            secure = conn.execute(
                "SELECT " + ", ".join(f"TOTAL(json_extract(metrics, '$.secagg_{what}_{p}'))"
                                      for what in ("dropped", "aborted") for p in SECAGG_PHASES)
                + " FROM rounds WHERE state IN ('complete', 'abandoned')"
            ).fetchone()
        phases = dict(zip(PHASES, map(float, sums), strict=True))
        n = len(SECAGG_PHASES)
        return RoundStats(by_state, durations, updates, events, phases, float(up), float(down),
                          dict(zip(SECAGG_PHASES, map(float, secure[:n]), strict=True)),
                          dict(zip(SECAGG_PHASES, map(float, secure[n:]), strict=True)))

    def refusal_counts(self) -> dict[str, int]:
        rows = self._query("SELECT code, COUNT(*) FROM refusals GROUP BY code ORDER BY code")
        return {str(code): int(n) for code, n in rows}

    def abandon_round(
        self, round: int, attempt: int, *, closed_at: float, reported: Sequence[str], dropped: Sequence[str],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Close an open attempt without a result (too few updates by the deadline); ``metrics``,
        if given, are kept with it (a secure round's dropouts by phase).

        Raises:
            ValueError: the attempt is not open.
        """
        with self._write() as conn:
            _require_open(conn, round, attempt, "abandon")
            conn.execute(
                "UPDATE rounds SET state = 'abandoned', closed_at = ?, reported = ?, dropped = ?, "
                "metrics = ? WHERE round = ? AND attempt = ?",
                (closed_at, json.dumps(list(reported)), json.dumps(list(dropped)), _json(metrics or {}),
                 round, attempt),
            )

    def complete_round(
        self, round: int, attempt: int, state: ServerState, *, closed_at: float,
        reported: Sequence[str], dropped: Sequence[str], metrics: Mapping[str, float],
        privacy: LedgerEntry | None = None,
    ) -> Path:
        """Write ``state``'s checkpoint durably, then mark the attempt complete; return the file.

        ``privacy`` (the round's privacy cost) goes into the ledger in the
        same transaction that marks the round complete.

        Raises:
            ValueError: the attempt is not open, ``state.round != round``, or a
                param or optimizer slot name is reserved or inconsistent.
            StoreError: the checkpoint cannot be written.
        """
        with self._write(durable=True) as conn:
            _require_open(conn, round, attempt, "complete")
            if state.round != round:
                raise ValueError(f"cannot complete round {round} with the state of round {state.round}")
            data = _encode_checkpoint(state)
            name = f"{_CHECKPOINTS}/round-{round:06d}.safetensors"
            path = self.data_dir / name
            try:  # the file first, then the row that vouches for it (see the module docstring)
                atomic_write(path, data)
            except OSError as e:
                raise StoreError(f"cannot write checkpoint {path}: {e}") from e
            conn.execute(
                "UPDATE rounds SET state = 'complete', closed_at = ?, reported = ?, dropped = ?, "
                "checkpoint = ?, checkpoint_sha256 = ?, metrics = ? WHERE round = ? AND attempt = ?",
                (closed_at, json.dumps(list(reported)), json.dumps(list(dropped)), name,
                 hashlib.sha256(data).hexdigest(), _json(metrics), round, attempt),
            )
            if privacy is not None:
                if privacy.round != round:
                    raise ValueError(f"the privacy entry is for round {privacy.round}, not {round}")
                conn.execute(
                    "INSERT INTO privacy_ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (round, attempt, privacy.mode, privacy.noise_multiplier, privacy.sampling,
                     privacy.sample_rate, privacy.population, privacy.cohort, privacy.clip_norm,
                     privacy.next_clip_norm, privacy.epsilon, privacy.delta, closed_at),
                )
        return path

    def privacy_ledger(self) -> list[LedgerEntry]:
        """Every round's privacy cost, by round."""
        rows = self._query("SELECT round, mode, noise_multiplier, sampling, sample_rate, population, "
                           "cohort, clip_norm, next_clip_norm, epsilon, delta FROM privacy_ledger "
                           "ORDER BY round")
        return [LedgerEntry(int(r[0]), str(r[1]), float(r[2]), str(r[3]), float(r[4]),
                          None if r[5] is None else int(r[5]), None if r[6] is None else int(r[6]),
                          float(r[7]), float(r[8]), float(r[9]), float(r[10])) for r in rows]

    def interrupt_open_rounds(self, *, at: float) -> list[tuple[int, int]]:
        """Mark every open attempt interrupted (call at startup); return their (round, attempt)."""
        with self._write() as conn:
            rows = conn.execute("SELECT round, attempt FROM rounds WHERE state = 'open'").fetchall()
            conn.execute("UPDATE rounds SET state = 'interrupted', closed_at = ? WHERE state = 'open'", (at,))
        return [(int(r), int(a)) for r, a in rows]

    def last_complete_round(self) -> int:
        """The highest complete round, 0 if none (a checkpoint file without its row does not count)."""
        with self._read() as conn:
            return _last_complete(conn)

    def load_checkpoint(self, round: int) -> ServerState:
        """The state saved when ``round`` completed, checked against the sha256 recorded then.

        Raises:
            ValueError: ``round`` has no complete attempt.
            StoreError: the file is missing, altered or malformed.
        """
        rows = self._query("SELECT checkpoint, checkpoint_sha256 FROM rounds "
                           "WHERE round = ? AND state = 'complete'", (round,))
        if not rows:
            raise ValueError(f"round {round} has no complete attempt, so no checkpoint")
        path = self.data_dir / str(rows[0][0])
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StoreError(f"checkpoint of round {round} cannot be read: {path}: {e.strerror}") from e
        if hashlib.sha256(data).hexdigest() != rows[0][1]:
            raise StoreError(f"checkpoint {path} differs from the one written when round {round} completed")
        state = _decode_checkpoint(data, path)
        if state.round != round:
            raise StoreError(f"checkpoint {path} holds round {state.round}, not {round}")
        return state

    def rounds(self) -> list[RoundRow]:
        """Every attempt of every round, by (round, attempt)."""
        return [_round_row(r) for r in self._query("SELECT * FROM rounds ORDER BY round, attempt")]

    def round_row(self, round: int, attempt: int) -> RoundRow | None:
        rows = self._query("SELECT * FROM rounds WHERE round = ? AND attempt = ?", (round, attempt))
        return _round_row(rows[0]) if rows else None


def _round_row(r: Sequence[Any]) -> RoundRow:
    """A ``SELECT *`` row of ``rounds`` (column 11, the checkpoint's sha256, stays private)."""
    return RoundRow(
        round=int(r[0]), attempt=int(r[1]), state=str(r[2]), cohort=tuple(json.loads(r[3])),
        min_updates=int(r[4]), opened_at=float(r[5]), deadline_at=float(r[6]),
        closed_at=None if r[7] is None else float(r[7]), reported=tuple(json.loads(r[8])),
        dropped=tuple(json.loads(r[9])), checkpoint=r[10], metrics=json.loads(r[12]),
    )


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _check_sha256(value: str, name: str) -> None:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise ValueError(f"{name} must be a sha256 in 64 lowercase hex digits, never the secret itself")


def _last_complete(conn: sqlite3.Connection) -> int:
    value = conn.execute("SELECT MAX(round) FROM rounds WHERE state = 'complete'").fetchone()[0]
    return 0 if value is None else int(value)


def _require_open(conn: sqlite3.Connection, round: int, attempt: int, verb: str) -> None:
    sql = "SELECT state FROM rounds WHERE round = ? AND attempt = ?"
    row = conn.execute(sql, (round, attempt)).fetchone()
    if row is None or row[0] != "open":
        why = "no such attempt" if row is None else f"it is {row[0]}"
        raise ValueError(f"cannot {verb} round {round} attempt {attempt}: {why}")


def _json(metrics: Mapping[str, float]) -> str:
    return json.dumps({str(k): float(v) for k, v in metrics.items()})


def _dicts(cur: sqlite3.Cursor) -> list[dict[str, object]]:
    names = [d[0] for d in cur.description]
    rows: list[dict[str, object]] = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    for d in rows:
        d["metrics"] = json.loads(str(d["metrics"]))
    return rows


def _make_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents, all with mode 0700 (``Path.mkdir(parents=True)``
    would give the parents the default mode), and sync each new entry into its parent."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    if not missing and not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    for p in reversed(missing):
        p.mkdir(mode=0o700)
        _fsync_dir(p.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync it, rename it to ``path``, fsync the directory.

    A reader (or a restart after a crash) sees the old file or the new one,
    never a torn one.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)  # makes the rename itself durable


def _encode_checkpoint(state: ServerState) -> bytes:
    """One plain safetensors file: params by name, optimizer slots as ``__opt__/<slot>/<name>``."""
    from safetensors.numpy import save

    names = list(state.params)
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name, x in state.params.items():
        if name.startswith(_OPT_PREFIX) or name == "__metadata__":
            raise ValueError(f"param name {name!r} is reserved in checkpoints")
        tensors[name] = np.asarray(x, order="C")
    for slot, values in state.opt_state.items():
        if not slot or "/" in slot:
            raise ValueError(f"optimizer slot name {slot!r} must be non-empty and hold no '/'")
        if values.keys() != state.params.keys():
            raise ValueError(f"optimizer slot {slot!r} does not hold the same tensor names as params")
        tensors.update({f"{_OPT_PREFIX}{slot}/{k}": np.asarray(values[k], order="C") for k in names})
    metadata = {"fedge.round": str(state.round), "fedge.params": json.dumps(names),
                "fedge.opt_slots": json.dumps(list(state.opt_state))}
    return bytes(save(tensors, metadata=metadata))


def _decode_checkpoint(data: bytes, path: Path) -> ServerState:
    """Inverse of :func:`_encode_checkpoint`, restoring the order of params and slots."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        (n,) = struct.unpack_from("<Q", data)
        metadata = json.loads(data[8 : 8 + n])["__metadata__"]
        names = [str(k) for k in json.loads(metadata["fedge.params"])]
        slots = [str(s) for s in json.loads(metadata["fedge.opt_slots"])]
        tensors = load(data)  # fresh, writable arrays
        params: Params = {k: tensors.pop(k) for k in names}
        opt_state = {s: {k: tensors.pop(f"{_OPT_PREFIX}{s}/{k}") for k in names} for s in slots}
        state = ServerState(params=params, opt_state=opt_state, round=int(metadata["fedge.round"]))
    except (struct.error, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise StoreError(f"checkpoint {path} is malformed: {e!r}") from e
    if tensors:
        raise StoreError(f"checkpoint {path} holds unexpected tensors {sorted(tensors)}")
    return state
