"""The store's recovery lock (`<db folder>/LOCKED`): the one module every writer and recovery uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crypto_agent.errors import CryptoAgentError, StoreLocked
from crypto_agent.storelock import (
    RecoveryLocked,
    describe_holder,
    is_locked,
    lock_holder,
    lock_name,
    lock_path,
    locked_error,
    recovery_lock,
)


class TestLockFile:
    def test_the_lock_is_LOCKED_beside_the_database(self, tmp_path: Path) -> None:
        assert lock_path(tmp_path / "db" / "crypto.db") == tmp_path / "db" / "LOCKED"
        assert lock_name(None) == "LOCKED"

    def test_a_store_without_a_file_is_never_locked(self) -> None:
        assert is_locked(None) is False

    def test_any_file_locks_even_an_empty_one(self, tmp_path: Path) -> None:
        db = tmp_path / "crypto.db"
        assert not is_locked(db) and lock_holder(db) is None and describe_holder(db) == "released"
        lock_path(db).touch()
        assert is_locked(db) and lock_holder(db) == {}
        assert "unknown owner" in describe_holder(db)

    def test_plain_text_owner_is_read_as_the_owner(self, tmp_path: Path) -> None:
        db = tmp_path / "crypto.db"
        lock_path(db).write_text("recover-db-corruption")
        assert lock_holder(db) == {"owner": "recover-db-corruption"}


class TestRecoveryLock:
    def test_holder_is_written_and_removed(self, tmp_path: Path) -> None:
        db = tmp_path / "crypto.db"
        with recovery_lock(db, "compact-store") as path:
            assert path == lock_path(db) and is_locked(db)
            holder = json.loads(path.read_text())
            assert holder["owner"] == "compact-store" and isinstance(holder["pid"], int)
            assert describe_holder(db).startswith("held by compact-store, pid ")
        assert not is_locked(db)

    def test_someone_else_is_refused_with_a_store_locked_error(self, tmp_path: Path) -> None:
        db = tmp_path / "crypto.db"
        with recovery_lock(db, "a"), pytest.raises(RecoveryLocked, match="held by a") as exc, recovery_lock(db, "b"):
            pass
        assert isinstance(exc.value, StoreLocked) and isinstance(exc.value, CryptoAgentError)

    def test_an_owner_name_is_required(self, tmp_path: Path) -> None:
        with pytest.raises(CryptoAgentError, match="needs an owner"), recovery_lock(tmp_path / "x.db", " "):
            pass


def test_writers_error_says_what_was_not_written_and_what_to_do(tmp_path: Path) -> None:
    err = locked_error(tmp_path / "crypto.db", "nothing was written", "run again")
    assert isinstance(err, StoreLocked)
    assert err.message == f"the store is locked by a recovery ({tmp_path / 'LOCKED'} exists); nothing was written"
    assert err.hint == "wait for the recovery to finish (it removes the file), then run again"
