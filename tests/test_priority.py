"""Live trading first: the yield request (run/backtest.yield) and a real daemon honouring it."""

from __future__ import annotations

import json
import os
import signal
import time

from sqlalchemy import func, select

from crypto_agent import health, priority, process
from crypto_agent.holds import read_hold
from crypto_agent.schema import backtest_results
from crypto_agent.service import STATE_PAUSED_LIVE_TRADING, read_heartbeat
from crypto_agent.store import Store

try:
    from service_kit import keeper, make_settings, read_lines, seed_store, wait_until
except ImportError:  # tests/ became a package
    from tests.service_kit import (
        keeper,  # noqa: F401 (a fixture)
        make_settings,
        read_lines,
        seed_store,
        wait_until,
    )


def result_count(settings) -> int:
    with Store(settings.database_url) as store, store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(backtest_results)).scalar())


def heartbeat_state(spec) -> str:
    beat = read_heartbeat(spec.heartbeat)
    return beat.state if beat else ""


class TestRequest:
    def test_request_is_a_json_marker_in_run_with_who_why_since_and_the_incident(self, tmp_path) -> None:
        settings = make_settings(tmp_path, create_store=False)
        assert priority.yield_request(settings) is None
        made = priority.request_yield(settings, "recover-daemon-crash", "trader down", incident_id=7, now=1000.0)
        marker = priority.yield_marker(settings)
        assert marker == settings.run_dir / "backtest.yield"
        data = json.loads(marker.read_text())
        assert data["by"] == "recover-daemon-crash" and data["reason"] == "trader down"
        assert data["incident_id"] == 7 and data["since"] == 1000.0 and data["since_iso"] == "1970-01-01T00:16:40Z"
        assert priority.yield_request(settings) == made
        assert "incident #7" in made.description
        assert not list(marker.parent.glob(".*tmp")), "written through a temp file that is gone"

    def test_it_is_not_a_hold(self, tmp_path) -> None:
        settings = make_settings(tmp_path, create_store=False)
        priority.request_yield(settings, "x", "y")
        assert read_hold("backtest", settings) is None
        assert not process.service_spec("backtest", settings).hold_marker.exists()

    def test_release_by_someone_else_keeps_it_release_by_its_author_or_anyone_removes_it(self, tmp_path) -> None:
        settings = make_settings(tmp_path, create_store=False)
        priority.request_yield(settings, "recover-daemon-crash", "trader down", incident_id=3)
        assert priority.release_yield(settings, by="someone-else") is None
        assert priority.yield_request(settings) is not None
        released = priority.release_yield(settings, by="recover-daemon-crash")
        assert released is not None and released.incident_id == 3
        assert priority.yield_request(settings) is None
        priority.request_yield(settings, "a", "b")
        assert priority.release_yield(settings) is not None
        assert priority.release_yield(settings) is None  # nothing left: no error

    def test_a_damaged_marker_still_asks_to_yield(self, tmp_path) -> None:
        settings = make_settings(tmp_path, create_store=False)
        marker = priority.yield_marker(settings)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{not json")
        request = priority.yield_request(settings)
        assert request is not None and request.by == "unknown" and request.incident_id is None
        assert priority.release_yield(settings) is not None
        assert not marker.exists()

    def test_should_release_only_when_the_trader_is_healthy_and_the_incident_closed(self) -> None:
        request = priority.Request(by="r", reason="x", since=0.0, incident_id=1)
        assert priority.should_release(request, trader_healthy=True, incident_open=False)
        assert not priority.should_release(request, trader_healthy=True, incident_open=True)
        assert not priority.should_release(request, trader_healthy=False, incident_open=False)
        assert not priority.should_release(None, trader_healthy=True, incident_open=False)


class TestDaemonYields:
    def test_the_daemon_pauses_while_asked_to_yield_heart_beating_then_resumes(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        started = keeper.start(spec, settings)
        wait_until(lambda: result_count(settings) > 0, what="a first backtest result")

        priority.request_yield(settings, "test", "the trader is down", incident_id=5)
        wait_until(lambda: heartbeat_state(spec) == STATE_PAUSED_LIVE_TRADING, what="the yielding heartbeat")
        paused_at = result_count(settings)
        beat = read_heartbeat(spec.heartbeat)
        wait_until(lambda: read_heartbeat(spec.heartbeat).epoch >= beat.epoch + 2, what="two more heartbeats")
        assert result_count(settings) == paused_at, "no new backtest while yielding"
        assert heartbeat_state(spec) == STATE_PAUSED_LIVE_TRADING
        check = process.inspect(spec)
        assert check.alive and check.pid == started.pid, "still running"
        report = health.probe("backtest", settings)
        assert report.healthy, f"a yielding daemon is healthy to monitoring: {report.summary}"
        warnings = [line for line in read_lines(spec.log) if " WARNING " in line and "live trading first" in line]
        assert len(warnings) == 1 and "incident #5" in warnings[0]

        priority.release_yield(settings)
        wait_until(lambda: heartbeat_state(spec) != STATE_PAUSED_LIVE_TRADING, timeout=5.0, what="the resume")
        wait_until(lambda: result_count(settings) > paused_at, what="backtests to resume")
        assert any(" INFO " in line and "work resumed" in line for line in read_lines(spec.log))

    def test_a_daemon_between_two_cycles_yields_at_once_not_a_cycle_later(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path, daemon_cycle_pause_s=600.0)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings)
        wait_until(lambda: heartbeat_state(spec).endswith("done, next in 600 s"), what="the pause after a cycle")
        priority.request_yield(settings, "test", "the trader is down")
        wait_until(lambda: heartbeat_state(spec) == STATE_PAUSED_LIVE_TRADING, timeout=10.0,
                   what="the yielding heartbeat during the 10-minute pause")

    def test_a_daemon_started_while_a_request_is_in_force_yields_from_the_start(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        priority.request_yield(settings, "test", "the trader is down")
        spec = process.service_spec("backtest", settings)
        keeper.start(spec, settings)
        wait_until(lambda: heartbeat_state(spec) == STATE_PAUSED_LIVE_TRADING, what="the yielding heartbeat")
        assert result_count(settings) == 0
        priority.release_yield(settings)
        wait_until(lambda: result_count(settings) > 0, what="backtests to start")

    def test_the_window_guards_sigstop_and_sigcont_leave_a_yielding_daemon_yielding(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        seed_store(settings)
        spec = process.service_spec("backtest", settings)
        pid = keeper.start(spec, settings).pid
        priority.request_yield(settings, "test", "the trader is down")
        wait_until(lambda: heartbeat_state(spec) == STATE_PAUSED_LIVE_TRADING, what="the yielding heartbeat")
        paused_at = result_count(settings)
        os.kill(pid, signal.SIGSTOP)  # what guard.pause_backtest does (under its own hold)
        time.sleep(0.5)
        os.kill(pid, signal.SIGCONT)  # guard.resume_backtest
        beat = read_heartbeat(spec.heartbeat)
        wait_until(lambda: read_heartbeat(spec.heartbeat).epoch >= beat.epoch + 2, what="two more heartbeats")
        assert heartbeat_state(spec) == STATE_PAUSED_LIVE_TRADING and result_count(settings) == paused_at
        priority.release_yield(settings)
        wait_until(lambda: result_count(settings) > paused_at, what="backtests to resume")
