"""recover-db-corruption, recover-stale-data and rollback-persistent-failures on real SQLite files filled from
the simulator: a corrupted page, a truncated file, a damaged index, a missing and a corrupted backup, stale
windows, and the 48 h rollback."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from flow_kit import TEST_SYMBOLS, artifacts_of, wait_for_messages
from recovery_kit import (
    Keeper,
    action,
    add_result,
    all_incidents,
    checkpoint,
    crash_loop,
    died_of_the_store,
    event,
    events_of,
    execute,
    fill_store,
    filled_env,  # noqa: F401 (the `env` fixture: a store of 60 days of candles)
    incident_of,
    kill_and_wait,
    leaf_page,
    rows,
    running_pid,
    settings_of,
    smash_page,
    steps,
    wait_until,
)
from service_kit import keeper  # noqa: F401 (the fixture, one for every test module)
from test_rollback_gate import GATE_S, Gated

from crypto_agent import backup, health, holds, process, storelock
from crypto_agent.quality import check_data
from crypto_agent.receiver import Receiver
from crypto_agent.settings import Settings
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store, check_integrity
from flows.events import INCIDENT_ESCALATED, STORE_CORRUPT, STORE_STALE
from flows.recovery import (
    recover_daemon_crash,
    recover_db_corruption,
    recover_stale_data,
    rollback_persistent_failures,
)

STORE = "crypto-agent.store.main"
HOUR_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


def candle_count(db: Path) -> int:
    return sum(rows(db, f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("ohlcv_h1", "ohlcv_h4"))


def backup_lacking_newest_hours(cfg: Settings, sim: Simulator, hours: int, days_ago: int = 1) -> backup.BackupInfo:
    """A good backup dated `days_ago` that lacks the newest `hours` of candles, which the live store has again."""
    db = Path(cfg.db_path)
    cut = now_ms() - hours * HOUR_MS
    for table in ("ohlcv_h1", "ohlcv_h4"):
        execute(db, f"DELETE FROM {table} WHERE timestamp >= ?", (cut,))
    info = backup.create(db, cfg.backup_dir, now=datetime.now(UTC) - timedelta(days=days_ago))
    assert info.status == backup.GOOD
    fill_store(db, sim, TEST_SYMBOLS, 60)  # the live store catches up again
    return info


def start_both(keeper: Keeper, cfg: Settings) -> dict[str, int]:
    return {name: keeper.start(process.service_spec(name, cfg), cfg).pid for name in ("trader", "backtest")}


def healthy(cfg: Settings, service: str) -> None:
    report = health.probe(process.service_spec(service, cfg), cfg)
    assert report.healthy, report.summary


def corrupt_event(**payload: Any) -> dict[str, Any]:
    return event(STORE_CORRUPT, STORE, mode="quick_check", problems=["database disk image is malformed"], **payload)


def smash_an_index(db: Path) -> None:
    """Damage a leaf of an index made for it: REINDEX on a copy repairs that without a restore."""
    execute(db, "CREATE INDEX ix_ohlcv_h1_close ON ohlcv_h1 (close, symbol)")
    checkpoint(db)
    smash_page(db, leaf_page(db, "ix_ohlcv_h1_close"))


class TestCorruption:
    def test_a_corrupted_page_is_restored_from_the_good_backup_resynced_and_salvaged(
        self, env: dict[str, Any], simulator: Simulator, keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        good = backup_lacking_newest_hours(cfg, simulator, hours=12)
        full = candle_count(db)
        add_result(db, "written-after-the-backup", now_ms())
        checkpoint(db)
        pids = start_both(keeper, cfg)
        wal = db.with_name(db.name + "-wal")
        wait_until(lambda: wal.exists() and wal.stat().st_size > 0 and rows(
            db, "SELECT COUNT(*) FROM backtest_results WHERE run_id LIKE 'daemon-%'")[0][0] > 0, 60, "daemon writes")
        page = leaf_page(db, "ohlcv_h1")
        smashed = smash_page(db, page)
        for pid in pids.values():  # they die with the damage: a crash leaves the -wal and -shm behind
            kill_and_wait(pid)
        assert wal.exists() and db.with_name(db.name + "-shm").exists()
        assert not check_integrity(db, full=True).ok
        result = recover_db_corruption(settings=env, event=corrupt_event())

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        order = steps(inc)
        assert order[:6] == ["event", "integrity-check", "lock", "stop", "stop", "reindex"]
        assert action(inc, "reindex")["ok"] is False
        assert order.index("restore") < order.index("verify-restore") < order.index("resync-candles") \
            < order.index("salvage") < order.index("validate") < order.index("unlock")
        starts = [a["detail"] for a in inc.actions if a["step"] == "start"]
        assert starts[0].startswith("started trader") and starts[1].startswith("started backtest")  # trader first
        assert good.name in action(inc, "restore")["detail"]
        assert "backtest_results" in action(inc, "salvage")["detail"]  # ours and what the daemon wrote
        assert action(inc, "validate")["detail"] == "data checks pass"
        assert inc.data_lost_hours == 0 and inc.root_cause.startswith("DB corruption:")
        # the corrupt file, with its -wal and -shm, is in quarantine, its damaged page as we left it
        [folder] = Path(cfg.quarantine_dir).iterdir()
        names = {p.name for p in folder.iterdir()}
        assert {"crypto_agent.db", "crypto_agent.db-wal", "crypto_agent.db-shm", "QUARANTINE.json"} <= names
        size = rows(db, "PRAGMA page_size")[0][0]
        with (folder / "crypto_agent.db").open("rb") as f:
            f.seek((page - 1) * size)
            assert f.read(size) == smashed
        # the store is sound and complete again: resynced from the simulator, the newer row salvaged
        assert check_integrity(db, full=True).ok and storelock.lock_holder(db) is None
        assert candle_count(db) >= full
        assert rows(db, "SELECT run_id FROM backtest_results WHERE run_id = 'written-after-the-backup'")
        assert rows(db, "SELECT COUNT(*) FROM backtest_results WHERE run_id LIKE 'daemon-%'")[0][0] > 0  # from the WAL
        with Store(cfg.database_url) as store:
            assert check_data(store, cfg).ok
        healthy(cfg, "trader")
        healthy(cfg, "backtest")
        [l3] = wait_for_messages(inbox, "/l3", 1)
        assert "live trading was affected: war room" in l3["body"]["body"]
        [l2] = wait_for_messages(inbox, "/l2", 1)  # the runbook's cell: L2 pages the on-call lead
        assert "live trading was affected: page the on-call lead" in l2["body"]["body"]
        assert len(wait_for_messages(inbox, "/l1", 2)) == 2
        [report] = artifacts_of(inc.flow_run_id, f"incident-{inc.id}")
        assert "[x] DB corruption" in report and "Data loss: 0 hours" in report

    def test_a_truncated_file_is_restored_and_the_services_come_back(
        self, env: dict[str, Any], simulator: Simulator, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        backup_lacking_newest_hours(cfg, simulator, hours=8)
        checkpoint(db)
        with db.open("r+b") as f:
            f.truncate(db.stat().st_size * 2 // 5)
        truncated = db.stat().st_size
        result = recover_db_corruption(settings=env, event=corrupt_event())

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert "restore" in steps(inc) and action(inc, "resync-candles")["ok"]
        [folder] = Path(cfg.quarantine_dir).iterdir()
        assert (folder / "crypto_agent.db").stat().st_size == truncated
        assert check_integrity(db, full=True).ok
        with Store(cfg.database_url) as store:
            assert check_data(store, cfg).ok
        # what the truncated file could not give back is reported, not hidden
        assert inc.data_lost_hours is not None
        if not action(inc, "salvage")["ok"]:
            assert inc.data_lost_hours > 0 and "unreadable" in action(inc, "salvage")["detail"]
        healthy(cfg, "trader")
        healthy(cfg, "backtest")

    def test_a_damaged_index_is_repaired_by_reindex_on_a_copy_without_a_restore(
        self, env: dict[str, Any], inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        before = candle_count(db)
        smash_an_index(db)
        assert not check_integrity(db, full=True).ok
        result = recover_db_corruption(settings=env, event=corrupt_event())

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert action(inc, "reindex")["ok"] and "install-repaired" in steps(inc) and "restore" not in steps(inc)
        assert inc.data_lost_hours == 0
        assert check_integrity(db, full=True).ok and candle_count(db) == before
        assert len(list(Path(cfg.quarantine_dir).iterdir())) == 1
        healthy(cfg, "backtest")

    @pytest.mark.parametrize("backups", ["missing", "corrupted"])
    def test_without_a_good_backup_the_store_is_rebuilt_refetched_and_the_services_come_back(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver, backups: str
    ) -> None:
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        if backups == "corrupted":
            info = backup.create(db, cfg.backup_dir, now=datetime.now(UTC) - timedelta(days=1))
            with info.path.open("r+b") as f:
                f.seek(info.size // 2)
                f.write(b"\x00garbage\x00" * 64)
        add_result(db, "kept-by-the-rebuild", now_ms())
        checkpoint(db)
        full = candle_count(db)
        pids = start_both(keeper, cfg)
        page = leaf_page(db, "ohlcv_h1")
        smashed = smash_page(db, page)
        started = time.monotonic()
        result = recover_db_corruption(settings=env, event=corrupt_event())
        took = time.monotonic() - started

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert inc.status == "resolved" and "no good backup" in inc.summary and "rebuilt" in inc.summary
        if backups == "corrupted":
            assert backup.backup_info(info.path).status == backup.BAD  # never chosen again
            assert "marked bad" in action(inc, "backup-refused")["detail"]
        order = steps(inc)
        assert "restore" not in order
        assert order.index("reindex") < order.index("quarantine") < order.index("rebuild") \
            < order.index("verify-rebuild") < order.index("refetch-plan") < order.index("refetch-candles") \
            < order.index("validate") < order.index("unlock")
        rebuilt = action(inc, "rebuild")["detail"]
        assert "rebuilt crypto_agent.db from crypto_agent.db by" in rebuilt and "rows per table:" in rebuilt
        assert "backtest_results" in rebuilt and "ohlcv_h4" in rebuilt  # per-table counts
        assert action(inc, "verify-rebuild")["ok"] and action(inc, "refetch-candles")["ok"]
        assert "window(s) to fetch again" in action(inc, "refetch-plan")["detail"]
        tables = result["rebuild"]["tables"]
        assert tables["ohlcv_h1"]["unreadable"] and tables["ohlcv_h4"]["recovered"] > 0  # the smashed page
        assert action(inc, "validate")["detail"] == "data checks pass"
        starts = [a["detail"] for a in inc.actions if a["step"] == "start"]
        assert starts[0].startswith("started trader") and starts[1].startswith("started backtest")  # trader first
        # the corrupt file is in quarantine as found; a sound store, candles back, salvaged rows kept, unlocked
        [folder] = [p for p in Path(cfg.quarantine_dir).iterdir() if p.is_dir()]
        size = rows(folder / "crypto_agent.db", "PRAGMA page_size")[0][0]
        with (folder / "crypto_agent.db").open("rb") as f:
            f.seek((page - 1) * size)
            assert f.read(size) == smashed
        assert check_integrity(db, full=True).ok and storelock.lock_holder(db) is None
        assert candle_count(db) >= full
        assert rows(db, "SELECT run_id FROM backtest_results WHERE run_id = 'kept-by-the-rebuild'")
        with Store(cfg.database_url) as store:
            assert check_data(store, cfg).ok
        healthy(cfg, "trader")
        healthy(cfg, "backtest")
        assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
                   for p in pids.values())
        # L2 is told what was rebuilt and what is lost (nothing: the candles came back from the exchange)
        [l2] = wait_for_messages(inbox, "/l2", 1)
        assert "the store was rebuilt without a backup: rebuilt crypto_agent.db" in l2["body"]["body"]
        assert "candles re-fetched from the exchange; lost: nothing" in l2["body"]["body"]
        assert inc.levels_told == ["l1", "l2", "l3"]  # L3: live trading was affected
        assert inc.data_lost_hours == 0
        print(f"\nno-backup rebuild ({backups}): recover-db-corruption took {took:.1f} s, "
              f"rebuild {result['rebuild']['seconds']} s by {result['rebuild']['method']}, "
              f"recovery_time_s {inc.recovery_time_s}")

    @pytest.mark.parametrize("failure", ["target-unwritable", "exchange-down"])
    def test_when_even_the_rebuild_fails_it_escalates_and_keeps_everything_stopped_for_a_person(
        self, env: dict[str, Any], simulator: Simulator, keeper: Keeper, inbox: Receiver, failure: str
    ) -> None:
        overrides = {**env, "request_retries": 0, "request_timeout_s": 2.0}
        cfg = settings_of(overrides)
        db = Path(cfg.db_path)
        checkpoint(db)
        daemon = keeper.start(process.service_spec("backtest", cfg), cfg).pid
        smash_page(db, leaf_page(db, "ohlcv_h1"))
        if failure == "target-unwritable":  # where the rebuild builds the new store, something it cannot replace
            (db.parent / f".{db.name}.rebuilding").mkdir()
        else:
            simulator.go_down("refuse")
        result = recover_db_corruption(settings=overrides, event=corrupt_event())

        assert result["outcome"] == "escalated", result
        inc = incident_of(cfg, result)
        assert inc.status == "escalated" and "no good backup" in inc.summary
        assert "The rebuild without a backup failed too" in inc.summary
        if failure == "target-unwritable":
            assert not action(inc, "rebuild")["ok"] and "refetch-candles" not in steps(inc)
            assert not db.exists()  # nothing half-built was put in place
        else:
            assert action(inc, "rebuild")["ok"] and not action(inc, "refetch-candles")["ok"]
            assert check_integrity(db, full=True).ok  # the rebuilt store waits in place for a person
        [folder] = [p for p in Path(cfg.quarantine_dir).iterdir() if p.is_dir()]
        assert (folder / "crypto_agent.db").exists()  # the corrupt file, never overwritten
        assert not psutil.pid_exists(daemon) or psutil.Process(daemon).status() == psutil.STATUS_ZOMBIE
        assert running_pid(cfg, "backtest") is None and running_pid(cfg, "trader") is None
        holder = storelock.lock_holder(db)
        assert holder is not None and "escalated, no good backup and the rebuild failed" in holder["owner"]
        for level in ("l2", "l3"):
            [msg] = wait_for_messages(inbox, f"/{level}", 1)
            assert "no good backup to restore" in msg["body"]["body"]
            assert "crypto-agent restore --backup FILE" in msg["body"]["body"]
        assert inc.levels_told == ["l1", "l2", "l3"]
        escalated = events_of(inc.flow_run_id, INCIDENT_ESCALATED, 2)  # one per level, delivered one by one
        assert sorted(e.payload["level"] for e in escalated) == ["l2", "l3"]
        # the kept lock keeps the crash recovery from starting the daemon on a broken store
        absorbed = recover_daemon_crash(settings=overrides)
        assert absorbed["outcome"] == "absorbed" and absorbed["incident_id"] is None
        assert running_pid(cfg, "backtest") is None and len(all_incidents(cfg)) == 1

    def test_a_dead_daemon_on_a_corrupt_store_is_handed_to_the_corruption_recovery(
        self, env: dict[str, Any], simulator: Simulator, keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        backup_lacking_newest_hours(cfg, simulator, hours=6)
        checkpoint(db)
        kill_and_wait(keeper.start(process.service_spec("backtest", cfg), cfg).pid)
        smash_page(db, leaf_page(db, "ohlcv_h4"))
        result = recover_daemon_crash(settings=env, event=event("crypto-agent.service.dead",
                                                                "crypto-agent.service.backtest-daemon"))

        assert result["outcome"] == "recovered", result
        crash = incident_of(cfg, result)
        store_incident = incident_of(cfg, {"incident_id": result["handed_to"]})
        assert crash.scenario == "daemon-crash" and store_incident.scenario == "db-corruption"
        assert crash.status == store_incident.status == "resolved"
        assert "handing over to recover-db-corruption" in action(crash, "integrity-check")["detail"]
        assert f"handed over to incident #{store_incident.id}" in crash.summary
        assert "restore" in steps(store_incident) and check_integrity(db, full=True).ok
        # one cause, one problem paged (issue 11): the crash's incident is linked to the corruption's, which pages
        assert f"incident #{crash.id} (daemon-crash of" in action(store_incident, "linked")["detail"]
        assert f"caused by incident #{store_incident.id}" in action(crash, "page-inhibited")["detail"]
        wait_for_messages(inbox, "/l1", 3)
        l1 = [m["body"]["subject"] for m in inbox.messages("/l1")]
        assert [x for x in l1 if f"incident #{crash.id} " in x] == [next(x for x in l1 if "opened" in x)], l1
        assert sum(f"incident #{store_incident.id} " in x for x in l1) == 2, l1  # opened, resolved
        opened = next(m for m in inbox.messages("/l1") if f"incident #{store_incident.id} opened" in
                      m["body"]["subject"])
        assert f"incident #{crash.id} (daemon-crash" in opened["body"]["body"]
        healthy(cfg, "trader")
        healthy(cfg, "backtest")

    def test_a_daemon_that_died_of_the_store_goes_to_the_corruption_recovery_at_once_whatever_the_backoff(
        self, env: dict[str, Any], simulator: Simulator, keeper: Keeper, inbox: Receiver
    ) -> None:
        overrides = {**env, "restart_backoff_base_s": 120.0, "restart_backoff_cap_s": 300.0}
        cfg = settings_of(overrides)
        db = Path(cfg.db_path)
        backup_lacking_newest_hours(cfg, simulator, hours=6)
        checkpoint(db)
        crash_loop(keeper, cfg)  # a 2nd crash in a row: the backoff alone would hold it 120 s
        smash_page(db, leaf_page(db, "ohlcv_h4"))
        line = died_of_the_store(cfg)
        started = time.monotonic()
        result = recover_daemon_crash(settings=overrides, event=event("crypto-agent.service.dead",
                                                                      "crypto-agent.service.backtest-daemon"))

        assert result["outcome"] == "recovered", result
        assert time.monotonic() - started < 120  # no backoff hold
        crash = incident_of(cfg, result)
        assert steps(crash)[:3] == ["probe", "log-errors", "restart-policy"] and "integrity-check" not in steps(crash)
        policy = action(crash, "restart-policy")["detail"]
        assert policy.startswith("corruption recovery at once, whatever the backoff") and line in policy
        store_incident = incident_of(cfg, {"incident_id": result["handed_to"]})
        assert store_incident.scenario == "db-corruption" and store_incident.status == "resolved"
        assert "restore" in steps(store_incident) and check_integrity(db, full=True).ok
        healthy(cfg, "trader")
        healthy(cfg, "backtest")

    def test_a_late_report_of_damage_already_repaired_opens_no_incident(
        self, env: dict[str, Any], inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        smash_an_index(db)
        late = corrupt_event()  # a service met the damage too: its report is relayed after the repair
        time.sleep(1.1)
        assert recover_db_corruption(settings=env, event=corrupt_event())["outcome"] == "recovered"
        result = recover_db_corruption(settings=env, event=late)
        assert result["outcome"] == "absorbed" and result["incident_id"] is None
        assert result["absorbed_by"].startswith("a late report of the damage incident #")
        assert len(all_incidents(cfg)) == 1
        # a report detected after the repair is a new problem: it is looked at (here, a sound store: skipped)
        assert recover_db_corruption(settings=env, event=corrupt_event())["outcome"] == "skipped"

    def test_a_sound_store_is_a_false_alarm_and_nothing_is_stopped(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        daemon = keeper.start(process.service_spec("backtest", cfg), cfg).pid
        result = recover_db_corruption(settings=env, event=corrupt_event())
        assert result["outcome"] == "skipped"
        assert steps(incident_of(cfg, result)) == ["event", "integrity-check"]
        assert running_pid(cfg, "backtest") == daemon


class TestStaleData:
    def _make_stale(self, db: Path) -> tuple[set[int], list[int]]:
        """BTCUSDT H1 loses its newest 10 candles (stale), ETHUSDT H1 a 5-candle gap 30 h ago; what was removed."""
        btc = {r[0] for r in rows(db, "SELECT timestamp FROM ohlcv_h1 WHERE symbol = 'BTCUSDT'")}
        newest = max(btc)
        gap_start = newest - 30 * HOUR_MS
        gap = [gap_start + i * HOUR_MS for i in range(5)]
        execute(db, "DELETE FROM ohlcv_h1 WHERE symbol = 'BTCUSDT' AND timestamp > ?", (newest - 10 * HOUR_MS,))
        execute(db, f"DELETE FROM ohlcv_h1 WHERE symbol = 'ETHUSDT' AND timestamp IN ({','.join(map(str, gap))})")
        return btc, gap

    def test_exactly_the_stale_windows_are_backfilled(self, env: dict[str, Any], inbox: Receiver) -> None:
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        btc, gap = self._make_stale(db)
        result = recover_stale_data(settings=env, event=None)

        assert result["outcome"] == "recovered", result
        assert sorted((w[0], w[1]) for w in result["windows"]) == [("BTCUSDT", "1h"), ("ETHUSDT", "1h")]
        eth = next(w for w in result["windows"] if w[0] == "ETHUSDT")
        assert (eth[2], eth[3]) == (gap[0], gap[-1] + HOUR_MS)
        assert set(result["written"]) == {"BTCUSDT 1h", "ETHUSDT 1h"} and result["written"]["ETHUSDT 1h"] == 5
        assert result["written"]["BTCUSDT 1h"] >= 10
        assert btc <= {r[0] for r in rows(db, "SELECT timestamp FROM ohlcv_h1 WHERE symbol = 'BTCUSDT'")}
        inc = incident_of(cfg, result)
        assert steps(inc) == ["check-exchange", "windows", "backfill", "validate"]
        assert "used weight" in action(inc, "check-exchange")["detail"]
        assert "a fresh check of the store" in action(inc, "windows")["detail"]
        with Store(cfg.database_url) as store:
            assert check_data(store, cfg).ok

    def test_the_event_windows_are_used_and_what_still_fails_goes_to_l2(
        self, env: dict[str, Any], inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        _, gap = self._make_stale(Path(cfg.db_path))
        windows = [{"symbol": "ETHUSDT", "timeframe": "1h", "start_ms": gap[0], "end_ms": gap[-1] + HOUR_MS},
                   {"symbol": "bad symbol!", "timeframe": "1h", "start_ms": 0, "end_ms": 1}]
        stale = event(STORE_STALE, STORE, failing_windows=windows, windows_total=2)
        result = recover_stale_data(settings=env, event=stale)

        assert result["outcome"] == "escalated", result
        assert result["written"] == {"ETHUSDT 1h": 5}  # exactly the event's window, nothing more
        assert result["failing_symbols"] == ["BTCUSDT"]
        inc = incident_of(cfg, result)
        assert "bad symbol!" in action(inc, "event-window-skipped")["detail"]
        [l2] = wait_for_messages(inbox, "/l2", 1)
        assert "still failing after the backfill: BTCUSDT" in l2["body"]["body"]

    def test_an_unreachable_exchange_escalates_to_l2(
        self, env: dict[str, Any], simulator: Simulator, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        simulator.go_down("refuse")
        result = recover_stale_data(settings={**env, "request_timeout_s": 2.0}, event=None)
        assert result["outcome"] == "escalated"
        assert "exchange unreachable" in incident_of(cfg, result).root_cause
        assert wait_for_messages(inbox, "/l2", 1)


class TestRollback:
    def test_rollback_restores_the_48h_backup_resumes_live_trading_only_and_pages_l3(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        db = Path(cfg.db_path)
        now = datetime.now(UTC)
        add_result(db, "state-of-48h-ago", now_ms() - 49 * HOUR_MS)
        two_days = backup.create(db, cfg.backup_dir, now=now - timedelta(days=2))
        add_result(db, "state-of-24h-ago", now_ms() - 25 * HOUR_MS)
        backup.create(db, cfg.backup_dir, now=now - timedelta(days=1))
        add_result(db, "state-of-now", now_ms())
        checkpoint(db)
        start_both(keeper, cfg)
        gated = Gated(settings={**env, "rollback_approval_timeout_s": GATE_S}, event=event(
            "crypto-agent.service.crashed", "crypto-agent.service.backtest-daemon"))
        gated.answer(True, "the on-call L3")  # the gate, approved in the Prefect UI
        result = gated.result()

        assert result["outcome"] == "recovered", result
        assert result["backup"] == str(two_days.path)
        inc = incident_of(cfg, result)
        assert inc.scenario == "persistent-failures" and 47 < inc.data_lost_hours < 49
        assert {r[0] for r in rows(db, "SELECT DISTINCT run_id FROM backtest_results")} == {"state-of-48h-ago"}
        quarantined = Path(result["quarantined"])
        assert "state-of-now" in {r[0] for r in rows(quarantined, "SELECT run_id FROM backtest_results")}
        assert "integrity_check: ok" in action(inc, "validate")["detail"]
        healthy(cfg, "trader")
        assert running_pid(cfg, "backtest") is None
        daemon = process.service_spec("backtest", cfg)
        assert holds.read_hold(daemon).by == f"rollback-persistent-failures #{inc.id}"
        assert holds.covering_hold(daemon, cfg, process.inspect(daemon)) is not None  # monitoring stays quiet
        ask, l3 = wait_for_messages(inbox, "/l3", 2)  # the approval asked, then the rollback done
        assert "needs approval" in ask["body"]["subject"]
        assert "a rollback to the 48 h backup was done" in l3["body"]["body"]
        assert "# Incident Report" in l3["body"]["body"]
        # nothing restarts the paused daemon until a person resumes it
        again = recover_daemon_crash(settings=env)
        assert again["outcome"] == "skipped" and running_pid(cfg, "backtest") is None
        assert holds.release_hold(daemon) is not None
        assert holds.read_hold(daemon) is None

    def test_a_rollback_without_a_48h_backup_fails_loudly_but_live_trading_resumes(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        backup.create(Path(cfg.db_path), cfg.backup_dir, now=datetime.now(UTC) - timedelta(days=1))  # too new
        start_both(keeper, cfg)
        result = rollback_persistent_failures(settings=env)
        assert result["outcome"] == "escalated"
        inc = incident_of(cfg, result)
        assert "rollback FAILED" in inc.summary and storelock.lock_holder(cfg.db_path) is None
        assert "approval-not-asked" in steps(inc)  # nothing to restore: nobody is asked, it fails loudly at once
        healthy(cfg, "trader")
        assert running_pid(cfg, "backtest") is None
        [l3] = wait_for_messages(inbox, "/l3", 1)
        assert "the rollback FAILED" in l3["body"]["body"]
        assert inc.levels_told == ["l1", "l2", "l3"]
