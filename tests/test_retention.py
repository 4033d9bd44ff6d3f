"""Retention on a real store (the newest runs kept, old samples and events gone) and the storage check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from crypto_agent import retention
from crypto_agent.errors import InputError, StoreLocked
from crypto_agent.retention import GB, Pruned
from crypto_agent.service import record_event
from crypto_agent.store import Store

NOW = 1_800_000_000.0
DAY = 86_400.0


@pytest.fixture
def store(tmp_path: Path):
    """An empty real store in a tmp folder."""
    s = Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}")
    yield s
    s.close()


def add_result(store: Store, run_id: str, created_s: float, strategy: str = "sma_cross", symbol: str = "BTCUSDT",
               timeframe: str = "1h") -> None:
    """One backtest_results row."""
    with store.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO backtest_results (run_id, strategy, params, symbol, timeframe, period_start, period_end,"
            " candles, fee_bps, total_return, max_drawdown, trades, exposure, created_at)"
            " VALUES (:run, :strategy, '{}', :symbol, :tf, 0, 1, 10, 10, 0.1, -0.1, 1, 0.5, :at)"),
            {"run": run_id, "strategy": strategy, "symbol": symbol, "tf": timeframe, "at": int(created_s * 1000)})


def add_sample(store: Store, service: str, checked_s: float) -> None:
    """One probe_samples row."""
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO probe_samples (service, checked_at, status, alive, zombie, reasons)"
                          " VALUES (:s, :at, 'HEALTHY', 1, 0, '')"), {"s": service, "at": int(checked_s * 1000)})


def query(store: Store, sql: str) -> list[tuple]:
    """The rows of a query."""
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


class TestBacktestResults:
    def test_the_newest_runs_of_each_strategy_symbol_and_timeframe_stay(self, store: Store) -> None:
        for i in range(6):
            add_result(store, f"run-{i}", NOW + i)
            add_result(store, f"run-{i}", NOW + i, symbol="ETHUSDT")
            add_result(store, f"run-{i}", NOW + i, timeframe="4h")
        add_result(store, "other-0", NOW, strategy="rsi")
        deleted = retention.prune_backtest_results(store, keep_runs=2)
        assert deleted == 3 * 4
        rows = query(store, "SELECT strategy, symbol, timeframe, run_id FROM backtest_results ORDER BY 1, 2, 3, 4")
        assert rows == [("rsi", "BTCUSDT", "1h", "other-0"),
                        ("sma_cross", "BTCUSDT", "1h", "run-4"), ("sma_cross", "BTCUSDT", "1h", "run-5"),
                        ("sma_cross", "BTCUSDT", "4h", "run-4"), ("sma_cross", "BTCUSDT", "4h", "run-5"),
                        ("sma_cross", "ETHUSDT", "1h", "run-4"), ("sma_cross", "ETHUSDT", "1h", "run-5")]

    def test_a_run_with_several_rows_counts_once_by_its_newest_row(self, store: Store) -> None:
        add_result(store, "a", NOW)
        add_result(store, "a", NOW + 100)
        add_result(store, "b", NOW + 50)
        assert retention.prune_backtest_results(store, keep_runs=1) == 1
        assert query(store, "SELECT run_id, created_at FROM backtest_results ORDER BY 2") == [
            ("a", int(NOW * 1000)), ("a", int((NOW + 100) * 1000))]

    def test_deletes_go_in_batches(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(retention, "BATCH", 3)
        for i in range(10):
            add_result(store, f"r{i}", NOW + i)
        assert retention.prune_backtest_results(store, keep_runs=2) == 8
        assert [r[0] for r in query(store, "SELECT run_id FROM backtest_results ORDER BY 1")] == ["r8", "r9"]

    def test_keeping_no_run_is_refused(self, store: Store) -> None:
        add_result(store, "a", NOW)
        with pytest.raises(InputError, match="would delete every backtest result"):
            retention.prune_backtest_results(store, keep_runs=0)
        assert len(query(store, "SELECT id FROM backtest_results")) == 1


class TestSamplesAndEvents:
    def test_probe_samples_older_than_the_days_go(self, store: Store) -> None:
        for age_days in (0.5, 6.9, 7.1, 30):
            add_sample(store, "trader", NOW - age_days * DAY)
        assert retention.prune_probe_samples(store, days=7, now=NOW) == 2
        assert len(query(store, "SELECT id FROM probe_samples")) == 2

    def test_old_service_events_go_but_the_newest_of_each_kind_stays(self, store: Store) -> None:
        def event(kind: str, age_days: float, n: int, service: str = "trader") -> None:
            record_event(store, service, kind, pid=n, instance=f"{n}@1", source="test", at=NOW - age_days * DAY)

        event("started", 100, 1)  # the trader's only start, long ago: it stays (last_start reads it)
        event("crashed", 90, 2)
        event("crashed", 40, 3)
        event("crashed", 1, 4)
        event("stopped", 50, 5, service="backtest")
        event("stopped", 45, 6, service="backtest")
        with store.engine.begin() as conn:  # the monitor's claims of the crashes it reported as events
            for n, age in ((2, 90), (3, 40), (4, 1)):
                conn.execute(text("INSERT INTO reported_service_events VALUES ('trader', 'crashed', :i, :at)"),
                             {"i": f"{n}@1", "at": int((NOW - age * DAY) * 1000)})
        assert retention.prune_service_events(store, days=30, now=NOW) == 3
        assert query(store, "SELECT service, kind, pid FROM service_events ORDER BY pid") == [
            ("trader", "started", 1), ("trader", "crashed", 4), ("backtest", "stopped", 6)]
        assert query(store, "SELECT instance FROM reported_service_events") == [("4@1",)]

    def test_less_than_a_day_is_refused(self, store: Store) -> None:
        with pytest.raises(InputError, match="24 h checks"):
            retention.prune_probe_samples(store, days=0.5, now=NOW)


class TestPrune:
    def test_one_pass_reports_the_counts_per_table(self, store: Store) -> None:
        for i in range(4):
            add_result(store, f"r{i}", NOW + i)
        add_sample(store, "trader", NOW - 10 * DAY)
        add_sample(store, "trader", NOW)
        result = retention.prune(store, keep_runs=1, now=NOW)
        assert (result.backtest_results, result.probe_samples, result.service_events, result.total) == (3, 1, 0, 4)
        assert result.message == "retention deleted 4 rows: 3 backtest results, 1 probe samples, 0 service events"
        assert json.loads(json.dumps(result.to_dict()))["total"] == 4
        assert retention.prune(store, keep_runs=1, now=NOW).message == "retention: nothing to delete"

    def test_a_bad_setting_deletes_nothing(self, store: Store) -> None:
        add_result(store, "a", NOW)
        add_result(store, "b", NOW + 1)
        with pytest.raises(InputError):
            retention.prune(store, keep_runs=1, service_event_days=0, now=NOW)
        assert len(query(store, "SELECT id FROM backtest_results")) == 2

    def test_a_locked_store_is_left_alone(self, store: Store) -> None:
        add_result(store, "a", NOW)
        add_result(store, "b", NOW + 1)
        lock = store.path.parent / "LOCKED"
        lock.write_text("{}")
        with pytest.raises(StoreLocked, match="retention deleted nothing"):
            retention.prune(store, keep_runs=1, now=NOW)
        assert len(query(store, "SELECT id FROM backtest_results")) == 2

    def test_pruned_is_a_plain_value(self) -> None:
        assert Pruned(1, 2, 3, 0.5).total == 6


class TestFlowRuns:
    def test_only_finished_runs_past_their_days_go(self) -> None:
        runs = [("done-old", "COMPLETED", NOW - 15 * DAY), ("done-new", "COMPLETED", NOW - 13 * DAY),
                ("cancelled-old", "CANCELLED", NOW - 20 * DAY), ("failed-20d", "FAILED", NOW - 20 * DAY),
                ("crashed-31d", "CRASHED", NOW - 31 * DAY), ("running", "RUNNING", None),
                ("scheduled-old", "SCHEDULED", NOW - 90 * DAY), ("no-end", "COMPLETED", None)]
        assert retention.flow_runs_to_delete(runs, NOW) == ["done-old", "cancelled-old", "crashed-31d"]
        assert retention.flow_runs_to_delete(runs, NOW, days=30, failed_days=60) == []

    def test_state_names_are_case_insensitive(self) -> None:
        assert retention.flow_runs_to_delete([("a", "completed", NOW - 20 * DAY)], NOW) == ["a"]

    def test_too_short_a_retention_is_refused(self) -> None:
        with pytest.raises(InputError, match="too short"):
            retention.flow_runs_to_delete([], NOW, days=0.5)
        with pytest.raises(InputError):
            retention.flow_runs_to_delete([], NOW, days=14, failed_days=7)


class TestStorage:
    def test_the_check_sums_database_wal_backups_and_quarantine(self, store: Store, tmp_path: Path) -> None:
        add_result(store, "a", NOW)
        backups, quarantine = tmp_path / "backups", tmp_path / "quarantine" / "2026-01-01"
        backups.mkdir()
        quarantine.mkdir(parents=True)
        (backups / "db_backup_20260101.db").write_bytes(b"x" * 5000)
        (backups / "db_backup_20260101.db.json").write_bytes(b"{}")
        (quarantine / "crypto_agent.db").write_bytes(b"y" * 3000)
        (backups / "link").symlink_to(store.path)  # not counted twice
        db = store.path
        report = retention.storage(db, backups, quarantine_dir=tmp_path / "quarantine", max_gb=1.2, min_free_gb=0)
        assert report.db_bytes == db.stat().st_size
        wal = Path(f"{db}-wal")
        assert report.wal_bytes == (wal.stat().st_size if wal.exists() else 0)
        assert (report.backups_bytes, report.quarantine_bytes) == (5002, 3000)
        assert report.total_bytes == report.database_bytes + 8002
        free = shutil.disk_usage(db.parent)
        assert abs(report.free_bytes - free.free) < 100 * 1_000_000 and report.disk_bytes == free.total
        assert report.ok and report.message.startswith("storage ok: database ")

    def test_a_database_over_the_limit_says_what_to_do(self, store: Store, tmp_path: Path) -> None:
        report = retention.storage(store.path, tmp_path / "none", max_gb=1e-6, min_free_gb=0)
        assert not report.ok
        assert report.problems[0].startswith("the database uses 0.00 GB (file and WAL), over the 0.00 GB limit")
        assert report.problems[0].endswith("run the retention, then compact")
        assert report.message.startswith("ALERT: the database uses")

    def test_low_free_disk_is_reported(self, store: Store, tmp_path: Path) -> None:
        free = shutil.disk_usage(tmp_path).free
        report = retention.storage(store.path, tmp_path, min_free_gb=(free + 10 * GB) / GB)
        low = next(p for p in report.problems if "free on the disk" in p)
        assert low.endswith("free space before the next backup")

    def test_the_total_limit_counts_backups(self, store: Store, tmp_path: Path) -> None:
        (tmp_path / "backups").mkdir()
        (tmp_path / "backups" / "b.db").write_bytes(b"z" * 10_000)
        report = retention.storage(store.path, tmp_path / "backups", min_free_gb=0, max_total_gb=5e-6)
        assert report.problems == [(f"database, backups and quarantine take {report.total_bytes / GB:.2f} GB, "
                                    "over the 0.00 GB limit: prune old backups and quarantined files")]
        assert json.loads(json.dumps(report.to_dict()))["ok"] is False

    def test_a_store_not_yet_created_measures_zero(self, tmp_path: Path) -> None:
        report = retention.storage(tmp_path / "new" / "db" / "x.db", tmp_path / "new" / "backups", min_free_gb=0)
        assert (report.db_bytes, report.wal_bytes, report.backups_bytes) == (0, 0, 0) and report.ok
