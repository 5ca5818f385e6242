"""The store's privacy ledger (schema version 3): migration, and one transaction with the round."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedge.privacy.accounting import LedgerEntry
from fedge.store import SCHEMA_VERSION, Store
from fedge.strategies.base import ServerState


def entry(round_id: int, epsilon: float = 1.0) -> LedgerEntry:
    return LedgerEntry(round=round_id, mode="central", noise_multiplier=1.1, sampling="full", sample_rate=1.0,
                     population=None, cohort=None, clip_norm=0.5, next_clip_norm=0.45, epsilon=epsilon,
                     delta=1e-5)


def complete(store: Store, round_id: int, privacy: LedgerEntry | None) -> None:
    attempt = store.open_round(round_id, cohort=["a"], min_updates=1, opened_at=1.0, deadline_at=9.0)
    state = ServerState(params={"w": np.zeros(2, dtype=np.float32)}, round=round_id)
    store.complete_round(round_id, attempt, state, closed_at=2.0, reported=["a"], dropped=[], metrics={},
                         privacy=privacy)


def test_the_ledger_is_written_with_the_round(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        complete(store, 1, entry(1, 0.5))
        complete(store, 2, entry(2, 0.8))
        complete(store, 3, None)  # a round without DP leaves no ledger row
        assert store.privacy_ledger() == [entry(1, 0.5), entry(2, 0.8)]
    with Store(tmp_path) as store:  # durable across a restart
        assert [row.epsilon for row in store.privacy_ledger()] == [0.5, 0.8]


def test_a_bad_entry_leaves_the_round_open(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        attempt = store.open_round(1, cohort=["a"], min_updates=1, opened_at=1.0, deadline_at=9.0)
        state = ServerState(params={"w": np.zeros(2, dtype=np.float32)}, round=1)
        with pytest.raises(ValueError, match="privacy entry is for round 7"):
            store.complete_round(1, attempt, state, closed_at=2.0, reported=["a"], dropped=[], metrics={},
                                 privacy=entry(7))
        # One transaction: neither the round nor its cost was recorded.
        assert store.last_complete_round() == 0
        assert store.privacy_ledger() == []
        assert store.round_row(1, attempt) is not None
        assert store.round_row(1, attempt).state == "open"  # type: ignore[union-attr]


def test_a_version_2_store_gains_the_ledger(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 4
    with Store(tmp_path) as store:
        complete(store, 1, None)
    with contextlib.closing(sqlite3.connect(tmp_path / "fedge.db")) as conn, conn:
        conn.execute("DROP TABLE privacy_ledger")  # what a version-2 build left
        conn.execute("DROP TABLE events")
        conn.execute("PRAGMA user_version=2")
    with Store(tmp_path) as store:
        assert store.last_complete_round() == 1
        assert store.privacy_ledger() == []
        complete(store, 2, entry(2))
        assert store.privacy_ledger() == [entry(2)]
    with contextlib.closing(sqlite3.connect(tmp_path / "fedge.db")) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
