"""Backups, dry restores, retention, compaction, the restore test and the integrity check, as flows,
on a real SQLite store filled from the simulator."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flow_kit import artifacts_of, flow_run_events, wait_for_messages

import flows.daily as daily
import flows.maintenance as maintenance
from crypto_agent import backup
from crypto_agent.receiver import Receiver
from crypto_agent.settings import load_settings
from crypto_agent.simulator import Simulator
from flows.events import STORE_CORRUPT, STORE_OK, STORE_STORAGE_HIGH

PROJECT_DIR = Path(__file__).resolve().parents[2]

Settings = Callable[..., dict[str, Any]]


@pytest.fixture
def filled(simulator: Simulator, settings_for: Settings) -> dict[str, Any]:
    """Settings of a store in tmp_path filled by the data-update flow (60 days, 3 symbols), no backup yet."""
    settings = settings_for(simulator)
    # these tests take their own backups on chosen days: no first backup of the update's own (issue 10)
    daily.data_update(settings=settings, first_backup=False)
    return settings


def db_path(settings: dict[str, Any]) -> Path:
    return load_settings(**settings).db_path


def backup_dir(settings: dict[str, Any]) -> Path:
    return load_settings(**settings).backup_dir


def rows(path: Path, table: str, where: str = "") -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table} {where}").fetchone()[0])
    finally:
        conn.close()


def corrupt_middle_page(path: Path) -> None:
    """Overwrite the start of a page in the middle of a SQLite file (after folding the WAL in)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()
    with path.open("r+b") as f:
        f.seek((pages // 2 - 1) * page_size)
        f.write(b"\xff" * 64)


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from crypto_agent.store import Store

    db, stop = sys.argv[1], Path(sys.argv[2])
    store = Store(f"sqlite:///{db}")
    written, t = 0, 0
    while not stop.exists():
        batch = [(t + i * 3_600_000, 1.0, 2.0, 0.5, 1.5, 10.0, t + i * 3_600_000 + 3_599_999, 15.0, 3)
                 for i in range(50)]
        written += store.upsert_candles("WRITERUSDT", "1h", batch)
        t += 50 * 3_600_000
        print(written, flush=True)
    store.close()
    """
)


class TestBackup:
    def test_a_backup_taken_while_a_writer_writes_is_consistent_and_passes_its_dry_restore(
        self, filled: dict[str, Any], tmp_path: Path
    ) -> None:
        db = db_path(filled)
        stop = tmp_path / "stop-writer"
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(stop)], cwd=PROJECT_DIR,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert writer.stdout is not None
            first = int(writer.stdout.readline())  # the writer is writing
            before = rows(db, "ohlcv_h1", "WHERE symbol = 'WRITERUSDT'")

            state = maintenance.backup_flow(settings=filled, return_state=True)

            # it goes on writing after the backup
            while rows(db, "ohlcv_h1", "WHERE symbol = 'WRITERUSDT'") < before + 500:
                assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
                time.sleep(0.05)
        finally:
            stop.write_text("stop")
            _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert first > 0
        assert state.is_completed(), state.message
        result = state.result()
        info = backup.backup_info(result["backup"])
        assert info.status == backup.GOOD
        assert info.name == f"db_backup_{datetime.now(UTC):%Y%m%d}.db"
        # a snapshot: whole batches of the writer, between what was there before and after
        in_backup = rows(Path(result["backup"]), "ohlcv_h1", "WHERE symbol = 'WRITERUSDT'")
        assert before <= in_backup <= rows(db, "ohlcv_h1", "WHERE symbol = 'WRITERUSDT'")
        assert in_backup % 50 == 0
        assert info.tables["ohlcv_h1"] == rows(Path(result["backup"]), "ohlcv_h1") == result["tables"]["ohlcv_h1"]
        [table] = artifacts_of(state.state_details.flow_run_id, "backups")
        assert [r["backup"] for r in table] == [info.name] and table[0]["status"] == "good"

    def test_retention_after_a_good_backup_keeps_what_the_policy_says(self, filled: dict[str, Any]) -> None:
        settings = {**filled, "backup_keep_daily": 2, "backup_keep_weekly": 0, "backup_keep_monthly": 0}
        today = datetime.now(UTC)
        for days_ago in (4, 3, 2, 1, 0):
            result = maintenance.backup_flow(settings=settings, now=today - timedelta(days=days_ago))
        kept = sorted(b.day for b in backup.list_backups(backup_dir(settings)))
        assert kept == [(today - timedelta(days=1)).date(), today.date()]
        assert len(result["removed"]) == 1  # each run removed the one that fell out of the window

    def test_a_missing_database_fails_the_backup_and_tells_l1(self, settings_for: Settings, inbox: Receiver) -> None:
        state = maintenance.backup_flow(settings=settings_for(), return_state=True)
        assert state.is_failed()
        assert "database not found" in (state.message or "")
        [message] = wait_for_messages(inbox, "/l1")
        assert message["body"]["subject"] == "[crypto-agent] backup failed"


class TestRestoreTest:
    def test_yesterdays_good_backup_passes(self, filled: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        maintenance.backup_flow(settings=filled, now=now - timedelta(days=1))
        message = maintenance.backup_restore_test(settings=filled, now=now)
        assert message.startswith("✅ Backup test passed")
        assert f"(rows={rows(db_path(filled), 'ohlcv_h4')})" in message

    def test_a_corrupted_backup_is_detected_marked_bad_and_never_chosen(
        self, filled: dict[str, Any], inbox: Receiver
    ) -> None:
        now = datetime.now(UTC)
        older = maintenance.backup_flow(settings=filled, now=now - timedelta(days=2))
        newest = maintenance.backup_flow(settings=filled, now=now - timedelta(days=1))
        corrupt_middle_page(Path(newest["backup"]))

        state = maintenance.backup_restore_test(settings=filled, now=now, return_state=True)

        assert state.is_failed()
        assert "Backup corrupted" in (state.message or "")
        assert backup.backup_info(newest["backup"]).status == backup.BAD
        chosen = backup.choose_backup(backup_dir(filled))
        assert str(chosen.path) == older["backup"]
        assert wait_for_messages(inbox, "/l1")

    def test_no_backup_from_yesterday_fails(self, settings_for: Settings) -> None:
        state = maintenance.backup_restore_test(settings=settings_for(), return_state=True)
        assert state.is_failed()
        assert "Backup not found" in (state.message or "")


class TestCompact:
    def test_vacuum_gives_back_the_space_of_deleted_rows(self, filled: dict[str, Any]) -> None:
        db = db_path(filled)
        conn = sqlite3.connect(db)
        conn.execute("DELETE FROM ohlcv_h1 WHERE symbol = 'BTCUSDT'")
        conn.commit()
        conn.close()
        result = maintenance.compact_flow(settings=filled)
        assert result["size_after"] < result["size_before"]
        assert result["over_limit"] is False
        assert not (db.parent / "LOCKED").exists()

    def test_over_the_storage_limit_alerts_and_emits_storage_high(
        self, filled: dict[str, Any], inbox: Receiver
    ) -> None:
        state = maintenance.compact_flow(settings=filled, max_gb=0.000001, return_state=True)
        assert state.is_failed()
        assert "over the" in (state.message or "")
        [event] = flow_run_events(state.state_details.flow_run_id, STORE_STORAGE_HIGH)
        assert event.payload["over_limit"] is True and event.payload["limit_bytes"] == 1000
        assert wait_for_messages(inbox, "/l1")


class TestIntegrityCheck:
    @pytest.mark.parametrize("full", [False, True])
    def test_a_sound_store_passes_and_emits_ok(self, filled: dict[str, Any], full: bool) -> None:
        state = maintenance.integrity_check(settings=filled, full=full, return_state=True)
        assert state.is_completed(), state.message
        assert state.result()["mode"] == ("integrity_check" if full else "quick_check")
        [event] = flow_run_events(state.state_details.flow_run_id, STORE_OK)
        assert event.payload["check"] == state.result()["mode"]

    def test_a_corrupted_page_fails_the_check_and_emits_corrupt_with_the_problems(
        self, filled: dict[str, Any], inbox: Receiver
    ) -> None:
        db = db_path(filled)
        corrupt_middle_page(db)

        state = maintenance.integrity_check(settings=filled, return_state=True)

        assert state.is_failed()
        [event] = flow_run_events(state.state_details.flow_run_id, STORE_CORRUPT)
        assert event.resource.id == "crypto-agent.store.main"
        assert event.payload["mode"] == "quick_check"
        assert event.payload["problems"] and event.payload["db_path"] == str(db)
        assert "malformed" in " ".join(event.payload["problems"]) or event.payload["problems_total"] > 0
        [message] = wait_for_messages(inbox, "/l1")
        assert message["body"]["subject"] == "[crypto-agent] integrity-check failed"
