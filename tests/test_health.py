"""The health probe on real processes, its history in a real store, and `crypto-agent status`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from crypto_agent import health, process
from crypto_agent.daemon import FAULT_ENV, FAULT_MAX_MB_ENV
from crypto_agent.health import HealthStatus, ProbeReport
from crypto_agent.service import record_event
from crypto_agent.store import Store

try:
    from service_kit import keeper, make_settings, run_cli, seed_store, wait_until
except ImportError:  # tests/ became a package
    from tests.service_kit import keeper, make_settings, run_cli, seed_store, wait_until  # noqa: F401


def probe_until(spec, settings, predicate, what: str, timeout: float = 60.0) -> ProbeReport:
    """Probe repeatedly until a report satisfies predicate; that report."""

    def attempt() -> ProbeReport | None:
        report = health.probe(spec, settings)
        return report if predicate(report) else None

    return wait_until(attempt, timeout=timeout, what=what)


class TestVerdicts:
    def test_no_pidfile_is_dead(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        report = health.probe("backtest", settings)
        assert report.status is HealthStatus.DEAD and report.summary == "DEAD: No PID file"
        assert report.crashed_instance is None

    def test_an_empty_pidfile_is_dead(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        spec.pidfile.parent.mkdir(parents=True)
        spec.pidfile.write_text("")
        assert health.probe(spec, settings).summary.startswith("DEAD: PID file empty or invalid")

    def test_a_running_daemon_is_healthy_with_its_figures(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        report = health.probe(spec, settings)
        assert report.summary == f"HEALTHY: PID {started.pid}", report.reasons
        assert report.alive and not report.zombie and report.niceness == 10
        assert 0 <= report.heartbeat_age_s <= settings.heartbeat_max_age_s
        assert report.rss_mb is not None and 10 < report.rss_mb < settings.rss_max_mb
        assert report.cpu_pct is not None and report.log_errors_per_min == 0

    def test_a_daemon_killed_with_sigkill_is_dead(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        os.kill(started.pid, signal.SIGKILL)
        report = probe_until(spec, settings, lambda r: r.status is HealthStatus.DEAD, "DEAD")
        assert report.summary.startswith(f"DEAD: Process {started.pid} not running")
        assert not report.alive and report.crashed_instance == f"{started.pid}@{started.create_time:.2f}"

    def test_a_sigstopped_daemon_goes_degraded_on_its_stale_heartbeat_and_recovers(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path, heartbeat_max_age_s=2.0)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        os.kill(started.pid, signal.SIGSTOP)
        report = probe_until(spec, settings, lambda r: any("Heartbeat stale" in x for x in r.reasons), "stale")
        assert report.status is HealthStatus.DEGRADED and report.alive
        assert report.summary.startswith("DEGRADED: Heartbeat stale ") and report.summary.endswith("s")
        assert report.process_status == "stopped"
        os.kill(started.pid, signal.SIGCONT)
        probe_until(spec, settings, lambda r: r.healthy, "HEALTHY again")

    def test_a_cpu_burning_daemon_is_degraded_for_cpu_only(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path, cpu_max_pct=50.0)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings, env={FAULT_ENV: "burn-cpu"})
        report = probe_until(spec, settings, lambda r: r.status is HealthStatus.DEGRADED, "DEGRADED")
        assert len(report.reasons) == 1 and report.reasons[0].startswith("CPU "), report.reasons
        assert report.cpu_pct > 50

    def test_a_memory_growing_daemon_is_degraded_for_memory(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path, rss_max_mb=200.0)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings, env={FAULT_ENV: "grow-memory:200", FAULT_MAX_MB_ENV: "300"})
        report = probe_until(spec, settings, lambda r: any(x.startswith("Memory") for x in r.reasons), "memory")
        assert report.status is HealthStatus.DEGRADED and report.rss_mb > 200
        assert "> 200 MB" in report.summary or any("> 200 MB" in r for r in report.reasons)

    def test_a_daemon_logging_errors_is_degraded_for_its_error_rate(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings, env={FAULT_ENV: "log-errors:4"})
        report = probe_until(spec, settings, lambda r: any(x.startswith("Log errors") for x in r.reasons), "errors")
        assert report.log_errors_per_min > settings.log_errors_per_min_max


def log_line(epoch: float, level: str, message: str, sep: str = ":") -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))
    return f"{stamp}.000Z {level} crypto_agent.backtest[42]{sep} {message}\n"


class TestLogErrorRate:
    def test_counts_error_records_of_the_last_minute_not_their_continuation_lines(self, tmp_path: Path) -> None:
        now = 1_800_000_000.0
        log = tmp_path / "backtest_24h7.log"
        log.write_text(
            log_line(now - 300, "ERROR", "too old")
            + log_line(now - 50, "ERROR", "unit failed")
            + log_line(now - 50, "ERROR", "Traceback (most recent call last):", sep="|")
            + log_line(now - 40, "WARNING", "paused")
            + log_line(now - 30, "CRITICAL", "crashed")
            + "a stray line written by a C library ERROR\n"
            + log_line(now - 1, "ERROR", "again")
        )
        assert health.log_errors_per_minute(log, now=now) == 3.0
        assert health.log_errors_per_minute(log, window_s=120, now=now) == 1.5

    def test_reads_the_rotated_file_when_the_current_one_is_younger_than_the_window(self, tmp_path: Path) -> None:
        now = 1_800_000_000.0
        log = tmp_path / "backtest_24h7.log"
        (tmp_path / "backtest_24h7.log.1").write_text(
            log_line(now - 100, "ERROR", "old") + log_line(now - 20, "ERROR", "just before rotation")
        )
        log.write_text(log_line(now - 10, "ERROR", "after rotation"))
        assert health.log_errors_per_minute(log, now=now) == 2.0
        assert health.log_errors_per_minute(tmp_path / "missing.log", now=now) == 0.0


def report_at(at: float, cpu: float, pid: int = 7, status: HealthStatus = HealthStatus.HEALTHY) -> ProbeReport:
    return ProbeReport(
        service="backtest", status=status, pid=pid, alive=True, zombie=False, process_status="running",
        heartbeat_age_s=1.0, heartbeat_state="running", cpu_pct=cpu, rss_mb=100.0, log_errors_per_min=0.0,
        niceness=10, reasons=[], checked_at=at,
    )


class TestHistory:
    NOW = 1_800_000_000.0

    @pytest.fixture
    def store(self, tmp_path: Path):
        with Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}") as s:
            yield s

    def record_cpu(self, store: Store, points: list[tuple[float, float, int]]) -> None:
        for minutes_ago, cpu, pid in points:
            assert health.record(store, report_at(self.NOW - minutes_ago * 60, cpu, pid))

    def test_cpu_over_90_for_10_minutes_in_every_sample(self, store: Store) -> None:
        self.record_cpu(store, [(15, 20, 7), (10, 95, 7), (5, 97, 7), (0, 99, 7)])
        assert health.cpu_high_for(store, "backtest", minutes=10, limit=90, now=self.NOW)
        assert not health.cpu_high_for(store, "backtest", minutes=15, limit=90, now=self.NOW)
        assert health.cpu_high_streak_s(store, "backtest", limit=90, now=self.NOW) == 600

    def test_one_sample_under_the_limit_breaks_the_run(self, store: Store) -> None:
        self.record_cpu(store, [(10, 95, 7), (5, 50, 7), (0, 99, 7)])
        assert not health.cpu_high_for(store, "backtest", minutes=10, limit=90, now=self.NOW)

    def test_a_restart_breaks_the_run(self, store: Store) -> None:
        self.record_cpu(store, [(10, 95, 7), (5, 95, 7), (0, 99, 8)])
        assert not health.cpu_high_for(store, "backtest", minutes=10, limit=90, now=self.NOW)

    def test_old_samples_say_nothing_about_now(self, store: Store) -> None:
        self.record_cpu(store, [(120, 95, 7), (110, 95, 7), (100, 99, 7)])
        assert not health.cpu_high_for(store, "backtest", minutes=10, limit=90, now=self.NOW)

    def test_crashes_within_counts_each_crashed_instance_once(self, store: Store) -> None:
        hour = 3600
        for pid, hours_ago in ((1, 30), (2, 20), (3, 5), (4, 1)):
            record_event(store, "backtest", "crashed", pid=pid, instance=f"{pid}@1.00", source="probe",
                         at=self.NOW - hours_ago * hour)
        # seen again by another probe: the same instance, not another crash
        assert not record_event(store, "backtest", "crashed", pid=4, instance="4@1.00", source="probe", at=self.NOW)
        record_event(store, "backtest", "stopped", pid=5, instance="5@1.00", source="service", at=self.NOW)
        record_event(store, "trader", "crashed", pid=6, instance="6@1.00", source="probe", at=self.NOW)
        assert health.crashes_within(store, "backtest", 24, now=self.NOW) == 3
        assert health.crashes_within(store, "backtest", 2, now=self.NOW) == 1

    def test_recording_a_dead_report_twice_counts_one_crash(self, store: Store) -> None:
        dead = ProbeReport(
            service="backtest", status=HealthStatus.DEAD, pid=9, alive=False, zombie=False, process_status=None,
            heartbeat_age_s=None, heartbeat_state=None, cpu_pct=None, rss_mb=None, log_errors_per_min=None,
            niceness=None, reasons=["Process 9 not running"], checked_at=self.NOW, crashed_instance="9@5.00",
        )
        assert health.record(store, dead) and health.record(store, dead)
        assert health.crashes_within(store, "backtest", 24, now=self.NOW) == 1
        assert [s["status"] for s in health.samples(store, "backtest")] == ["DEAD", "DEAD"]

    def test_nothing_is_recorded_while_the_store_is_locked(self, store: Store) -> None:
        (store.path.parent / "LOCKED").touch()
        assert not health.record(store, report_at(self.NOW, 99))
        assert health.samples(store, "backtest") == []


class TestStatusCommand:
    def test_dead_prints_the_runbook_line_and_exits_1(self, tmp_path) -> None:
        settings = make_settings(tmp_path, create_store=False)
        out = run_cli(["status"], settings)
        assert (out.returncode, out.stdout) == (1, "DEAD: No PID file\n")
        assert not settings.db_path.exists()  # a probe creates no database

    def test_healthy_exits_0_and_the_sample_is_kept(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("trader", settings)
        started = keeper.start(spec, settings)
        out = run_cli(["status", "--service", "trader"], settings)
        assert (out.returncode, out.stdout) == (0, f"HEALTHY: PID {started.pid}\n"), out.stderr
        out = run_cli(["status", "--service", "trader", "--json"], settings)
        data = json.loads(out.stdout)
        assert data["status"] == "HEALTHY" and data["pid"] == started.pid and data["recorded"] is True
        with Store(settings.database_url) as store:
            assert [s["status"] for s in health.samples(store, "trader")] == ["HEALTHY", "HEALTHY"]

    def test_what_keeps_the_backtest_from_its_work_is_shown_a_yield_request_and_the_store_lock(self, tmp_path) -> None:
        from crypto_agent import priority

        settings = make_settings(tmp_path)
        priority.request_yield(settings, "recover-daemon-crash #7", "the trader is being recovered", incident_id=7)
        (settings.db_path.parent / "LOCKED").write_text('{"owner": "recover-db-corruption #8"}')
        out = run_cli(["status", "--no-record"], settings)
        assert out.returncode == 1 and out.stdout.startswith("DEAD: No PID file\n"), out.stdout
        assert "  yields to the trader (live trading first), asked by recover-daemon-crash #7 since " in out.stdout
        assert "(incident #7): the trader is being recovered" in out.stdout
        assert f"  the store is locked by a recovery: {settings.db_path.parent / 'LOCKED'}" in out.stdout
        data = json.loads(run_cli(["status", "--no-record", "--json"], settings).stdout)
        assert data["yield_request"]["incident_id"] == 7 and data["hold"] is None and data["store_locked"]
        trader = run_cli(["status", "--service", "trader", "--no-record"], settings)
        assert "yields" not in trader.stdout  # the trader yields to nobody

    def test_degraded_prints_the_stale_heartbeat_and_exits_1(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path, heartbeat_max_age_s=1.0)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        os.kill(started.pid, signal.SIGSTOP)
        out = wait_until(
            lambda: (o := run_cli(["status"], settings)).stdout.startswith("DEGRADED: Heartbeat stale") and o,
            what="DEGRADED from the command",
        )
        assert out.returncode == 1

    def test_an_unknown_service_exits_2(self, tmp_path) -> None:
        out = run_cli(["status", "--service", "main.py"], make_settings(tmp_path))
        assert out.returncode == 2 and "unknown service" in out.stderr


def test_a_writer_holding_the_store_fails_the_recording_fast_not_the_probe(tmp_path: Path) -> None:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    with Store(f"sqlite:///{tmp_path / 'db' / 'crypto_agent.db'}") as store:
        holder = sqlite3.connect(store.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # like a service stopped in the middle of a write
        try:
            with pytest.raises(OperationalError, match="locked"):
                health.record(store, report_at(TestHistory.NOW, 10), busy_timeout_s=0.2)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert health.record(store, report_at(TestHistory.NOW, 10))
