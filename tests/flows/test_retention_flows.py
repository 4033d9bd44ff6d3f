"""Bounded growth as flows (issue 10): prune-history on a real store and the test Prefect server's flow
runs, the storage check's low-disk path (L2 and a retention run), and the age of the newest good backup."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from flow_kit import artifacts_of, flow_run_events, wait_for_messages
from prefect import flow, get_client
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL
from prefect.states import Cancelled, Completed, Crashed, Failed, Running, State
from sqlalchemy import text
from test_prefect_yaml import deployment, fire_times

import flows.maintenance as maintenance
import flows.retention as retention_flows
from crypto_agent import backup
from crypto_agent.receiver import Receiver
from crypto_agent.service import record_event
from crypto_agent.settings import load_settings
from crypto_agent.store import Store, open_store
from flows.events import STORE_STORAGE_HIGH

Settings = Callable[..., dict[str, Any]]
DAY_S = 86_400.0
# Free disk no machine has: forces the low-disk path.
HUGE_GB = 1e9


@pytest.fixture
def settings(settings_for: Settings) -> dict[str, Any]:
    """Settings of a store in tmp_path (no exchange needed)."""
    return settings_for()


@pytest.fixture
def store(settings: dict[str, Any]) -> Iterator[Store]:
    """The real store those settings point at, created empty."""
    s = open_store(load_settings(**settings))
    yield s
    s.close()


def add_results(store: Store, runs: int, rows_per_run: int, strategy: str, symbol: str, newest_s: float) -> None:
    """`runs` backtest runs of one unit, one hour apart (the newest at newest_s), `rows_per_run` rows each."""
    rows = [{"run": f"{strategy}-{symbol}-{r}", "strategy": strategy, "symbol": symbol,
             "at": int((newest_s - (runs - r) * 3600) * 1000)} for r in range(runs) for _ in range(rows_per_run)]
    with store.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO backtest_results (run_id, strategy, params, symbol, timeframe, period_start, period_end,"
            " candles, fee_bps, total_return, max_drawdown, trades, exposure, created_at)"
            " VALUES (:run, :strategy, '{}', :symbol, '1h', 0, 1, 10, 10, 0.1, -0.1, 1, 0.5, :at)"), rows)


def add_samples(store: Store, count: int, at_s: float) -> None:
    """`count` probe samples of the trader taken at at_s."""
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO probe_samples (service, checked_at, status, alive, zombie, reasons)"
                          " VALUES ('trader', :at, 'HEALTHY', 1, 0, '')"), [{"at": int(at_s * 1000)}] * count)


def count(store: Store, sql: str) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


class TestPruneHistory:
    def test_keeps_the_newest_runs_per_unit_and_drops_old_samples_and_events(
        self, settings: dict[str, Any], store: Store
    ) -> None:
        now = time.time()
        for strategy, symbol in (("sma_cross", "BTCUSDT"), ("sma_cross", "ETHUSDT"), ("rsi", "BTCUSDT")):
            add_results(store, runs=60, rows_per_run=50, strategy=strategy, symbol=symbol, newest_s=now)
        add_samples(store, 3000, now - 10 * DAY_S)
        add_samples(store, 5, now - 3600)
        for n, age in enumerate((60, 45, 1)):
            record_event(store, "trader", "crashed", pid=n, instance=f"{n}@1", source="test", at=now - age * DAY_S)
        assert count(store, "SELECT COUNT(*) FROM backtest_results") == 9000

        state = retention_flows.prune_history(settings={**settings, "retention_keep_runs": 30}, return_state=True)

        assert state.is_completed(), state.message
        result = state.result()["store"]
        # 30 of the 60 runs of each unit stay, each with its 50 rows; the newest runs are the ones kept
        assert count(store, "SELECT COUNT(*) FROM backtest_results") == 3 * 30 * 50
        assert count(store, "SELECT COUNT(DISTINCT run_id) FROM backtest_results WHERE symbol = 'ETHUSDT'") == 30
        assert count(store, "SELECT MIN(run_id) FROM backtest_results WHERE strategy = 'rsi'") == "rsi-BTCUSDT-30"
        assert count(store, "SELECT COUNT(*) FROM probe_samples") == 5
        assert count(store, "SELECT COUNT(*) FROM service_events") == 1  # 60 and 45 days old: past 30 days
        assert (result["backtest_results"], result["probe_samples"], result["service_events"]) == (4500, 3000, 2)
        [table] = artifacts_of(state.state_details.flow_run_id, "prune-history")
        deleted = {row["what"]: row["deleted"] for row in table}
        assert deleted["backtest_results"] == 4500 and deleted["probe_samples"] == 3000
        assert "prefect flow runs" in deleted

    def test_a_locked_store_is_skipped_with_a_message(self, settings: dict[str, Any], store: Store) -> None:
        add_results(store, runs=40, rows_per_run=1, strategy="sma_cross", symbol="BTCUSDT", newest_s=time.time())
        lock = load_settings(**settings).db_path.parent / "LOCKED"
        lock.write_text('{"owner": "test"}')
        try:
            state = retention_flows.prune_history(settings=settings, return_state=True)
        finally:
            lock.unlink()
        assert state.is_completed(), state.message
        assert "a recovery holds the store" in state.result()["store"]["skipped"]
        assert count(store, "SELECT COUNT(*) FROM backtest_results") == 40

    def test_no_database_yet_is_not_an_error(self, settings: dict[str, Any]) -> None:
        result = retention_flows.prune_history(settings=settings)
        assert "no database" in result["store"]["skipped"]
        assert not load_settings(**settings).db_path.exists()  # it creates none


@flow(name="retention-test-dummy")
def dummy() -> None:
    """A flow whose runs the tests create and age."""


def make_run(state: State, ended_days_ago: float | None, started_days_ago: float | None = None) -> UUID:
    """A flow run of the dummy flow in `state`, its end (and start) moved back in the server's database."""
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(dummy, state=state)
    url = PREFECT_API_DATABASE_CONNECTION_URL.value()
    path = url.split(":///", 1)[1]
    now = datetime.now(UTC).replace(tzinfo=None)
    stamp = {k: (now - timedelta(days=d)).strftime("%Y-%m-%d %H:%M:%S.%f")
             for k, d in (("end_time", ended_days_ago), ("start_time", started_days_ago or ended_days_ago))
             if d is not None}
    conn = sqlite3.connect(path, timeout=30)
    try:
        for column, value in stamp.items():
            conn.execute(f"UPDATE flow_run SET {column} = ? WHERE id = ?", (value, str(run.id)))
        conn.commit()
    finally:
        conn.close()
    return run.id


def exists(run_id: UUID) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_flow_run(run_id)
        except ObjectNotFound:
            return False
    return True


class TestFlowRunPruning:
    def test_old_finished_runs_go_and_recent_failed_and_unfinished_ones_stay(self, settings: dict[str, Any]) -> None:
        gone = {
            "completed 20 days ago": make_run(Completed(), 20),
            "cancelled 15 days ago": make_run(Cancelled(), 15),
            "failed 40 days ago": make_run(Failed(), 40),
            "crashed 31 days ago": make_run(Crashed(), 31),
        }
        kept = {
            "completed 2 days ago": make_run(Completed(), 2),
            "completed now": make_run(Completed(), None),
            "failed 20 days ago": make_run(Failed(), 20),
            "running for 20 days": make_run(Running(), None, started_days_ago=20),
        }

        state = retention_flows.prune_history(settings=settings, return_state=True)

        assert state.is_completed(), state.message
        runs = state.result()["flow_runs"]
        assert {name for name, run_id in gone.items() if exists(run_id)} == set()
        assert {name for name, run_id in kept.items() if not exists(run_id)} == set()
        assert {str(i) for i in gone.values()} <= set(runs["ids"])
        assert runs["days"] == 14 and runs["failed_days"] == 30

    def test_one_run_deletes_a_bounded_count_the_next_the_rest(self, settings: dict[str, Any]) -> None:
        old = [make_run(Completed(), 20 + i) for i in range(5)]
        first = retention_flows.prune_history(settings=settings, max_flow_runs=2)["flow_runs"]
        assert first["deleted"] == 2 and first["limit_reached"] is True
        assert sum(exists(r) for r in old) == 3
        # oldest first
        assert not exists(old[4]) and not exists(old[3])
        retention_flows.prune_history(settings=settings)
        assert not any(exists(r) for r in old)


def own_pages(inbox: Receiver, path: str, words: str) -> list[dict[str, Any]]:
    """The pages on `path` whose subject has `words`, once one came. The session's receiver may also hold a
    late page of an earlier module's flow (not this watch's), which must not count here; all are named on failure."""
    got = wait_for_messages(inbox, path)
    deadline = time.monotonic() + 30
    while not [m for m in got if words in m["body"]["subject"]] and time.monotonic() < deadline:
        time.sleep(0.1)
        got = inbox.messages(path)
    mine = [m for m in got if words in m["body"]["subject"]]
    assert len(mine) == 1, [m["body"]["subject"] for m in got]
    return mine


class TestLowDisk:
    def test_compact_with_the_disk_short_of_its_minimum_tells_l2_emits_storage_high_and_prunes(
        self, settings: dict[str, Any], store: Store, inbox: Receiver
    ) -> None:
        add_results(store, runs=40, rows_per_run=2, strategy="sma_cross", symbol="BTCUSDT", newest_s=time.time())
        store.close()
        low = {**settings, "disk_free_min_gb": HUGE_GB}

        state = maintenance.compact_flow(settings=low, return_state=True)

        assert state.is_completed(), state.message  # the database is within its limit: compact itself succeeds
        result = state.result()
        assert result["storage"]["told"] == "l2"
        assert result["storage"]["retention"]["store"]["backtest_results"] == 10 * 2
        [event] = flow_run_events(state.state_details.flow_run_id, STORE_STORAGE_HIGH)
        report = event.payload["storage"]
        assert report["min_free_bytes"] == int(HUGE_GB * 1e9) and report["free_bytes"] < report["min_free_bytes"]
        assert report["db_bytes"] > 0 and "backups_bytes" in report and "wal_bytes" in report
        assert event.payload["over_limit"] is False and any("free on the disk" in p for p in event.payload["problems"])
        [message] = own_pages(inbox, "/l2", "free disk low")
        assert message["body"]["subject"].startswith("[crypto-agent] free disk low")
        assert "prune-history" in message["body"]["body"]

    def test_with_room_on_the_disk_the_watch_tells_nobody(
        self, settings: dict[str, Any], store: Store, inbox: Receiver
    ) -> None:
        maintenance.backup_flow(settings=settings)
        result = maintenance.storage_watch(settings=settings)
        assert result["storage"]["ok"] is True and result["backup"]["told"] is None
        assert wait_for_messages(inbox, "/l2", timeout_s=2) == []

    def test_the_hourly_watch_finds_low_disk_too(self, settings: dict[str, Any], store: Store, inbox: Receiver) -> None:
        maintenance.backup_flow(settings=settings)
        result = maintenance.storage_watch(settings={**settings, "disk_free_min_gb": HUGE_GB})
        assert result["storage"]["told"] == "l2" and result["storage"]["retention"] is not None
        [message] = own_pages(inbox, "/l2", "free disk low")
        assert "free disk low" in message["body"]["subject"]

    def test_a_disk_that_stays_low_pages_once_per_episode_and_again_after_it_had_room(
        self, settings: dict[str, Any], store: Store, inbox: Receiver
    ) -> None:
        maintenance.backup_flow(settings=settings)
        low = {**settings, "disk_free_min_gb": HUGE_GB}
        rounds = [maintenance.storage_watch(settings=low)["storage"] for _ in range(3)]
        assert [r["told"] for r in rounds] == ["l2", None, None]
        assert all(r["retention"] is not None for r in rounds)  # the retention still runs every hour
        assert maintenance.storage_watch(settings=settings)["storage"]["ok"] is True  # room again: episode over
        assert maintenance.storage_watch(settings=low)["storage"]["told"] == "l2"
        pages = wait_for_messages(inbox, "/l2", count=2)
        assert len([m for m in pages if "free disk low" in m["body"]["subject"]]) == 2


class TestBackupAge:
    def test_a_newest_good_backup_older_than_26_hours_tells_l2_and_takes_one(
        self, settings: dict[str, Any], store: Store, inbox: Receiver
    ) -> None:
        old = maintenance.backup_flow(settings=settings, now=datetime.now(UTC) - timedelta(hours=30))
        assert backup.backup_info(old["backup"]).status == backup.GOOD

        state = maintenance.storage_watch(settings=settings, return_state=True)

        assert state.is_completed(), state.message
        result = state.result()["backup"]
        assert result["told"] == "l2" and 29 < result["age_hours"] < 31
        new = backup.choose_backup(load_settings(**settings).backup_dir)
        assert str(new.path) == result["backup"] != old["backup"]
        assert new.status == backup.GOOD and new.day == datetime.now(UTC).date()
        [message] = own_pages(inbox, "/l2", "newest good backup")
        assert "newest good backup is 30.0 h old (limit 26 h)" in message["body"]["subject"]
        assert "a backup" in message["body"]["body"]
        [table] = artifacts_of(state.state_details.flow_run_id, "storage-watch")
        assert [r["ok"] for r in table] == [True, False]

    def test_no_good_backup_at_all_tells_l2_and_takes_the_first(
        self, settings: dict[str, Any], store: Store, inbox: Receiver
    ) -> None:
        result = maintenance.storage_watch(settings=settings)["backup"]
        assert result["told"] == "l2" and result["newest"] is None
        assert backup.choose_backup(load_settings(**settings).backup_dir).status == backup.GOOD
        [message] = own_pages(inbox, "/l2", "no good backup of the store")
        assert message["body"]["subject"] == "[crypto-agent] no good backup of the store"

    def test_a_locked_store_is_told_but_not_backed_up(
        self, settings: dict[str, Any], store: Store, inbox: Receiver
    ) -> None:
        lock = load_settings(**settings).db_path.parent / "LOCKED"
        lock.write_text('{"owner": "test"}')
        try:
            result = maintenance.storage_watch(settings=settings)["backup"]
        finally:
            lock.unlink()
        assert result["told"] == "l2" and "locked" in result["backup"]
        assert backup.list_backups(load_settings(**settings).backup_dir) == []
        assert wait_for_messages(inbox, "/l2")

    def test_a_backup_that_stays_impossible_is_paged_once_not_every_hour(
        self, settings: dict[str, Any], store: Store, inbox: Receiver
    ) -> None:
        lock = load_settings(**settings).db_path.parent / "LOCKED"
        lock.write_text('{"owner": "test"}')
        try:
            told = [maintenance.storage_watch(settings=settings)["backup"]["told"] for _ in range(3)]
        finally:
            lock.unlink()
        assert told == ["l2", None, None]
        own_pages(inbox, "/l2", "good backup")  # exactly one
        time.sleep(2)
        assert len([m for m in inbox.messages("/l2") if "good backup" in m["body"]["subject"]]) == 1


class TestSchedules:
    def test_prune_history_fires_daily_at_a_quiet_time(self) -> None:
        times = fire_times(deployment("prune-history", "daily"), days=14)
        assert len(times) == 14 and len({t.date() for t in times}) == 14
        # after the data jobs and outside the backtest window (23:30-01:30), before the backup
        sentiment = fire_times(deployment("sentiment-macro-update", "daily"), days=1)[0].time()
        backup_at = fire_times(deployment("backup", "daily"), days=1)[0].time()
        assert all(sentiment < t.time() < backup_at for t in times)

    def test_the_storage_watch_fires_hourly_and_a_late_backup_is_seen_within_26_hours_and_one(self) -> None:
        times = fire_times(deployment("storage-watch", "hourly"), days=1)
        assert len(times) == 24 and len({t.hour for t in times}) == 24
        assert load_settings().backup_max_age_hours == 26
