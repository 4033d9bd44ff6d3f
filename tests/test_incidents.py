"""The incident log (open or join, actions, close, MTTR, report), the recovery decisions and careful
steps (triage, log errors, REINDEX on a copy, salvage, the lock handed to a person), the pause marker,
and the `crypto-agent incidents` / `service pause|resume` commands. Real SQLite files and processes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from service_kit import make_settings, run_cli

from crypto_agent import holds, incidents, process, recovery, storelock
from crypto_agent.errors import InputError
from crypto_agent.health import HealthStatus, ProbeReport
from crypto_agent.incidents import ESCALATED, FAILED, OPEN, RESOLVED
from crypto_agent.settings import Settings, load_settings
from crypto_agent.store import Store, check_integrity

DAEMON = "crypto-agent.service.backtest-daemon"
STORE = "crypto-agent.store.main"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(home=tmp_path)


@pytest.fixture
def log(settings: Settings):
    store = incidents.open_incident_store(settings)
    yield store
    store.close()


def _event(name: str = "crypto-agent.service.dead", **payload: Any) -> dict[str, Any]:
    return {"id": "e-1", "event": name, "occurred": "2026-02-22T14:30:05+00:00", "resource": DAEMON,
            "payload": payload}


class TestOpenOrJoin:
    def test_the_first_event_opens_and_a_second_joins_the_open_incident(self, log: Store) -> None:
        first, joined = incidents.open_or_join(log, "daemon-crash", DAEMON, {"event": "a"}, 1000.0)
        second, joined_again = incidents.open_or_join(log, "process-hang", DAEMON, {"event": "b"}, 1001.0)
        assert (joined, joined_again) == (False, True)
        assert second.id == first.id and second.scenario == "daemon-crash"
        assert second.events_absorbed == 1
        assert first.status == OPEN and first.family == "service"

    def test_other_families_and_resources_open_their_own(self, log: Store) -> None:
        crash, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 1.0)
        rollback, joined = incidents.open_or_join(log, "persistent-failures", DAEMON, {}, 1.0)
        stale, joined_stale = incidents.open_or_join(log, "stale-data", STORE, {}, 1.0)
        corrupt, joined_corrupt = incidents.open_or_join(log, "db-corruption", STORE, {}, 1.0)
        assert not (joined or joined_stale or joined_corrupt)
        assert len({crash.id, rollback.id, stale.id, corrupt.id}) == 4

    def test_after_the_close_the_next_event_opens_a_new_incident(self, log: Store) -> None:
        first, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 1.0)
        incidents.resolve(log, first.id, summary="restarted")
        second, joined = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 2.0)
        assert not joined and second.id != first.id

    def test_an_incident_whose_recovery_process_died_is_abandoned_not_joined(self, log: Store) -> None:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        old, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 1.0,
                                        owner=f"{os.uname().nodename}:{dead.pid}:12345.00")
        new, joined = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 2.0)
        assert not joined and new.id != old.id
        abandoned = incidents.get(log, old.id)
        assert abandoned.status == FAILED and "abandoned" in abandoned.summary

    def test_an_unknown_scenario_is_refused(self, log: Store) -> None:
        with pytest.raises(InputError, match="unknown incident scenario"):
            incidents.open_or_join(log, "meteor-strike", DAEMON, {}, 1.0)
        assert incidents.list_incidents(log) == []

    def test_many_processes_at_once_open_exactly_one(self, settings: Settings, tmp_path: Path) -> None:
        incidents.open_incident_store(settings).close()
        go = time.time() + 5  # every process imported and waiting, even on a loaded machine
        # Each process stays alive (as a recovery does while it runs) until the test has read every
        # answer: an owner that already exited would rightly have its incident abandoned, not joined.
        code = textwrap.dedent(f"""
            import sys, time, json
            from crypto_agent import incidents
            from crypto_agent.settings import load_settings
            store = incidents.open_incident_store(load_settings(home={str(tmp_path)!r}))
            time.sleep(max(0, {go} - time.time()))
            inc, joined = incidents.open_or_join(store, "daemon-crash", {DAEMON!r}, {{}}, time.time())
            print(json.dumps([inc.id, joined]), flush=True)
            sys.stdin.read()
        """)
        procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True) for _ in range(6)]
        try:
            results = [json.loads(p.stdout.readline()) for p in procs]
        finally:
            for p in procs:
                p.stdin.close()
        assert all(p.wait(timeout=60) == 0 for p in procs)
        assert len({r[0] for r in results}) == 1
        assert sorted(r[1] for r in results) == [False] + [True] * 5
        with incidents.open_incident_store(settings) as log:
            assert incidents.get(log, results[0][0]).events_absorbed == 5


class TestActionsAndClose:
    def test_actions_append_and_each_level_is_recorded_once(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 1.0)
        incidents.add_action(log, inc.id, "probe", "DEAD: No PID file")
        incidents.add_action(log, inc.id, "start", "failed", ok=False)
        for level in ("l1", "l1", "l3"):
            incidents.told(log, inc.id, level)
        got = incidents.get(log, inc.id)
        assert [(a["step"], a["ok"]) for a in got.actions] == [("probe", True), ("start", False)]
        assert got.levels_told == ["l1", "l3"]
        with pytest.raises(InputError):
            incidents.told(log, inc.id, "l9")

    def test_close_computes_detection_delay_and_recovery_time(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 1000.0, fault_at_s=990.0, now=1001.0)
        closed = incidents.resolve(log, inc.id, summary="restarted", impact="Backtest paused",
                                   root_cause="Other: crash", data_lost_hours=0, now=1031.0)
        assert closed.status == RESOLVED and closed.outcome == "recovered"
        assert closed.detection_delay_s == 10.0
        assert closed.recovery_time_s == 31.0
        assert closed.duration_s == 41.0
        again = incidents.fail(log, inc.id, "late failure", now=2000.0)
        assert again.status == RESOLVED and again.recovery_time_s == 31.0  # a closed incident stays as it was

    def test_escalate_closes_with_the_reason_and_unknown_fault_time_leaves_the_delay_unknown(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "db-corruption", STORE, {}, 50.0, now=50.0)
        closed = incidents.escalate(log, inc.id, "l2", "no good backup", now=80.0)
        assert closed.status == ESCALATED and closed.summary == "no good backup"
        assert closed.detection_delay_s is None and closed.recovery_time_s == 30.0
        assert closed.actions[-1]["step"] == "escalate-l2"
        with pytest.raises(InputError):
            incidents.close(log, inc.id, "open", outcome="x", summary="y")

    def test_update_fields_refuses_what_is_not_descriptive(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 1.0)
        with pytest.raises(InputError, match="cannot be set"):
            incidents.update_fields(log, inc.id, status="resolved")
        assert incidents.get(log, inc.id).status == OPEN


class TestMttr:
    def test_mttr_per_scenario_counts_only_recovered_incidents(self, log: Store) -> None:
        for detected, closed in ((100.0, 110.0), (200.0, 230.0), (300.0, 320.0)):
            inc, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, detected, now=detected)
            incidents.resolve(log, inc.id, summary="ok", now=closed)
        failed, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 400.0, now=400.0)
        incidents.fail(log, failed.id, "boom", now=5000.0)
        slow, _ = incidents.open_or_join(log, "stale-data", STORE, {}, 0.0, now=0.0)
        incidents.resolve(log, slow.id, summary="ok", now=1200.0)
        stats = {s.scenario: s for s in incidents.mttr_by_scenario(log)}
        crash = stats["daemon-crash"]
        assert (crash.incidents, crash.recovered, crash.failed) == (4, 3, 1)
        assert crash.mttr_s == 20.0 and crash.p95_s == 30.0 and crash.max_s == 30.0
        assert crash.eta_s == 120.0 and crash.within_eta is True
        assert stats["stale-data"].within_eta is False  # 20 min against 15
        assert stats["process-hang"].mttr_s is None and stats["process-hang"].within_eta is None
        assert [s.number for s in stats.values()] == [1, 2, 3, 4, 5]

    def test_recent_count_looks_back_the_given_hours(self, log: Store) -> None:
        now = time.time()
        for age_h in (30, 5, 1):
            incidents.open_or_join(log, "daemon-crash", f"r{age_h}", {}, now, now=now - age_h * 3600)
        assert incidents.recent_count(log, "daemon-crash", 24, now=now) == 2
        assert incidents.recent_count(log, "process-hang", 24, now=now) == 0

    def test_percentile_is_nearest_rank(self) -> None:
        assert incidents.percentile([], 95) is None
        assert incidents.percentile([5.0, 1.0, 3.0], 50) == 3.0
        assert incidents.percentile(list(map(float, range(1, 101))), 95) == 95.0


class TestReport:
    def test_the_runbook_checklist_is_filled_in(self, log: Store) -> None:
        detected = incidents.parse_time("2026-02-22T14:30:05Z")
        trigger = incidents.trigger_of(_event("crypto-agent.store.corrupt"))
        inc, _ = incidents.open_or_join(log, "db-corruption", STORE, trigger, detected,
                                        fault_at_s=detected - 120, now=detected + 1)
        incidents.add_action(log, inc.id, "restore", "restored db_backup_20260221.db\nline two of the detail")
        incidents.told(log, inc.id, "l1")
        closed = incidents.resolve(log, inc.id, summary="restored", impact="Backtest paused, live trading OK",
                                   root_cause="DB corruption: row 5 missing from index", data_lost_hours=0,
                                   now=detected + 600)
        md = incidents.render_report(closed, "http://ui/flow-runs/flow-run/x")
        assert md.startswith(f"# Incident Report #{inc.id}: scenario 3: Database corruption")
        assert "**Date:** 2026-02-22" in md and "**Time:** 14:28 UTC" in md
        assert "**Duration:** 12.0 min" in md
        assert "**Impact:** Backtest paused, live trading OK" in md
        assert "[ ] Process hang [x] DB corruption [ ] API throttle [ ] Other: ___" in md
        assert "row 5 missing from index" in md
        assert "[x] Automated [ ] Manual notice" in md
        assert "Detection delay: 2.0 min (fault 2026-02-22T14:28:05Z, detected 2026-02-22T14:30:05Z)" in md
        assert "`restore`: restored db_backup_20260221.db" in md and "line two of the detail" in md
        assert "Recovery time: 10.0 min (within the runbook's ETA of 30 min)" in md
        assert "Data loss: 0 hours" in md and "Escalated to: L1" in md
        assert "Flow run: http://ui/flow-runs/flow-run/x" in md
        assert "Owner: ___ | Due: 2026-02-24" in md

    def test_a_manual_run_with_another_cause_ticks_manual_and_other(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 100.0, now=100.0)
        md = incidents.render_report(incidents.resolve(log, inc.id, summary="x", root_cause="Other: killed",
                                                       now=400.0))
        assert "[ ] Automated [x] Manual notice" in md
        assert "[ ] Process hang [ ] DB corruption [ ] API throttle [x] Other: killed" in md
        assert "Detection delay: unknown" in md
        assert "Recovery time: 5.0 min (over the runbook's ETA of 2 min)" in md


class TestTheTriggeringEvent:
    def test_detected_at_comes_from_the_payload_else_the_event_time_else_now(self) -> None:
        assert incidents.detected_at(_event(detected_at="2026-02-22T14:30:00+00:00")) == \
            incidents.parse_time("2026-02-22T14:30:00Z")
        assert incidents.detected_at(_event()) == incidents.parse_time("2026-02-22T14:30:05Z")
        assert incidents.detected_at(None, now=42.0) == 42.0
        assert incidents.parse_time(1_771_770_600_000) == 1_771_770_600.0
        assert incidents.parse_time("not a time") is None

    def test_a_payload_rendered_as_text_is_read_and_a_huge_one_is_bounded(self) -> None:
        assert incidents.event_payload({"payload": '{"pid": 7}'}) == {"pid": 7}
        assert incidents.event_payload({"payload": "garbage"}) == {}
        big = incidents.trigger_of(_event(windows=["x" * 100] * 1000))
        assert big["payload"]["truncated"] is True and big["event"] == "crypto-agent.service.dead"
        assert incidents.trigger_of(None) == {}


def _report(**kw: Any) -> ProbeReport:
    base: dict[str, Any] = {
        "service": "backtest", "status": HealthStatus.HEALTHY, "pid": 123, "alive": True, "zombie": False,
        "process_status": "sleeping", "heartbeat_age_s": 1.0, "heartbeat_state": "running", "cpu_pct": 1.0,
        "rss_mb": 50.0, "log_errors_per_min": 0.0, "niceness": 10, "reasons": [], "liveness": "ours",
    }
    base.update(kw)
    return ProbeReport(**base)


class TestTriage:
    def test_dead_hung_and_running(self) -> None:
        dead = recovery.triage(_report(status=HealthStatus.DEAD, alive=False, reasons=["No PID file"],
                                       liveness="no-pidfile"), 120)
        assert dead.verdict is recovery.Verdict.DEAD and dead.foreign is None
        stopped = recovery.triage(_report(status=HealthStatus.DEGRADED, process_status="stopped"), 120)
        stale = recovery.triage(_report(status=HealthStatus.DEGRADED, heartbeat_age_s=300.0), 120)
        silent = recovery.triage(_report(status=HealthStatus.DEGRADED, heartbeat_age_s=None), 120)
        assert {stopped.verdict, stale.verdict, silent.verdict} == {recovery.Verdict.HUNG}
        assert "300 s old" in stale.reason
        busy = recovery.triage(_report(status=HealthStatus.DEGRADED, cpu_pct=99.0, reasons=["CPU 99% > 90%"]), 120)
        assert busy.verdict is recovery.Verdict.RUNNING

    def test_a_pidfile_naming_a_stranger_is_dead_with_the_stranger_named(self) -> None:
        t = recovery.triage(_report(status=HealthStatus.DEAD, alive=False, liveness="foreign",
                                    reasons=["Process 99 cannot be proven to be the backtest service"]), 120)
        assert t.verdict is recovery.Verdict.DEAD and "cannot be proven" in t.foreign

    def test_restart_is_held_for_the_rest_of_the_grace_period(self) -> None:
        assert recovery.restart_wait_s(None, 300) == 0.0
        assert recovery.restart_wait_s(1000.0, 300, now=1100.0) == 200.0
        assert recovery.restart_wait_s(1000.0, 300, now=1400.0) == 0.0

    def test_a_service_silent_past_the_heartbeat_limit_gets_the_short_stop_grace(self) -> None:
        cfg = load_settings(heartbeat_max_age_s=20.0, stop_grace_s=10.0, hung_stop_grace_s=2.0)
        assert recovery.stop_grace_s(cfg) == 10.0  # nothing known of its heartbeat
        assert recovery.stop_grace_s(cfg, 3.0) == 10.0  # still beating (CPU or memory over, stale results)
        assert recovery.stop_grace_s(cfg, 25.0) == 2.0  # hung
        assert recovery.stop_grace_s(load_settings(stop_grace_s=1.0, hung_stop_grace_s=2.0), 500.0) == 1.0


def test_log_errors_keeps_error_records_with_their_tracebacks(tmp_path: Path) -> None:
    log_file = tmp_path / "backtest_24h7.log"
    lines = [f"2026-02-22T14:00:{i:02d}.000Z INFO crypto_agent.backtest[7]: unit {i}" for i in range(150)]
    lines += [
        "2026-02-22T14:03:00.000Z ERROR crypto_agent.backtest[7]: unit BTCUSDT failed",
        "2026-02-22T14:03:00.000Z ERROR crypto_agent.backtest[7]| Traceback (most recent call last):",
        "2026-02-22T14:03:00.000Z ERROR crypto_agent.backtest[7]| ValueError: bad",
        "2026-02-22T14:03:01.000Z INFO crypto_agent.backtest[7]: unit ETHUSDT",
        "2026-02-22T14:03:01.000Z INFO crypto_agent.backtest[7]| continuation of an info line",
        "Fatal Python error: Segmentation fault",
        "2026-02-22T14:03:02.000Z CRITICAL crypto_agent.backtest[7]: backtest service crashed: boom",
    ]
    log_file.write_text("\n".join(lines) + "\n")
    got = recovery.log_errors(log_file)
    assert got == [lines[150], lines[151], lines[152], lines[155], lines[156]]
    assert recovery.log_errors(tmp_path / "missing.log") == []


# --- the store's careful repairs ---


def _db_with_rows(path: Path, n: int = 3000) -> None:
    with Store(f"sqlite:///{path}") as store:
        candles = [(t * 3_600_000, 1.0, 2.0, 0.5, 1.5, 10.0, t * 3_600_000 + 3_599_999, 15.0, 3) for t in range(n)]
        store.upsert_candles("BTCUSDT", "1h", candles)
        with store.engine.begin() as conn:
            conn.exec_driver_sql("CREATE INDEX ix_test_close ON ohlcv_h1 (close, symbol)")
            for i in range(200):
                conn.exec_driver_sql(
                    "INSERT INTO backtest_results (run_id, strategy, params, symbol, timeframe, period_start, "
                    "period_end, candles, fee_bps, total_return, max_drawdown, trades, exposure, created_at) "
                    f"VALUES ('r', 's', '{{}}', 'BTCUSDT', '1h', 0, 1, 10, 1.0, 0.1, -0.1, 3, 0.5, {i * 1000})")
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()


def _page_of(path: Path, name: str, leaf: bool = True) -> int:
    conn = sqlite3.connect(path)
    try:
        kind = "leaf" if leaf else "internal"
        sql = "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = ? ORDER BY pageno LIMIT 1 OFFSET 1"
        return conn.execute(sql, (name, kind)).fetchone()[0]
    finally:
        conn.close()


def _smash_page(path: Path, page: int) -> None:
    conn = sqlite3.connect(path)
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with path.open("r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\x0d\x00\x00\x00\x10" + b"\xff" * 200)


class TestReindexOnACopy:
    def test_a_damaged_index_is_repaired_on_the_copy_and_the_live_file_untouched(self, tmp_path: Path) -> None:
        db = tmp_path / "db" / "crypto_agent.db"
        _db_with_rows(db)
        _smash_page(db, _page_of(db, "ix_test_close"))
        before = db.read_bytes()
        assert not check_integrity(db, full=True).ok
        result = recovery.reindex_copy(db, tmp_path / "db" / ".repair-1")
        assert result.ok and result.repaired is not None
        assert check_integrity(result.repaired, full=True).ok
        assert db.read_bytes() == before  # the live (corrupt) file was only read
        folder = recovery.put_repaired_in_place(db, result.repaired, tmp_path / "quarantine", "test")
        assert check_integrity(db, full=True).ok
        assert (folder / "crypto_agent.db").read_bytes() == before
        assert not (tmp_path / "db" / ".repair-1").exists()

    def test_a_damaged_table_page_is_not_repaired_and_the_scratch_copy_is_removed(self, tmp_path: Path) -> None:
        db = tmp_path / "crypto_agent.db"
        _db_with_rows(db)
        _smash_page(db, _page_of(db, "ohlcv_h1"))
        result = recovery.reindex_copy(db, tmp_path / ".repair-2")
        assert not result.ok and result.repaired is None and result.problems
        assert not (tmp_path / ".repair-2").exists()
        assert recovery.reindex_copy(tmp_path / "none.db", tmp_path / ".r").problems[0].endswith("does not exist")


def test_salvage_copies_the_readable_newer_rows_of_non_candle_tables(tmp_path: Path) -> None:
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    _db_with_rows(new)
    with Store(f"sqlite:///{old}"):
        pass
    got = recovery.salvage_since(new, old, since_ms=150_000)
    assert got.copied["backtest_results"] == 50  # created_at 150 000 .. 199 000
    assert "ohlcv_h1" not in got.copied  # candles come back from the exchange instead
    assert got.complete
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT MIN(created_at), COUNT(*) FROM backtest_results").fetchone() == (150_000, 50)
    assert conn.execute("SELECT COUNT(*) FROM ohlcv_h1").fetchone()[0] == 0
    conn.close()


def test_salvage_keeps_the_claims_of_reported_crashes_with_the_crashes(tmp_path: Path) -> None:
    """A restore that brought the crashes back without the monitor's claims would have them reported again and
    counted twice by the persistent-failures threshold (seen: a rollback nobody needed, in the chaos drills)."""
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    for path in (old, new):
        with Store(f"sqlite:///{path}"):
            pass
    conn = sqlite3.connect(new)
    conn.executemany("INSERT INTO reported_service_events VALUES ('backtest', 'crashed', ?, ?)",
                     [("1@1", 100_000), ("2@1", 200_000)])
    conn.commit()
    conn.close()
    got = recovery.salvage_since(new, old, since_ms=150_000)
    assert got.copied["reported_service_events"] == 1 and "reported_service_events" not in got.skipped
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT instance FROM reported_service_events").fetchall() == [("2@1",)]
    conn.close()


def test_a_lock_handed_to_a_person_outlives_the_recovery_that_held_it(tmp_path: Path) -> None:
    db = tmp_path / "crypto_agent.db"
    with storelock.recovery_lock(db, "recover-db-corruption #3"):
        recovery.hand_lock_to_person(db, "recover-db-corruption #3: escalated")
    holder = storelock.lock_holder(db)
    assert holder is not None and holder["owner"] == "recover-db-corruption #3: escalated" and "pid" not in holder
    with pytest.raises(storelock.RecoveryLocked, match="escalated"), storelock.recovery_lock(db, "someone else"):
        pass


# --- the pause marker ---


class TestPause:
    def test_a_paused_service_is_not_started_until_resumed(self, tmp_path: Path) -> None:
        s = make_settings(tmp_path)
        spec = process.service_spec("backtest", s)
        marker = holds.keep_stopped(spec, reason="rollback incident #4", by="rollback-persistent-failures #4")
        assert marker == s.run_dir / "backtest.paused"
        assert holds.read_hold(spec).reason == "rollback incident #4"
        with pytest.raises(holds.ServicePaused, match="service resume backtest"):
            process.start(spec, s)
        assert not spec.pidfile.exists() and not spec.log.exists()  # nothing was spawned
        assert holds.release_hold(spec).by == "rollback-persistent-failures #4"
        assert holds.read_hold(spec) is None and holds.release_hold(spec) is None

    def test_the_cli_pauses_and_resumes(self, tmp_path: Path) -> None:
        s = make_settings(tmp_path)
        spec = process.service_spec("backtest", s)
        paused = run_cli(["service", "pause", "backtest", "--reason", "investigating"], s)
        assert paused.returncode == 0, paused.stderr
        assert "it was not running" in paused.stdout and holds.read_hold(spec).reason == "investigating"
        refused = run_cli(["service", "start", "backtest"], s)
        assert refused.returncode == 1 and "is paused (investigating" in refused.stderr
        resumed = run_cli(["service", "resume", "backtest", "--no-start"], s)
        assert resumed.returncode == 0 and "resumed backtest" in resumed.stdout and "investigating" in resumed.stdout
        assert holds.read_hold(spec) is None
        assert "was not paused" in run_cli(["service", "resume", "backtest", "--no-start"], s).stdout


# --- crypto-agent incidents ---


class TestIncidentsCommand:
    def test_lists_incidents_and_mttr_against_the_eta(self, tmp_path: Path) -> None:
        s = make_settings(tmp_path, create_store=False)
        with incidents.open_incident_store(s) as log:
            a, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 100.0, now=100.0)
            incidents.told(log, a.id, "l1")
            incidents.resolve(log, a.id, summary="restarted", data_lost_hours=0, now=130.0)
            b, _ = incidents.open_or_join(log, "db-corruption", STORE, {}, 200.0, now=200.0)
        out = run_cli(["incidents"], s)
        assert out.returncode == 0, out.stderr
        assert "daemon-crash" in out.stdout and "resolved" in out.stdout and "30 s" in out.stdout
        assert "1 daemon-crash" in out.stdout and "within ETA" in out.stdout
        opened = run_cli(["incidents", "--open"], s)
        assert "db-corruption" in opened.stdout and "daemon-crash" not in opened.stdout
        data = json.loads(run_cli(["incidents", "--json"], s).stdout)
        assert [i["id"] for i in data["incidents"]] == [b.id, a.id]
        crash = next(m for m in data["mttr"] if m["scenario"] == "daemon-crash")
        assert crash["mttr_s"] == 30.0 and crash["eta_s"] == 120.0 and crash["within_eta"] is True
        report = run_cli(["incidents", "--report", str(a.id)], s)
        assert report.stdout.startswith(f"# Incident Report #{a.id}")

    def test_no_log_yet_and_an_unknown_incident(self, tmp_path: Path) -> None:
        s = make_settings(tmp_path, create_store=False)
        out = run_cli(["incidents"], s)
        assert out.returncode == 0 and "no incidents recorded" in out.stdout
        assert not incidents.incidents_db_path(s).exists()  # listing creates nothing
        with incidents.open_incident_store(s):
            pass
        missing = run_cli(["incidents", "--report", "99"], s)
        assert missing.returncode == 1 and "no incident #99" in missing.stderr


# --- a problem the recoveries cannot fix: one incident that needs a person (issue 10) ---


class TestNeedsPerson:
    def test_an_incident_log_written_before_the_new_columns_gains_them_and_keeps_its_rows(
        self, settings: Settings
    ) -> None:
        with incidents.open_incident_store(settings) as log:
            old, _ = incidents.open_or_join(log, "db-corruption", STORE, {"event": "e"}, 50.0, now=50.0)
            incidents.escalate(log, old.id, "l2", "no good backup", now=80.0)
        path = incidents.incidents_db_path(settings)
        conn = sqlite3.connect(path)
        try:  # back to the file an older version wrote
            for name in incidents.log.ADDED_COLUMNS:
                conn.execute(f"ALTER TABLE incidents DROP COLUMN {name}")
            conn.commit()
            assert not {r[1] for r in conn.execute("PRAGMA table_info(incidents)")} & set(incidents.log.ADDED_COLUMNS)
        finally:
            conn.close()
        with incidents.open_incident_store(settings) as log:
            kept = incidents.get(log, old.id)
            assert (kept.status, kept.summary, kept.needs_person, kept.detections) == (ESCALATED, "no good backup",
                                                                                       False, 0)
            new, joined = incidents.open_or_join(log, "db-corruption", STORE, {}, 90.0, now=90.0)
            assert not joined and new.id != old.id
            incidents.escalate(log, new.id, "l2", "still no backup", now=95.0)
            assert incidents.needs_person_incident(log, "db-corruption", STORE).id == new.id
        with incidents.open_incident_store(settings) as log:  # a second open adds nothing twice
            assert len(incidents.list_incidents(log)) == 2

    def test_an_unfixed_incident_needs_a_person_and_is_rejoined_until_it_resolves(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "stale-data", STORE, {}, 100.0, now=100.0)
        assert not inc.needs_person and incidents.needs_person_incident(log, "stale-data", STORE) is None
        incidents.told(log, inc.id, "l2", now=110.0)
        closed = incidents.escalate(log, inc.id, "l2", "the exchange cannot be used", now=120.0)
        assert closed.needs_person and closed.needs_person_since == 120_000 and closed.last_paged_at == 110_000
        assert incidents.needs_person_incident(log, "stale-data", STORE).id == inc.id
        assert incidents.needs_person_incident(log, "db-corruption", STORE) is None  # another scenario
        assert incidents.needs_person_incident(log, "stale-data", DAEMON) is None  # another resource

        again = incidents.rejoin(log, inc.id, flow_run_id="run-2")
        assert again is not None and again.is_open and again.detections == 1 and again.flow_run_id == "run-2"
        assert again.resolved_at is None and again.outcome is None
        assert incidents.rejoin(log, inc.id) is None  # open already: a second recovery joins it as usual
        absorbed, joined = incidents.open_or_join(log, "stale-data", STORE, {}, 130.0)  # opened long ago, but
        assert joined and absorbed.id == inc.id  # rejoined just now: not abandoned
        failed = incidents.escalate(log, inc.id, "l2", "still down", now=200.0)
        assert failed.needs_person and failed.needs_person_since == 120_000  # since the first time
        third = incidents.rejoin(log, inc.id)
        assert third is not None and third.detections == 2
        fixed = incidents.resolve(log, inc.id, summary="backfilled", now=300.0)
        assert fixed.status == RESOLVED and not fixed.needs_person and fixed.recovery_time_s == 200.0
        assert incidents.needs_person_incident(log, "stale-data", STORE) is None
        assert incidents.rejoin(log, inc.id) is None
        new, joined = incidents.open_or_join(log, "stale-data", STORE, {}, 400.0)
        assert not joined and new.id != inc.id

    def test_a_rejoin_waits_for_another_open_incident_of_the_family(self, log: Store) -> None:
        crash, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 1.0)
        incidents.fail(log, crash.id, "the restart failed")
        hang, _ = incidents.open_or_join(log, "process-hang", DAEMON, {}, 2.0)
        assert incidents.rejoin(log, crash.id) is None  # the unique open index: one per resource and family
        assert not incidents.get(log, crash.id).is_open
        incidents.resolve(log, hang.id, summary="restarted")
        assert incidents.rejoin(log, crash.id) is not None

    def test_a_person_clears_it_and_the_next_detection_opens_a_new_incident(self, log: Store) -> None:
        inc, _ = incidents.open_or_join(log, "db-corruption", STORE, {}, 1.0)
        with pytest.raises(InputError, match="is open"):
            incidents.clear_needs_person(log, inc.id, by="alice")
        escalated = incidents.escalate(log, inc.id, "l2", "no good backup")
        assert [i.id for i in incidents.needing_person(log)] == [inc.id]
        assert (f"**Status:** escalated (escalated); NEEDS A PERSON since {incidents.iso(escalated.resolved_at)} "
                f"(0 detection(s) since; once fixed by hand: `crypto-agent incidents --resolve {inc.id}`)"
                ) in incidents.render_report(escalated)
        cleared = incidents.clear_needs_person(log, inc.id, by="alice", note="restored by hand")
        assert not cleared.needs_person and cleared.status == ESCALATED  # how the recovery ended stays
        assert cleared.actions[-1]["step"] == "resolved-by-person"
        assert cleared.actions[-1]["detail"] == "resolved by alice: restored by hand"
        assert incidents.needing_person(log) == [] and incidents.rejoin(log, inc.id) is None
        with pytest.raises(InputError, match="does not need a person"):
            incidents.clear_needs_person(log, inc.id, by="alice")

    def test_the_cli_lists_and_resolves_what_needs_a_person(self, tmp_path: Path) -> None:
        s = make_settings(tmp_path, create_store=False)
        with incidents.open_incident_store(s) as log:
            a, _ = incidents.open_or_join(log, "stale-data", STORE, {}, 100.0, now=100.0)
            incidents.escalate(log, a.id, "l2", "the exchange cannot be used", now=130.0)
            b, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, 200.0, now=200.0)
            incidents.resolve(log, b.id, summary="restarted", now=210.0)
        listed = run_cli(["incidents", "--needs-person"], s)
        assert listed.returncode == 0, listed.stderr
        assert "stale-data" in listed.stdout and "NEEDS A PERSON (0 detections since" in listed.stdout
        assert "daemon-crash" not in listed.stdout
        done = run_cli(["incidents", "--resolve", str(a.id), "--note", "exchange back"], s)
        assert done.returncode == 0, done.stderr
        assert f"incident #{a.id} (stale-data, {STORE}) no longer needs a person" in done.stdout
        with incidents.open_incident_store(s) as log:
            assert not incidents.get(log, a.id).needs_person
        again = run_cli(["incidents", "--resolve", str(a.id)], s)
        assert again.returncode != 0 and "does not need a person" in again.stderr
