"""Backups on real SQLite files and real processes: online and consistent, verified, chosen, retained, restored."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from crypto_agent import backup, storelock
from crypto_agent.backup import (
    BackupError,
    NoGoodBackup,
    RestoreRefused,
    RetentionPolicy,
)
from crypto_agent.errors import CryptoAgentError, StoreLocked
from crypto_agent.store import Candle, Store
from crypto_agent.storelock import RecoveryLocked

HOUR = 3_600_000
T0 = 1_790_000_000_000 // (4 * HOUR) * (4 * HOUR)
NOW = datetime(2026, 3, 15, 3, 0, tzinfo=UTC)  # a Sunday, 03:00 UTC: the weekly backup slot


def candles(n: int, step: int, start: int = T0, price: float = 100.0) -> list[Candle]:
    """n consecutive candles `step` ms apart, values depending on their index."""
    return [(start + i * step, price + i, price + i + 1, price + i - 1, price + i + 0.5, 10.0 + i,
             start + (i + 1) * step - 1, (10.0 + i) * price, 100 + i) for i in range(n)]


def make_db(path: Path, h4_per_symbol: int = 600, h1_per_symbol: int = 300, symbols: int = 2) -> Path:
    """A closed store with symbols x rows H4 and H1 candles (defaults: 1,200 H4 rows, as the restore test wants)."""
    store = Store(f"sqlite:///{path}")
    for i in range(symbols):
        sym = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")[i]
        store.upsert_candles(sym, "4h", candles(h4_per_symbol, 4 * HOUR, price=100.0 * (i + 1)))
        store.upsert_candles(sym, "1h", candles(h1_per_symbol, HOUR, price=100.0 * (i + 1)))
    store.close()
    return path


def count(path: Path, table: str, where: str = "") -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table} {where}").fetchone()[0]
    finally:
        conn.close()


def corrupt_middle(path: Path, length: int = 8192) -> None:
    """Overwrite bytes in the middle of a file, as a bad disk sector would."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(b"\xa5" * length)


def leftovers(folder: Path) -> list[str]:
    """Temporary or scratch files left in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".dry-restore-" in p.name
                  or ".restore-test-" in p.name)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    (tmp_path / "db").mkdir()
    return make_db(tmp_path / "db" / "crypto_agent.db")


@pytest.fixture
def bdir(tmp_path: Path) -> Path:
    return tmp_path / "backups"


# A writer that inserts one candle per transaction until told to stop, like the collector; it
# prints how many it wrote and exits non-zero if any insert failed.
WRITER = r"""
import os, sqlite3, sys, time
db, stop, ready = sys.argv[1:4]
conn = sqlite3.connect(db, timeout=60, isolation_level=None)
conn.execute("PRAGMA busy_timeout=60000")
t = 4_000_000_000_000
n = 0
while not os.path.exists(stop):
    conn.execute("INSERT INTO ohlcv_h1 VALUES ('WRITERUSDT', ?, 1, 1, 1, 1, 1, ?, 1, 1)", (t, t + 3599999))
    n += 1
    t += 3_600_000
    if n == 20:
        open(ready, "w").close()
    time.sleep(0.001)
print(n)
"""


class TestCreate:
    def test_backup_during_writes_is_consistent_and_the_writer_never_fails(self, tmp_path, bdir):
        # big enough (about 6 MB) that the copy and its checks take a while the writer keeps writing
        db = make_db(tmp_path / "crypto_agent.db", h4_per_symbol=600, h1_per_symbol=40_000)
        stop, ready = tmp_path / "stop", tmp_path / "ready"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(stop), str(ready)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                assert writer.poll() is None, writer.stderr.read()
                assert time.monotonic() < deadline, "the writer never started"
                time.sleep(0.01)
            before = count(db, "ohlcv_h1", "WHERE symbol='WRITERUSDT'")
            info = backup.create(db, bdir, now=NOW)
            after = count(db, "ohlcv_h1", "WHERE symbol='WRITERUSDT'")
            while count(db, "ohlcv_h1", "WHERE symbol='WRITERUSDT'") <= after:  # it still writes after the backup
                assert writer.poll() is None, writer.stderr.read()
                time.sleep(0.01)
        finally:
            stop.touch()
            out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        assert int(out) > after
        assert info.status == backup.GOOD and info.path == bdir / "db_backup_20260315.db"
        in_backup = count(info.path, "ohlcv_h1", "WHERE symbol='WRITERUSDT'")
        assert before <= in_backup <= after
        assert info.tables["ohlcv_h1"] == count(info.path, "ohlcv_h1") == 80_000 + in_backup
        assert info.tables["ohlcv_h4"] == 1200
        conn = sqlite3.connect(f"file:{info.path}?mode=ro", uri=True)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # a plain file, no -wal beside it
        conn.close()

    def test_manifest_describes_the_file(self, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        manifest = json.loads(info.manifest_path.read_text())
        assert info.manifest_path.name == "db_backup_20260315.json"
        assert manifest["size"] == info.path.stat().st_size
        assert manifest["sha256"] == backup.file_sha256(info.path)[0]
        assert manifest["tables"]["ohlcv_h4"] == 1200 and manifest["tables"]["ohlcv_h1"] == 600
        assert manifest["status"] == "good" and manifest["problems"] == []
        assert manifest["source"] == str(db.resolve())
        assert manifest["created_at"].startswith("2026-03-15T03:00")
        assert leftovers(bdir) == []

    def test_no_verify_leaves_it_unverified(self, db, bdir):
        info = backup.create(db, bdir, now=NOW, verify=False)
        assert info.status == backup.UNVERIFIED
        assert backup.dry_restore(info.path).ok
        assert backup.backup_info(info.path).status == backup.GOOD

    def test_a_source_that_is_not_a_database_is_refused_and_nothing_is_written(self, tmp_path, bdir):
        fake = tmp_path / "notes.db"
        fake.write_text("this is not a database\n" * 100)
        with pytest.raises(BackupError, match="not a SQLite database"):
            backup.create(fake, bdir, now=NOW)
        assert not bdir.exists() or [p for p in bdir.iterdir() if p.name != ".backup.lock"] == []

    def test_a_missing_database_is_a_clear_error(self, tmp_path, bdir):
        with pytest.raises(BackupError, match="database not found") as exc:
            backup.create(tmp_path / "nope.db", bdir, now=NOW)
        assert exc.value.hint

    def test_a_damaged_source_fails_its_check_and_the_temp_file_is_removed(self, tmp_path, bdir):
        src = make_db(tmp_path / "src.db", h4_per_symbol=3000, symbols=2)
        corrupt_middle(src)
        with pytest.raises(BackupError, match="integrity check"):
            backup.create(src, bdir, now=NOW)
        assert sorted(p.name for p in bdir.iterdir()) == [".backup.lock"]  # neither temp nor backup

    def test_a_rename_that_fails_removes_the_temp_file(self, db, bdir):
        blocker = bdir / "db_backup_20260315.db"
        blocker.mkdir(parents=True)
        (blocker / "keep").write_text("x")  # a non-empty folder where the backup should go
        with pytest.raises(BackupError, match="failed"):
            backup.create(db, bdir, now=NOW)
        assert leftovers(bdir) == []
        assert (blocker / "keep").exists()

    def test_a_second_backup_of_the_day_replaces_the_first(self, db, bdir):
        first = backup.create(db, bdir, now=NOW)
        store = Store(f"sqlite:///{db}")
        store.upsert_candles("SOLUSDT", "4h", candles(10, 4 * HOUR))
        store.close()
        second = backup.create(db, bdir, now=NOW + timedelta(hours=2))
        assert second.path == first.path and second.tables["ohlcv_h4"] == 1210
        assert [b.name for b in backup.list_backups(bdir)] == ["db_backup_20260315.db"]

    def test_refused_while_a_recovery_holds_the_lock(self, db, bdir):
        with storelock.recovery_lock(db, "recover-db-corruption"), \
                pytest.raises(RecoveryLocked, match="recover-db-corruption"):
            backup.create(db, bdir, now=NOW)
        assert not bdir.exists() or not list(bdir.glob("db_backup_*"))


def overwrite_page(path: Path) -> None:
    """Write garbage over one whole page in the middle of a database file, as a bad sector would."""
    with open(path, "rb") as f:
        header = f.read(100)
    page_size = int.from_bytes(header[16:18], "big")
    pages = path.stat().st_size // page_size
    with open(path, "r+b") as f:
        f.seek(pages // 2 * page_size)
        f.write(b"\x5a" * page_size)


CHEAP = "copy+sha256+header+size+schema+counts"


class TestCheapVerification:
    """create() marks a backup good on checks of the hot copy; the full check is the drill's (dry_restore)."""

    def test_a_backup_of_a_real_store_is_good_and_restorable_without_a_full_check(self, tmp_path, db, bdir):
        info = backup.create(db, bdir, now=NOW, quick_check_max_bytes=0)
        assert info.status == backup.GOOD and info.verified == CHEAP and info.full_check_at is None
        assert info.tables["ohlcv_h4"] == 1200 and info.tables["ohlcv_h1"] == 600
        assert backup.choose_backup(bdir).path == info.path
        target = tmp_path / "restored" / "crypto_agent.db"
        result = backup.restore(info.path, target, tmp_path / "quarantine")
        assert count(target, "ohlcv_h4") == 1200 and count(target, "ohlcv_h1") == 600
        assert result.tables == info.tables

    def test_the_drill_records_when_the_full_check_last_passed(self, db, bdir):
        info = backup.create(db, bdir, now=NOW, quick_check_max_bytes=0)
        result = backup.dry_restore(info.path)
        assert result.ok
        after = backup.backup_info(info.path)
        manifest = json.loads(info.manifest_path.read_text())
        assert after.status == backup.GOOD and after.full_check_at is not None
        assert manifest["full_check"] == backup.FULL_CHECK and manifest["verified"] == CHEAP
        assert after.to_dict()["full_check_at"] == manifest["full_check_at"]

    def test_the_manifest_says_what_was_verified(self, tmp_path, db, bdir):
        small = backup.create(db, bdir, now=NOW - timedelta(days=1))  # a few hundred kB: quick_check is cheap
        big = backup.create(db, bdir, now=NOW, quick_check_max_bytes=0)  # as if it were over the limit
        small_m = json.loads(small.manifest_path.read_text())
        big_m = json.loads(big.manifest_path.read_text())
        assert small_m["verified"] == "copy+sha256+header+size+schema+quick_check+counts"
        assert big_m["verified"] == CHEAP
        for m, info in ((small_m, small), (big_m, big)):
            assert m["status"] == "good" and m["full_check_at"] is None and m["full_check"] is None
            assert m["sha256"] == backup.file_sha256(info.path)[0] and m["size"] == info.path.stat().st_size
            assert m["tables"]["ohlcv_h4"] == 1200 and m["check_seconds"] >= 0 and m["copy_seconds"] >= 0
        unverified = json.loads(backup.create(db, bdir, now=NOW, verify=False).manifest_path.read_text())
        assert unverified["status"] == "unverified" and unverified["verified"] is None

    def test_the_daily_backup_no_longer_needs_scratch_space(self, tmp_path, db, bdir):
        scratch = tmp_path / "scratch-is-a-file"
        scratch.write_text("")
        info = backup.create(db, bdir, now=NOW, scratch_dir=scratch / "sub")
        assert info.status == backup.GOOD and leftovers(bdir) == []

    def test_bytes_damaged_after_the_backup_are_refused_by_restore(self, tmp_path, db, bdir):
        info = backup.create(db, bdir, now=NOW, quick_check_max_bytes=0)
        overwrite_page(info.path)
        with pytest.raises(RestoreRefused, match="sha256 differs from the manifest"):
            backup.restore(info.path, db, tmp_path / "quarantine")
        assert backup.backup_info(info.path).status == backup.BAD
        assert count(db, "ohlcv_h4") == 1200 and not (tmp_path / "quarantine").exists()
        with pytest.raises(NoGoodBackup):
            backup.choose_backup(bdir)

    def test_bytes_damaged_after_the_backup_are_caught_by_the_drill(self, db, bdir):
        info = backup.create(db, bdir, now=NOW, quick_check_max_bytes=0)
        overwrite_page(info.path)
        result = backup.dry_restore(info.path)
        assert not result.ok and any("sha256 differs" in p for p in result.problems)
        after = backup.backup_info(info.path)
        assert after.status == backup.BAD and after.full_check_at is None
        assert leftovers(bdir) == []

    def test_a_copy_that_fails_its_cheap_checks_leaves_nothing_and_marks_nothing_good(self, db, bdir, monkeypatch):
        online_copy = backup._online_copy

        def truncated_copy(src: Path, dest: Path) -> float:
            seconds = online_copy(src, dest)
            with open(dest, "r+b") as f:  # a copy that lost its last page on the way
                f.truncate(dest.stat().st_size - 4096)
            return seconds

        monkeypatch.setattr(backup, "_online_copy", truncated_copy)
        with pytest.raises(BackupError, match=r"failed its integrity check: the header says \d+ pages") as exc:
            backup.create(db, bdir, now=NOW, quick_check_max_bytes=0)
        assert "check-integrity" in exc.value.hint
        assert sorted(p.name for p in bdir.iterdir()) == [".backup.lock"]  # neither temp nor backup nor manifest

    def test_the_cheap_checks_find_a_wrong_header_and_a_wrong_size(self, tmp_path, db):
        good = tmp_path / "good.db"
        good.write_bytes(db.read_bytes())
        assert backup._cheap_checks(good, 0)[0] == []
        grown = tmp_path / "grown.db"
        grown.write_bytes(db.read_bytes() + b"\0" * 4096)
        assert "the file has" in backup._cheap_checks(grown, 0)[0][0]
        junk = tmp_path / "junk.db"
        junk.write_bytes(b"\0" * 8192)
        assert backup._cheap_checks(junk, 0)[0] == ["the SQLite header is missing or wrong"]


class TestDryRestore:
    def test_a_corrupted_backup_is_marked_bad_and_never_chosen(self, db, bdir):
        older = backup.create(db, bdir, now=NOW - timedelta(days=1))
        newer = backup.create(db, bdir, now=NOW)
        corrupt_middle(newer.path)
        result = backup.dry_restore(newer.path)
        assert not result.ok and result.problems
        assert any("sha256" in p for p in result.problems)
        assert backup.backup_info(newer.path).status == backup.BAD
        assert backup.choose_backup(bdir).path == older.path
        assert leftovers(bdir) == []

    def test_counts_that_differ_from_the_manifest_fail(self, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        manifest = json.loads(info.manifest_path.read_text())
        manifest["tables"]["ohlcv_h4"] = 999
        manifest["sha256"] = None
        info.manifest_path.write_text(json.dumps(manifest))
        result = backup.dry_restore(info.path)
        assert not result.ok
        assert result.problems == ["table ohlcv_h4: manifest says 999 rows, the restored copy has 1200"]

    def test_a_backup_without_manifest_is_adopted_when_sound(self, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        info.manifest_path.unlink()
        assert backup.backup_info(info.path).status == backup.UNVERIFIED
        assert backup.dry_restore(info.path).ok
        assert backup.backup_info(info.path).tables["ohlcv_h4"] == 1200

    def test_an_unreadable_manifest_makes_it_bad(self, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        info.manifest_path.write_text("{not json")
        assert backup.backup_info(info.path).status == backup.BAD
        assert not backup.dry_restore(info.path).ok

    def test_a_scratch_space_that_fails_is_an_error_and_the_backup_stays_unverified(self, tmp_path, db, bdir):
        scratch = tmp_path / "scratch-is-a-file"
        scratch.write_text("")
        with pytest.raises(BackupError, match=r"dry restore of db_backup_20260315\.db could not run"):
            backup.create(db, bdir, now=NOW, scratch_dir=scratch / "sub", full_check=True)
        assert backup.backup_info(bdir / "db_backup_20260315.db").status == backup.UNVERIFIED
        assert leftovers(bdir) == []

    def test_missing_backup_is_a_clear_error(self, bdir):
        with pytest.raises(BackupError, match="backup not found") as exc:
            backup.dry_restore(bdir / "db_backup_20260101.db")
        assert "crypto-agent backups" in exc.value.hint


class TestChoose:
    def test_no_backup_at_all(self, bdir):
        with pytest.raises(NoGoodBackup) as exc:
            backup.choose_backup(bdir)
        assert "newest were none" in exc.value.message
        assert "crypto-agent backup" in exc.value.hint

    def test_names_the_newest_when_none_is_good(self, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        corrupt_middle(info.path)
        backup.dry_restore(info.path)
        with pytest.raises(NoGoodBackup, match=r"db_backup_20260315.db \(bad\)"):
            backup.choose_backup(bdir)

    def test_newest_good_then_older(self, db, bdir):
        for days in (3, 2, 1):
            backup.create(db, bdir, now=NOW - timedelta(days=days))
        assert backup.choose_backup(bdir).day == date(2026, 3, 14)
        assert backup.choose_backup(bdir, before=date(2026, 3, 13)).day == date(2026, 3, 13)
        assert backup.choose_backup(bdir, before=NOW - timedelta(days=2, hours=5)).day == date(2026, 3, 12)

    def test_unverified_only_when_asked(self, db, bdir):
        good = backup.create(db, bdir, now=NOW - timedelta(days=1))
        unverified = backup.create(db, bdir, now=NOW, verify=False)
        assert backup.choose_backup(bdir).path == good.path
        assert backup.choose_backup(bdir, newest_good=False).path == unverified.path

    def test_the_48_hour_backup_falls_back_to_older(self, db, bdir):
        for days in (4, 3, 1, 0):
            backup.create(db, bdir, now=NOW - timedelta(days=days))
        assert backup.backup_for_hours_ago(bdir, 48, NOW).day == date(2026, 3, 12)  # the 13th is missing
        backup.create(db, bdir, now=NOW - timedelta(days=2))
        assert backup.backup_for_hours_ago(bdir, 48, NOW).day == date(2026, 3, 13)


class TestRetention:
    def test_keeps_yesterday_and_48h_and_weekly_and_monthly(self, db, bdir):
        days = list(range(75))  # one backup a day for 75 days
        for d in days:
            backup.create(db, bdir, now=NOW - timedelta(days=d), verify=False)
        removed = backup.retention(bdir, RetentionPolicy(keep_daily=3, keep_weekly=4, keep_monthly=3), now=NOW)
        kept = {b.day for b in backup.list_backups(bdir)}
        today = NOW.date()
        assert {today, today - timedelta(days=1), today - timedelta(days=2)} <= kept
        assert len(removed) + len(kept) == 75
        # the newest of each of the last 4 ISO weeks and 3 months
        assert date(2026, 3, 8) in kept and date(2026, 3, 1) in kept and date(2026, 2, 22) in kept
        assert date(2026, 2, 28) in kept and date(2026, 1, 31) in kept
        assert len(kept) <= 3 + 4 + 3
        assert date(2026, 3, 5) not in kept and not (bdir / "db_backup_20260305.json").exists()

    def test_removes_bad_backups_but_keeps_the_newest_good_one(self, db, bdir):
        good = backup.create(db, bdir, now=NOW - timedelta(days=40))
        for d in (2, 1, 0):
            info = backup.create(db, bdir, now=NOW - timedelta(days=d))
            corrupt_middle(info.path)
            backup.dry_restore(info.path)
        removed = backup.retention(bdir, RetentionPolicy(keep_daily=3, keep_weekly=0, keep_monthly=0), now=NOW)
        assert len(removed) == 3
        assert [b.path for b in backup.list_backups(bdir)] == [good.path]

    def test_a_policy_that_would_lose_the_48h_backup_is_refused(self):
        with pytest.raises(BackupError, match="48 h"):
            RetentionPolicy(keep_daily=1)


class TestQuarantine:
    def test_moves_db_wal_shm_and_never_overwrites(self, tmp_path, db):
        qdir = tmp_path / "quarantine"
        folders = []
        for i in range(2):
            make_db(db)
            for suffix in ("-wal", "-shm"):
                Path(f"{db}{suffix}").write_bytes(f"{suffix} {i}".encode())
            folders.append(backup.quarantine(db, qdir, f"test {i}", now=NOW))
        assert folders[0] != folders[1] and folders[0].parent == folders[1].parent == qdir
        for i, folder in enumerate(folders):
            assert sorted(p.name for p in folder.iterdir()) == [
                "QUARANTINE.json", "crypto_agent.db", "crypto_agent.db-shm", "crypto_agent.db-wal"]
            assert (folder / "crypto_agent.db-wal").read_bytes() == f"-wal {i}".encode()
            note = json.loads((folder / "QUARANTINE.json").read_text())
            assert note["reason"] == f"test {i}" and note["source"] == str(db.resolve())
        assert not db.exists() and not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()

    def test_nothing_to_quarantine(self, tmp_path):
        with pytest.raises(BackupError, match="does not exist"):
            backup.quarantine(tmp_path / "nope.db", tmp_path / "q", "x")


class TestRestore:
    def test_replaces_the_db_and_keeps_the_old_one_in_quarantine(self, tmp_path, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        store = Store(f"sqlite:///{db}")
        store.upsert_candles("SOLUSDT", "4h", candles(50, 4 * HOUR))
        store.close()
        result = backup.restore(info.path, db, tmp_path / "quarantine")
        assert count(db, "ohlcv_h4") == 1200
        assert result.quarantined is not None
        assert count(result.quarantined / "crypto_agent.db", "ohlcv_h4") == 1250
        assert not storelock.lock_path(db).exists()
        assert sorted(p.name for p in db.parent.iterdir()) == ["crypto_agent.db"]

    def test_restores_where_there_is_no_db(self, tmp_path, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        target = tmp_path / "fresh" / "crypto_agent.db"
        result = backup.restore(info.path, target, tmp_path / "quarantine")
        assert result.quarantined is None and count(target, "ohlcv_h4") == 1200

    def test_a_bad_backup_is_refused(self, tmp_path, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        corrupt_middle(info.path)
        backup.dry_restore(info.path)
        with pytest.raises(RestoreRefused, match="marked bad"):
            backup.restore(info.path, db, tmp_path / "quarantine")
        assert count(db, "ohlcv_h4") == 1200 and not (tmp_path / "quarantine").exists()

    def test_a_backup_damaged_after_its_check_is_caught_and_the_db_is_untouched(self, tmp_path, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        corrupt_middle(info.path)  # after the dry restore said good
        with pytest.raises(RestoreRefused, match="not touched"):
            backup.restore(info.path, db, tmp_path / "quarantine")
        assert backup.backup_info(info.path).status == backup.BAD
        assert count(db, "ohlcv_h4") == 1200 and not list(db.parent.glob(".*restore*"))
        assert not (tmp_path / "quarantine").exists()

    def test_refused_while_another_process_has_the_db_open(self, tmp_path, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        holder = subprocess.Popen(
            [sys.executable, "-c", ("import sqlite3, sys, time\n"
                                    "c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1 FROM ohlcv_h4').fetchall()\n"
                                    "print('open', flush=True); time.sleep(60)"), str(db)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "open"
            with pytest.raises(RestoreRefused, match=f"pid {holder.pid}") as exc:
                backup.restore(info.path, db, tmp_path / "quarantine")
            assert "stop the services" in exc.value.hint
        finally:
            holder.kill()
            holder.wait(timeout=30)
        assert not (tmp_path / "quarantine").exists() and not storelock.lock_path(db).exists()

    def test_refused_while_someone_else_holds_the_lock(self, tmp_path, db, bdir):
        info = backup.create(db, bdir, now=NOW)
        with storelock.recovery_lock(db, "compact-store"):
            with pytest.raises(RecoveryLocked, match="compact-store"):
                backup.restore(info.path, db, tmp_path / "quarantine")
            # the owner of the lock may restore under it; the lock stays with the outer holder
            backup.restore(info.path, db, tmp_path / "quarantine", owner="compact-store")
            assert storelock.lock_path(db).exists()
        assert not storelock.lock_path(db).exists()


class TestRecoveryLock:
    def test_held_by_another_process_is_refused_naming_the_holder(self, tmp_path, db):
        code = ("import sys, time\nfrom crypto_agent.storelock import recovery_lock\n"
                "with recovery_lock(sys.argv[1], 'recover-db-corruption/run-7'):\n"
                "    print('held', flush=True); time.sleep(60)\n")
        holder = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(RecoveryLocked) as exc:
                backup.compact(db, owner="crypto-agent compact")
            assert "recover-db-corruption/run-7" in exc.value.message
            assert f"pid {holder.pid}" in exc.value.message
            assert isinstance(exc.value, StoreLocked) and isinstance(exc.value, CryptoAgentError)
        finally:
            holder.terminate()
            holder.wait(timeout=30)

    def test_a_lock_touched_by_hand_is_respected(self, db):
        storelock.lock_path(db).touch()
        with pytest.raises(RecoveryLocked, match="unknown owner"), storelock.recovery_lock(db, "me"):
            pass
        assert storelock.lock_path(db).exists()  # not ours to remove

    def test_a_dead_holder_is_named_as_such(self, db):
        storelock.lock_path(db).write_text(json.dumps({"owner": "crashed-flow", "pid": 2**22 + 12345}))
        with pytest.raises(RecoveryLocked, match=r"crashed-flow, pid \d+ \(not running\)") as exc, \
                storelock.recovery_lock(db, "me"):
            pass
        assert str(storelock.lock_path(db)) in exc.value.hint

    def test_released_on_error(self, db):
        def fail_while_held() -> None:
            with storelock.recovery_lock(db, "me"):
                assert storelock.lock_holder(db)["owner"] == "me"
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fail_while_held()
        assert storelock.lock_holder(db) is None


class TestSalvage:
    def _corrupt_leaf(self, path: Path) -> None:
        conn = sqlite3.connect(path)
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.close()
        with open(path, "r+b") as f:
            f.seek((pages // 2) * page_size)
            f.write(b"\x0d" + b"\xee" * (page_size - 1))  # a leaf page header, then garbage

    def test_recovers_the_readable_rows_newer_than_a_time(self, tmp_path):
        original = make_db(tmp_path / "original.db", h4_per_symbol=200, h1_per_symbol=4000, symbols=3)
        corrupt = tmp_path / "corrupt.db"
        corrupt.write_bytes(original.read_bytes())
        self._corrupt_leaf(corrupt)
        with pytest.raises(sqlite3.DatabaseError):
            sqlite3.connect(corrupt).execute("SELECT COUNT(*), SUM(close) FROM ohlcv_h1").fetchall()
        target = make_db(tmp_path / "target.db", h4_per_symbol=0, h1_per_symbol=0)
        since = T0 + 1000 * HOUR
        result = backup.salvage(corrupt, target, since, ["ohlcv_h1", "ohlcv_h4"])
        newer = count(original, "ohlcv_h1", f"WHERE timestamp >= {since}")
        assert 0 < result["ohlcv_h1"] < newer
        assert result["ohlcv_h1"] >= newer - 400  # only about one page of rows is lost
        assert result.unreadable["ohlcv_h1"]
        assert result["ohlcv_h4"] == count(original, "ohlcv_h4", f"WHERE timestamp >= {since}")
        # every salvaged row is exactly the original row
        conn = sqlite3.connect(target)
        conn.execute(f"ATTACH '{original}' AS o")
        differing = conn.execute(
            "SELECT COUNT(*) FROM ohlcv_h1 t LEFT JOIN o.ohlcv_h1 x USING (symbol, timestamp) "
            "WHERE x.close IS NOT t.close OR x.volume IS NOT t.volume").fetchone()[0]
        older = conn.execute(f"SELECT COUNT(*) FROM ohlcv_h1 WHERE timestamp < {since}").fetchone()[0]
        conn.close()
        assert differing == 0 and older == 0

    def test_upserts_into_a_restored_backup(self, tmp_path):
        newer = make_db(tmp_path / "newer.db", h4_per_symbol=700, h1_per_symbol=0)
        target = make_db(tmp_path / "target.db", h4_per_symbol=600, h1_per_symbol=0)
        result = backup.salvage(newer, target, T0 + 600 * 4 * HOUR, ["ohlcv_h4"])
        assert result == {"ohlcv_h4": 200} and count(target, "ohlcv_h4") == 1400

    def test_a_file_that_is_not_a_database_salvages_nothing(self, tmp_path):
        junk = tmp_path / "junk.db"
        junk.write_bytes(b"\x00" * 10000)
        target = make_db(tmp_path / "target.db", h4_per_symbol=1, h1_per_symbol=0)
        result = backup.salvage(junk, target, 0, ["ohlcv_h4"])
        assert result == {"ohlcv_h4": 0} and result.unreadable["ohlcv_h4"]


class TestCompact:
    def test_vacuum_shrinks_and_checks_storage(self, db):
        conn = sqlite3.connect(db)
        conn.execute("DELETE FROM ohlcv_h4 WHERE symbol='ETHUSDT'")
        conn.commit()
        conn.close()
        result = backup.compact(db, max_gb=1.2)
        assert result.size_after < result.size_before
        assert not result.over_limit and result.storage.message.startswith("storage ok")
        assert count(db, "ohlcv_h4") == 600 and not storelock.lock_path(db).exists()

    def test_over_the_limit_is_an_alert(self, db):
        result = backup.compact(db, max_gb=0.00001)
        assert result.over_limit and result.storage.message.startswith("ALERT: database uses")

    def test_not_a_database(self, tmp_path):
        (tmp_path / "x.db").write_text("hello")
        with pytest.raises(BackupError, match="not an existing SQLite database"):
            backup.compact(tmp_path / "x.db")


class TestRestoreTest:
    """The runbook's backup_test.sh, message for message."""

    def test_backup_not_found(self, bdir):
        ok, message = backup.restore_test(bdir, NOW)
        assert not ok and message == f"ERROR: Backup not found: {bdir / 'db_backup_20260314.db'}"

    def test_backup_corrupted(self, db, bdir):
        info = backup.create(db, bdir, now=NOW - timedelta(days=1))
        corrupt_middle(info.path, length=64 * 1024)
        ok, message = backup.restore_test(bdir, NOW)
        assert not ok and message.startswith("ERROR: Backup corrupted: ")
        assert backup.backup_info(info.path).status == backup.BAD
        assert leftovers(bdir) == []

    def test_too_small(self, tmp_path, bdir):
        small = make_db(tmp_path / "small.db", h4_per_symbol=10)
        backup.create(small, bdir, now=NOW - timedelta(days=1))
        assert backup.restore_test(bdir, NOW) == (False, "ERROR: Test DB too small: 20 rows")

    def test_passed(self, db, bdir):
        backup.create(db, bdir, now=NOW - timedelta(days=1))
        assert backup.restore_test(bdir, NOW) == (True, "✅ Backup test passed: db_backup_20260314.db (rows=1200)")


class TestCli:
    def run(self, home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
        environ = {**os.environ, "CRYPTO_AGENT_HOME": str(home), **env}
        environ.pop("CRYPTO_AGENT_CONFIG", None)
        return subprocess.run([str(Path(sys.executable).parent / "crypto-agent"), *args], check=False,
                              cwd=home, env=environ, capture_output=True, text=True, timeout=120)

    def test_backup_list_restore_test_restore_compact(self, tmp_path, db):
        home = tmp_path
        r = self.run(home, "backup")
        assert r.returncode == 0, r.stderr
        assert "good" in r.stdout and "ohlcv_h4=1200" in r.stdout
        r = self.run(home, "backups")
        assert r.returncode == 0 and "good" in r.stdout and "db_backup_" in r.stdout
        r = self.run(home, "restore-test")  # today's backup is not yesterday's
        assert r.returncode == 1 and r.stdout.startswith("ERROR: Backup not found: ")
        r = self.run(home, "restore")
        assert r.returncode == 2 and "exactly one of" in r.stderr
        r = self.run(home, "restore", "--latest-good")
        assert r.returncode == 0, r.stderr
        assert "the previous database is in" in r.stdout
        assert len(list((home / "quarantine").iterdir())) == 1
        r = self.run(home, "restore", "--hours-ago", "48")
        assert r.returncode == 1 and "no good backup" in r.stderr
        r = self.run(home, "compact", CRYPTO_AGENT_STORAGE_MAX_GB="0.000001")
        assert r.returncode == 1 and "ALERT" in r.stdout
        r = self.run(home, "backup", "--no-verify")
        assert r.returncode == 0 and "unverified" in r.stdout
