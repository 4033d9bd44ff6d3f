"""The service runtime, through the real daemon and trader processes: pidfile, heartbeat, log, signals, LOCKED."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from sqlalchemy import func, select

from crypto_agent import health, process
from crypto_agent.daemon import FAULT_ENV, parse_fault
from crypto_agent.errors import ConfigError
from crypto_agent.schema import backtest_results, paper_positions, paper_signals
from crypto_agent.service import (
    LOG_LINE_RE,
    STATE_PAUSED_LOCKED,
    ServiceAlreadyRunning,
    ServiceLogFormatter,
    read_heartbeat,
    read_pid_record,
)
from crypto_agent.store import Store
from crypto_agent.trader import open_positions, run_cycle

try:
    from service_kit import (
        dead_pid,
        keeper,
        make_settings,
        read_lines,
        seed_store,
        synthetic_candles,
        wait_until,
    )
except ImportError:  # tests/ became a package
    from tests.service_kit import (
        dead_pid,
        keeper,  # noqa: F401 (a fixture)
        make_settings,
        read_lines,
        seed_store,
        synthetic_candles,
        wait_until,
    )


def result_count(settings) -> int:
    with Store(settings.database_url) as store, store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(backtest_results)).scalar())


def heartbeat_state(spec) -> str:
    beat = read_heartbeat(spec.heartbeat)
    return beat.state if beat else ""


class TestPidfileAndHeartbeat:
    def test_daemon_writes_pidfile_ownership_record_and_a_three_line_heartbeat(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)

        assert spec.pidfile == tmp_path / "run" / "backtest.pid"
        assert spec.heartbeat == tmp_path / "run" / "backtest.heartbeat"
        assert spec.log == tmp_path / "logs" / "backtest_24h7.log"
        assert spec.pidfile.read_text().strip() == str(started.pid)
        record = read_pid_record(spec.pid_record)
        proc = psutil.Process(started.pid)
        assert record is not None and record.pid == started.pid and record.service == "backtest"
        assert record.create_time == pytest.approx(proc.create_time(), abs=0.01)
        assert record.cmdline == proc.cmdline() == [sys.executable, "-m", "crypto_agent.daemon"]

        wait_until(lambda: heartbeat_state(spec).startswith("running"), what="a running heartbeat")
        first, state, pid = spec.heartbeat.read_text().splitlines()
        assert first.isdigit() and abs(int(first) - time.time()) < 60
        assert state.startswith("running") and int(pid) == started.pid
        # the runbook's arithmetic on the first line: $(( $(date +%s) - epoch ))
        age = subprocess.run(
            ["bash", "-c", f'echo $(( $(date +%s) - $(head -n1 "{spec.heartbeat}") ))'],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        assert 0 <= int(age) < 60

    def test_daemon_runs_at_lower_priority_than_the_trader(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        daemon = keeper.start(process.service_spec("backtest", settings), settings)
        trader = keeper.start(process.service_spec("trader", settings), settings)
        assert psutil.Process(daemon.pid).nice() == 10
        assert psutil.Process(trader.pid).nice() == 0
        assert os.getsid(daemon.pid) == daemon.pid  # its own session: no terminal signal reaches it

    def test_on_an_empty_store_the_daemon_warns_and_keeps_heart_beating(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings)
        first = wait_until(lambda: read_heartbeat(spec.heartbeat), what="a heartbeat")
        later = wait_until(
            lambda: (b := read_heartbeat(spec.heartbeat)) and b.epoch > first.epoch and b,
            timeout=30, what="the heartbeat to advance",
        )
        assert later.state == "idle: empty store"
        log = "\n".join(read_lines(spec.log))
        assert "WARNING" in log and "holds no candles" in log

    def test_a_second_daemon_refuses_to_start_and_the_first_keeps_its_pidfile(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        first = keeper.start(spec, settings)

        second = subprocess.run(
            list(spec.command), env=process.child_env(settings), capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, check=False,
        )
        assert second.returncode == 1
        assert f"already running (PID {first.pid}" in second.stderr
        assert spec.pidfile.read_text().strip() == str(first.pid)
        assert psutil.Process(first.pid).is_running()
        with pytest.raises(ServiceAlreadyRunning):
            process.start(spec, settings)

    def test_a_stale_pidfile_is_taken_over_and_the_dead_instance_counted_as_a_crash(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        spec.pidfile.parent.mkdir(parents=True)
        gone = dead_pid()
        spec.pidfile.write_text(f"{gone}\n")
        spec.pid_record.write_text(json.dumps({
            "service": "backtest", "pid": gone, "create_time": 1000.0, "cmdline": ["python"], "started_at": 1000.0,
        }))
        # started directly, not through process control, so the daemon itself meets the stale file
        env = process.child_env(settings)
        child = keeper.popen(list(spec.command), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: spec.pidfile.read_text().strip() == str(child.pid), what="the takeover")
        wait_until(lambda: f"took over the stale pidfile of PID {gone}" in "\n".join(read_lines(spec.log)),
                   what="the takeover in the log")

        def crashes() -> list:
            with Store(settings.database_url) as store:
                return [e for e in health.events(store, "backtest") if e["kind"] == "crashed"]

        crashed = wait_until(crashes, what="the crash event")
        assert [(e["pid"], e["instance"], e["source"]) for e in crashed] == [(gone, f"{gone}@1000.00", "service")]


class TestSignals:
    def test_sigterm_ends_the_daemon_with_exit_0_and_removes_its_pidfile(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        child = keeper.popen(list(spec.command), env=process.child_env(settings),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: result_count(settings) > 0, what="a first backtest result")

        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 0
        assert not spec.pidfile.exists() and not spec.pid_record.exists()
        assert heartbeat_state(spec) == "stopped"
        assert any("stopped on SIGTERM" in line for line in read_lines(spec.log))
        with Store(settings.database_url) as store:
            kinds = [e["kind"] for e in health.events(store, "backtest") if e["pid"] == child.pid]
        assert kinds == ["started", "stopped"]

    def test_sigusr1_writes_every_threads_stack_under_logs(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings)
        path = process.dump_stacks(spec, timeout_s=30)
        assert path.parent == tmp_path / "logs" and path.name.startswith("backtest_stacks_")
        text = path.read_text()
        assert "Current thread" in text and "crypto_agent/daemon.py" in text

    def test_a_hung_main_loop_still_dumps_its_stacks_and_its_heartbeat_goes_stale(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings, env={FAULT_ENV: "hang-after:2"})
        wait_until(lambda: any("hanging now" in line for line in read_lines(spec.log)), what="the hang")
        text = process.dump_stacks(spec, timeout_s=30).read_text()
        assert "in step" in text  # the hung frame of the fault injector
        report = wait_until(
            lambda: (r := health.probe(spec, settings, cpu_sample_s=0.05)).heartbeat_age_s
            and r.heartbeat_age_s > settings.heartbeat_max_age_s and r,
            what="the heartbeat to go stale",
        )
        assert report.summary.startswith("DEGRADED: Heartbeat stale")


class TestLockedPause:
    def test_db_locked_pauses_writes_says_so_in_heartbeat_and_log_then_resumes(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings)
        wait_until(lambda: result_count(settings) > 0, what="a first backtest result")

        lock = settings.db_path.parent / "LOCKED"
        lock.touch()
        wait_until(lambda: heartbeat_state(spec) == STATE_PAUSED_LOCKED, what="the paused heartbeat")
        paused_at = result_count(settings)
        beat = read_heartbeat(spec.heartbeat)
        wait_until(lambda: read_heartbeat(spec.heartbeat).epoch >= beat.epoch + 2, what="two more heartbeats")
        assert result_count(settings) == paused_at
        assert heartbeat_state(spec) == STATE_PAUSED_LOCKED
        assert any("WARNING" in line and "writes paused" in line for line in read_lines(spec.log))

        lock.unlink()
        wait_until(lambda: result_count(settings) > paused_at, what="writes to resume")
        assert any("writes resumed" in line for line in read_lines(spec.log))


class TestLog:
    def test_every_line_of_a_record_carries_time_and_level_tracebacks_included(self) -> None:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            info = sys.exc_info()
            record = logging.LogRecord("crypto_agent.x", logging.ERROR, __file__, 1, "unit failed", None, info)
        lines = ServiceLogFormatter().format(record).splitlines()
        assert len(lines) > 3
        kinds = [LOG_LINE_RE.match(line.encode()) for line in lines]
        assert all(m is not None and m.group("level") == b"ERROR" for m in kinds)
        assert [m.group("kind") for m in kinds] == [b":"] + [b"|"] * (len(lines) - 1)

    def test_the_daemon_log_has_a_level_on_every_line(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings, env={FAULT_ENV: "log-errors:3"})
        wait_until(lambda: sum("synthetic error" in line for line in read_lines(spec.log)) >= 6, what="error lines")
        process.stop(spec)
        lines = read_lines(spec.log)
        assert lines and all(LOG_LINE_RE.match(line.encode()) for line in lines)

    def test_the_log_rotates_and_stray_output_follows_the_current_file(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path, log_max_bytes=20_000, log_backups=2)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings, env={FAULT_ENV: "log-errors:100"})
        rotated = spec.log.with_name(spec.log.name + ".2")
        wait_until(rotated.exists, what="two rotations")
        assert spec.log.stat().st_size <= 20_000 + 1_000
        # fds 1 and 2 (stray output, faulthandler) point at the current log, not a rotated one
        wait_until(lambda: all(os.readlink(f"/proc/{started.pid}/fd/{fd}") == str(spec.log) for fd in (1, 2)),
                   what="stdout and stderr on the current log")
        assert not spec.log.with_name(spec.log.name + ".3").exists()

    def test_a_malformed_fault_is_refused(self) -> None:
        for text in ("nonsense", "crash-after", "crash-after:x", "hang-after:1.5", "grow-memory:-3"):
            with pytest.raises(ConfigError):
                parse_fault(text)
        assert parse_fault("crash-after:3").after_steps == 3
        assert parse_fault("") is None


class TestTrader:
    def test_trader_records_one_signal_per_closed_candle_and_paper_positions(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)  # BTCUSDT rising: long; ETHUSDT falling: flat
        spec = process.service_spec("trader", settings)
        keeper.start(spec, settings)
        wait_until(lambda: (s := heartbeat_state(spec)).startswith("running: cycle") and
                   int(s.split("cycle ")[1].split()[0]) >= 4, what="four trader cycles")

        with Store(settings.database_url) as store, store.engine.connect() as conn:
            signals = {r.symbol: r for r in conn.execute(select(paper_signals))}
            positions = list(conn.execute(select(paper_positions)))
        assert set(signals) == {"BTCUSDT", "ETHUSDT"}  # four cycles, one row per candle
        assert (signals["BTCUSDT"].signal, signals["BTCUSDT"].action) == (1, "open")
        assert (signals["ETHUSDT"].signal, signals["ETHUSDT"].action) == (0, "flat")
        [pos] = positions
        assert (pos.symbol, pos.status) == ("BTCUSDT", "open")
        assert pos.entry_price == signals["BTCUSDT"].close
        assert pos.quantity == pytest.approx(settings.trader_notional_usdt / pos.entry_price)
        # paper only: the trader holds no network connection at all
        assert psutil.Process(int(spec.pidfile.read_text())).net_connections(kind="inet") == []

    def test_a_position_opens_holds_and_closes_with_its_pnl(self, tmp_path) -> None:
        settings = make_settings(tmp_path, symbols=["BTCUSDT"])
        now = int(time.time() * 1000)
        rising = synthetic_candles(120, 0.01, now_ms=now - 10 * 3_600_000)
        with Store(settings.database_url) as store:
            store.upsert_candles("BTCUSDT", "1h", rising)
            opened = run_cycle(store, settings, now_ms=now - 10 * 3_600_000 + 1)
            again = run_cycle(store, settings, now_ms=now - 10 * 3_600_000 + 1)
            # then ten falling candles: the fast average drops under the slow one
            last = rising[-1]
            falling = []
            price = last[4]
            for i in range(1, 40):
                t = last[0] + i * 3_600_000
                price *= 0.95
                falling.append((t, price, price, price, price, 1.0, t + 3_599_999, price, 1))
            store.upsert_candles("BTCUSDT", "1h", falling)
            closed = run_cycle(store, settings, now_ms=falling[-1][6] + 1)
            with store.engine.connect() as conn:
                [position] = [dict(r._mapping) for r in conn.execute(select(paper_positions))]
            assert open_positions(store) == []
        assert [e.action for e in opened.evaluations] == ["open"]
        assert [e.action for e in again.evaluations] == ["seen"]
        assert [e.action for e in closed.evaluations] == ["close"]
        assert position["status"] == "closed" and position["exit_price"] == pytest.approx(price)
        assert position["pnl_usdt"] == pytest.approx(position["quantity"] * (price - position["entry_price"]))
        assert position["pnl_usdt"] < 0

    def test_stale_candles_decide_nothing(self, tmp_path) -> None:
        settings = make_settings(tmp_path, symbols=["BTCUSDT"])
        now = int(time.time() * 1000)
        with Store(settings.database_url) as store:
            store.upsert_candles("BTCUSDT", "1h", synthetic_candles(120, 0.01, now_ms=now - 7 * 3_600_000))
            cycle = run_cycle(store, settings, now_ms=now)
            assert open_positions(store) == []
            with store.engine.connect() as conn:
                assert conn.execute(select(func.count()).select_from(paper_signals)).scalar() == 0
        assert cycle.stale == ["BTCUSDT"] and [e.signal for e in cycle.evaluations] == [1]


class TestCrash:
    def test_an_exception_in_the_main_loop_is_logged_critical_exits_70_and_keeps_the_pidfile(
        self, tmp_path, keeper
    ) -> None:
        settings = make_settings(tmp_path, create_store=False, db_path=tmp_path / "not-a-file")
        (tmp_path / "not-a-file").mkdir()  # the store cannot be opened: the daemon dies of it
        spec = process.service_spec("backtest", settings)
        child = keeper.popen(list(spec.command), env=process.child_env(settings),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert child.wait(60) == 70
        assert spec.pidfile.read_text().strip() == str(child.pid)  # evidence for the probe
        lines = read_lines(spec.log)
        assert any("CRITICAL" in line and "backtest service crashed" in line for line in lines)
        assert any("CRITICAL" in line and "| Traceback" in line for line in lines)
        assert health.probe(spec, settings, cpu_sample_s=0.05).summary == f"DEAD: Process {child.pid} not running"
        assert heartbeat_state(spec) == "crashed"


class TestTraderLocked:
    def test_the_trader_writes_nothing_while_db_locked_exists(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        (settings.db_path.parent / "LOCKED").touch()
        spec = process.service_spec("trader", settings)
        keeper.start(spec, settings)
        wait_until(lambda: heartbeat_state(spec) == STATE_PAUSED_LOCKED, what="the paused heartbeat")
        beat = read_heartbeat(spec.heartbeat)
        wait_until(lambda: read_heartbeat(spec.heartbeat).epoch >= beat.epoch + 1, what="another heartbeat")
        with Store(settings.database_url) as store, store.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(paper_signals)).scalar() == 0
        (settings.db_path.parent / "LOCKED").unlink()
        wait_until(lambda: heartbeat_state(spec).startswith("running: cycle"), what="the trader to resume")


class TestStoreCorruptState:
    """Issue 10: a service that meets a corrupt store says so in one heartbeat line, which the relay reads back."""

    def test_the_state_round_trips_on_one_line(self) -> None:
        from crypto_agent.service import store_corrupt_error, store_corrupt_state

        state = store_corrupt_state("database disk image\nis malformed")
        assert state == "store corrupt: database disk image is malformed"
        assert store_corrupt_error(state) == "database disk image is malformed"
        assert store_corrupt_error("running: cycle 3") is None

    def test_only_sqlite_corruption_is_a_store_fault(self, tmp_path) -> None:
        import sqlite3

        from crypto_agent.service import store_fault_of

        bad = tmp_path / "bad.db"
        bad.write_bytes(b"this is no database, just bytes" * 200)
        with pytest.raises(sqlite3.DatabaseError) as caught:
            sqlite3.connect(bad).execute("select * from sqlite_master").fetchall()
        assert store_fault_of(caught.value) == "file is not a database"
        assert store_fault_of(RuntimeError("database is locked")) is None
