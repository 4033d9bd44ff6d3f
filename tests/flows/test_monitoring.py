"""Monitoring under the session's Prefect test server: health-monitor against real, really signalled
services and a real store; the backtest-window guard throttling a real CPU-burning daemon and never the
trader; the heartbeat relay turning real heartbeat files into events."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from flow_kit import flow_run_events, wait_for_messages
from prefect.client.orchestration import get_client
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.events.schemas.events import ReceivedEvent
from prefect.settings import PREFECT_API_URL
from prefect.states import State

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for service_kit
from service_kit import FAST, keeper, make_settings, seed_store, wait_until  # noqa: F401

import flows.daily as daily
from crypto_agent import holds, priority, process
from crypto_agent.daemon import FAULT_ENV
from crypto_agent.guard import GUARD_NAME
from crypto_agent.holds import HOLD_PAUSED, HOLD_STOPPED, place_hold, read_hold
from crypto_agent.receiver import Receiver
from crypto_agent.service import STATE_PAUSED_LIVE_TRADING, read_heartbeat
from crypto_agent.settings import Settings, load_settings
from crypto_agent.simulator import Simulator
from deployments.relay import run_relay
from flows.events import (
    BACKTEST_DAEMON_RESOURCE,
    MONITOR_RESOURCE,
    MONITOR_TICK,
    RELAY_RESOURCE,
    SERVICE_CPU_HIGH,
    SERVICE_CRASHED,
    SERVICE_DEAD,
    SERVICE_HEALTHY,
    SERVICE_HEARTBEAT,
    SERVICE_HUNG,
    SERVICE_LOG_ERRORS,
    SERVICE_MEMORY_HIGH,
    SERVICE_RESULTS_STALE,
    STORE_CORRUPT,
    STORE_OK,
    STORE_RESOURCE,
    STORE_STALE,
    TRADER_RESOURCE,
)
from flows.monitoring import backtest_window_guard, health_monitor

PROJECT_DIR = Path(__file__).resolve().parents[2]


def overrides(home: Path, **extra: Any) -> dict[str, Any]:
    """The flows' `settings` parameter: a tmp home with the service tests' short limits."""
    return {"home": str(home), **FAST, **extra}


def run(flow: Any, **params: Any) -> tuple[dict[str, Any], Any]:
    """Run a flow; its result and flow run id."""
    state: State = flow(**params, return_state=True)
    return state.result(), state.state_details.flow_run_id


def events_on(
    resource_id: str, name: str, since: datetime, count: int = 1, timeout_s: float = 30.0,
    where: Any = lambda e: True,
) -> list[ReceivedEvent]:
    """Events `name` on a resource since `since` (those `where` accepts), read back from the API once there are
    `count` (or at the timeout): the events worker delivers them in the background."""
    wanted = EventFilter(
        occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(hours=1)),
        event=EventNameFilter(name=[name]),
        resource=EventResourceFilter(id=[resource_id]),
    )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            found = [e for e in client.read_events(filter=wanted, limit=50).events if where(e)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.25)


def payloads(flow_run_id: Any, name: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    return [e.payload for e in flow_run_events(flow_run_id, name, timeout_s=timeout_s)]


def next_window_time(hour: int, minute: int) -> datetime:
    """The next time of day hour:minute UTC (so holds placed "until the window's end" lie in the future)."""
    now = datetime.now(UTC)
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    return at if at > now else at + timedelta(days=1)


def start(keeper: Any, name: str, settings: Settings, **env: str) -> int:
    return keeper.start(process.service_spec(name, settings), settings, env=env or None).pid


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- health-monitor ---


class TestHealthMonitor:
    def test_a_running_daemon_is_healthy_and_the_monitor_ticks(self, tmp_path: Path, keeper: Any) -> None:
        settings = make_settings(tmp_path)
        pid = start(keeper, "backtest", settings)
        result, run_id = run(health_monitor, services=["backtest"], store_checks=False,
                             settings=overrides(tmp_path))
        assert result["services"]["backtest"]["conditions"] == ["healthy"]
        [healthy] = payloads(run_id, SERVICE_HEALTHY)
        assert healthy["service"] == "backtest" and healthy["pid"] == pid and healthy["status"] == "HEALTHY"
        [tick] = flow_run_events(run_id, MONITOR_TICK)
        assert tick.resource.id == MONITOR_RESOURCE and tick.payload["monitor"] == "health-monitor"
        assert not flow_run_events(run_id, SERVICE_DEAD, timeout_s=1)

    def test_a_sigkilled_daemon_is_dead_and_its_crash_is_reported_once(self, tmp_path: Path, keeper: Any) -> None:
        settings = make_settings(tmp_path)
        pid = start(keeper, "backtest", settings)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), what="the SIGKILLed daemon to be gone")
        first, first_id = run(health_monitor, services=["backtest"], store_checks=False, settings=overrides(tmp_path))
        assert first["services"]["backtest"]["conditions"] == ["dead"]
        [dead] = payloads(first_id, SERVICE_DEAD)
        assert dead["service"] == "backtest" and dead["pid"] == pid and dead["status"] == "DEAD"
        [crash] = flow_run_events(first_id, SERVICE_CRASHED)
        assert crash.resource.id == BACKTEST_DAEMON_RESOURCE
        assert crash.payload["pid"] == pid and crash.payload["instance"].startswith(f"{pid}@")
        # the next round says dead again, but the same crash is not counted twice
        second, second_id = run(health_monitor, services=["backtest"], store_checks=False,
                                settings=overrides(tmp_path))
        assert second["services"]["backtest"]["conditions"] == ["dead"] and second["crashes"] == []
        assert payloads(second_id, SERVICE_DEAD)
        assert not flow_run_events(second_id, SERVICE_CRASHED, timeout_s=2)

    def test_a_sigstopped_daemon_is_hung(self, tmp_path: Path, keeper: Any) -> None:
        settings = make_settings(tmp_path)
        pid = start(keeper, "backtest", settings)
        os.kill(pid, signal.SIGSTOP)
        try:
            result, run_id = run(health_monitor, services=["backtest"], store_checks=False,
                                 settings=overrides(tmp_path))
        finally:
            os.kill(pid, signal.SIGCONT)
        assert result["services"]["backtest"]["conditions"] == ["hung"]
        [hung] = payloads(run_id, SERVICE_HUNG)
        assert hung["pid"] == pid and hung["alive"] is True and hung["process_status"] == "stopped"
        assert not flow_run_events(run_id, SERVICE_DEAD, timeout_s=1)

    def test_a_daemon_whose_heartbeat_went_stale_while_it_lives_is_hung(self, tmp_path: Path, keeper: Any) -> None:
        settings = make_settings(tmp_path)
        pid = start(keeper, "backtest", settings, **{FAULT_ENV: "hang-after:2"})
        spec = process.service_spec("backtest", settings)
        from crypto_agent.service import read_heartbeat

        wait_until(lambda: (b := read_heartbeat(spec.heartbeat)) is not None
                   and b.age_s() > settings.heartbeat_max_age_s + 1, timeout=30, what="a stale heartbeat")
        result, run_id = run(health_monitor, services=["backtest"], store_checks=False, settings=overrides(tmp_path))
        assert result["services"]["backtest"]["conditions"] == ["hung"]
        [hung] = payloads(run_id, SERVICE_HUNG)
        assert hung["pid"] == pid and hung["heartbeat_age_s"] > settings.heartbeat_max_age_s

    def test_a_cpu_burning_daemon_is_cpu_high_once_its_history_spans_the_spike_window(
        self, tmp_path: Path, keeper: Any
    ) -> None:
        # a spike window of 1.2 s instead of 10 min, and a limit a burning process clears on a busy machine
        params = overrides(tmp_path, cpu_spike_minutes=0.02, cpu_max_pct=40.0)
        settings = make_settings(tmp_path, cpu_spike_minutes=0.02, cpu_max_pct=40.0)
        pid = start(keeper, "backtest", settings, **{FAULT_ENV: "burn-cpu"})
        first, first_id = run(health_monitor, services=["backtest"], store_checks=False, settings=params)
        assert "cpu-high" not in first["services"]["backtest"]["conditions"]  # one sample is no history
        time.sleep(1.5)
        second, second_id = run(health_monitor, services=["backtest"], store_checks=False, settings=params)
        assert "cpu-high" in second["services"]["backtest"]["conditions"], second
        [high] = payloads(second_id, SERVICE_CPU_HIGH)
        assert high["pid"] == pid and high["cpu_pct"] > 40.0
        assert not flow_run_events(first_id, SERVICE_CPU_HIGH, timeout_s=1)

    def test_a_daemon_over_its_memory_limit_is_memory_high(self, tmp_path: Path, keeper: Any) -> None:
        settings = make_settings(tmp_path, rss_max_mb=20.0)  # a Python process uses more than this at rest
        pid = start(keeper, "backtest", settings)
        result, run_id = run(health_monitor, services=["backtest"], store_checks=False,
                             settings=overrides(tmp_path, rss_max_mb=20.0))
        assert result["services"]["backtest"]["conditions"] == ["memory-high"]
        [high] = payloads(run_id, SERVICE_MEMORY_HIGH)
        assert high["pid"] == pid and high["rss_mb"] > 20.0

    def test_a_held_service_raises_no_alarm(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path)
        # what a rollback leaves behind: the pause marker process control and the recoveries honour
        holds.keep_stopped("backtest", settings, reason="paused for investigation", by="rollback-persistent-failures")
        result, run_id = run(health_monitor, services=["backtest"], store_checks=False, settings=overrides(tmp_path))
        assert result["services"]["backtest"]["conditions"] == ["held"]
        assert "stopped by rollback-persistent-failures" in result["services"]["backtest"]["reasons"][0]
        assert flow_run_events(run_id, MONITOR_TICK)
        assert not flow_run_events(run_id, SERVICE_DEAD, timeout_s=1)

    def test_an_unknown_service_is_a_clear_error(self, tmp_path: Path) -> None:
        state = health_monitor(services=["nope"], settings=overrides(tmp_path), return_state=True)
        assert state.is_failed()
        assert "unknown service(s) nope" in str(state.result(raise_on_failure=False))


@pytest.fixture
def filled(simulator: Simulator, settings_for: Any) -> dict[str, Any]:
    """A store in tmp_path filled by the data-update flow from the simulator (3 symbols, 60 days)."""
    params = settings_for(simulator)
    daily.data_update(settings=params)
    return params


class TestStoreChecks:
    def test_a_fresh_store_is_ok(self, filled: dict[str, Any]) -> None:
        result, run_id = run(health_monitor, services=["backtest"], settings=filled)
        assert result["store"]["ok"] is True
        assert payloads(run_id, STORE_OK)[0]["check"] == "health-monitor"

    def test_a_stale_symbol_emits_store_stale_with_its_windows(self, filled: dict[str, Any]) -> None:
        db = load_settings(**filled).db_path
        cutoff = int((time.time() - 10 * 3600) * 1000)
        with sqlite3.connect(db) as conn:
            conn.execute("DELETE FROM ohlcv_h1 WHERE symbol = 'ETHUSDT' AND timestamp >= ?", (cutoff,))
        result, run_id = run(health_monitor, services=["backtest"], settings=filled)
        assert result["store"]["ok"] is False
        [stale] = payloads(run_id, STORE_STALE)
        assert stale["failing_symbols"] == ["ETHUSDT"]
        assert {w["symbol"] for w in stale["failing_windows"]} == {"ETHUSDT"}
        assert not flow_run_events(run_id, STORE_CORRUPT, timeout_s=1)

    def test_a_corrupted_page_emits_store_corrupt(self, filled: dict[str, Any]) -> None:
        db = load_settings(**filled).db_path
        corrupt_middle_page(db)
        result, run_id = run(health_monitor, services=["backtest"], settings=filled)
        assert result["store"]["ok"] is False
        [corrupt] = payloads(run_id, STORE_CORRUPT)
        assert corrupt["mode"] == "quick_check" and corrupt["problems"] and corrupt["db_path"] == str(db)

    def test_a_store_held_by_a_recovery_is_not_checked(self, filled: dict[str, Any]) -> None:
        db = load_settings(**filled).db_path
        (db.parent / "LOCKED").write_text("recover-db-corruption")
        result, run_id = run(health_monitor, services=["backtest"], settings=filled)
        assert "a recovery holds the store" in result["store"]["skipped"]
        assert not flow_run_events(run_id, STORE_OK, timeout_s=1)


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


# --- what no recovery acts on still reaches someone (issue 10) ---


def error_line(message: str) -> str:
    """A line as the services' log formatter writes an ERROR record, stamped now."""
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime())}.000Z ERROR crypto_agent.backtest[42]: {message}\n"


class TestAlerts:
    def test_log_errors_over_the_limit_page_l1_once_with_the_lines_and_no_secret(
        self, tmp_path: Path, keeper: Any, inbox: Receiver
    ) -> None:
        settings = make_settings(tmp_path)
        start(keeper, "backtest", settings)
        log = process.service_spec("backtest", settings).log
        wait_until(log.exists, timeout=10, what="the daemon's log")
        with log.open("a", encoding="utf-8") as f:
            f.writelines(error_line(f"unit BTCUSDT 1h failed #{i} api_key=SEKRET{i}") for i in range(8))
        params = overrides(tmp_path)
        first, run_id = run(health_monitor, services=["backtest"], store_checks=False, settings=params)
        assert SERVICE_LOG_ERRORS in first["events"]
        [event] = payloads(run_id, SERVICE_LOG_ERRORS)
        assert event["service"] == "backtest" and event["log_errors_per_min"] > 5
        [page] = wait_for_messages(inbox, "/l1")
        body = page["body"]["body"]
        assert "log errors/min" in page["body"]["subject"]
        assert "unit BTCUSDT 1h failed #7" in body and "SEKRET" not in body
        # the same episode on the next round: no second page, no second event
        second, _ = run(health_monitor, services=["backtest"], store_checks=False, settings=params)
        assert SERVICE_LOG_ERRORS not in second["events"]
        assert len(inbox.messages("/l1")) == 1

    def test_a_live_daemon_with_no_result_for_too_long_is_triaged_once_and_not_while_it_yields(
        self, tmp_path: Path, keeper: Any
    ) -> None:
        settings = make_settings(tmp_path, backtest_results_max_age_s=2.0)
        start(keeper, "backtest", settings)
        params = overrides(tmp_path, backtest_results_max_age_s=2.0)
        time.sleep(2.5)  # the daemon has now run longer than the limit, with an empty store: no result at all
        first, run_id = run(health_monitor, services=["backtest"], store_checks=False, settings=params)
        assert SERVICE_RESULTS_STALE in first["events"]
        [event] = payloads(run_id, SERVICE_RESULTS_STALE)
        assert event["service"] == "backtest" and "no backtest result" in event["reason"]
        second, _ = run(health_monitor, services=["backtest"], store_checks=False, settings=params)
        assert SERVICE_RESULTS_STALE not in second["events"]

    def test_a_daemon_yielding_to_live_trading_is_not_stale(self, tmp_path: Path, keeper: Any) -> None:
        settings = make_settings(tmp_path, backtest_results_max_age_s=1.0)
        start(keeper, "backtest", settings)
        priority.request_yield(settings, by="test", reason="the trader is down")
        heartbeat = process.service_spec("backtest", settings).heartbeat
        wait_until(lambda: (hb := read_heartbeat(heartbeat)) is not None and hb.state == STATE_PAUSED_LIVE_TRADING,
                   timeout=20, what="the daemon to pause itself for live trading")
        time.sleep(1.5)
        result, _ = run(health_monitor, services=["backtest"], store_checks=False,
                        settings=overrides(tmp_path, backtest_results_max_age_s=1.0))
        assert SERVICE_RESULTS_STALE not in result["events"]


# --- backtest-window-guard ---


class TestWindowGuard:
    def test_a_backtest_over_budget_is_reniced_then_paused_then_resumed_and_the_trader_is_never_touched(
        self, tmp_path: Path, keeper: Any, inbox: Receiver
    ) -> None:
        params = overrides(tmp_path)
        settings = make_settings(tmp_path)
        seed_store(settings)
        trader = psutil.Process(start(keeper, "trader", settings))
        daemon_pid = start(keeper, "backtest", settings, **{FAULT_ENV: "burn-cpu"})
        daemon = psutil.Process(daemon_pid)
        trader_before = (trader.pid, trader.create_time(), trader.nice())
        in_window = next_window_time(23, 45)

        first, _ = run(backtest_window_guard, now=in_window, settings=params)
        assert first["action"] == "renice" and first["in_window"] is True
        assert any("backtest CPU" in b for b in first["breaches"])
        assert daemon.nice() == 19

        second, _ = run(backtest_window_guard, now=in_window + timedelta(minutes=1), settings=params)
        assert second["action"] == "pause" and second["stage"] == "reniced"
        wait_until(lambda: daemon.status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP to land")
        hold = read_hold("backtest", settings)
        assert hold is not None and hold.kind == HOLD_PAUSED and hold.by == GUARD_NAME
        [told] = wait_for_messages(inbox, "/l1")
        assert "backtest window over budget: pause" in told["body"]["subject"]

        # paused, the backtest uses no CPU: no flapping back and forth inside the window
        third, _ = run(backtest_window_guard, now=in_window + timedelta(minutes=2), settings=params)
        assert third["action"] == "none" and daemon.status() == psutil.STATUS_STOPPED

        after = run(backtest_window_guard, now=next_window_time(1, 31), settings=params)[0]
        assert after["action"] == "resume" and after["in_window"] is False
        wait_until(lambda: daemon.status() != psutil.STATUS_STOPPED, timeout=10, what="SIGCONT to land")
        assert read_hold("backtest", settings) is None
        # live trading: same process, same priority, never stopped
        assert (trader.pid, trader.create_time(), trader.nice()) == trader_before
        assert trader.status() != psutil.STATUS_STOPPED
        assert not inbox.messages("/l3")

    def test_live_trading_affected_stops_the_backtest_and_pages_l3(
        self, tmp_path: Path, keeper: Any, inbox: Receiver
    ) -> None:
        params = overrides(tmp_path)
        settings = make_settings(tmp_path)
        seed_store(settings)
        trader = psutil.Process(start(keeper, "trader", settings))
        daemon_pid = start(keeper, "backtest", settings)
        trader.send_signal(signal.SIGSTOP)  # live trading starved: its probe is no longer HEALTHY
        try:
            result, _ = run(backtest_window_guard, now=next_window_time(0, 10), settings=params)
        finally:
            trader.send_signal(signal.SIGCONT)
        assert result["action"] == "stop" and result["live_affected"] is True and result["paged"] == "l3"
        assert gone(daemon_pid)
        hold = read_hold("backtest", settings)
        assert hold is not None and hold.kind == HOLD_STOPPED and hold.by == GUARD_NAME
        [page] = wait_for_messages(inbox, "/l3")
        assert "live trading affected" in page["body"]["subject"]
        assert "live trading was not touched" in page["body"]["body"]
        assert trader.is_running() and trader.pid == process.inspect(process.service_spec("trader", settings)).pid

    def test_outside_the_window_nothing_is_done(self, tmp_path: Path, keeper: Any) -> None:
        settings = make_settings(tmp_path)
        pid = start(keeper, "backtest", settings, **{FAULT_ENV: "burn-cpu"})
        result, _ = run(backtest_window_guard, now=next_window_time(12, 0), settings=overrides(tmp_path))
        assert result["action"] == "none" and result["in_window"] is False
        assert psutil.Process(pid).nice() == settings.daemon_niceness


# --- the heartbeat relay ---


def test_the_relay_turns_heartbeats_into_events_and_ticks(tmp_path: Path, keeper: Any) -> None:
    settings = make_settings(tmp_path, relay_poll_s=0.2, relay_tick_s=1.0)
    since = datetime.now(UTC) - timedelta(seconds=1)
    pid = start(keeper, "backtest", settings)
    counts = run_relay(settings, services=("backtest",), max_seconds=3.5)
    assert counts.heartbeats >= 3 and counts.ticks >= 3
    beats = events_on(BACKTEST_DAEMON_RESOURCE, SERVICE_HEARTBEAT, since, count=3)
    assert len(beats) >= 3
    epochs = sorted(b.payload["epoch"] for b in beats)
    assert len(set(epochs)) == len(epochs)  # one event per advance, not per read
    assert all(b.payload["pid"] == pid and b.payload["service"] == "backtest" for b in beats)
    assert all(b.payload["state"] and b.payload["vouched"] is False for b in beats)
    ticks = events_on(RELAY_RESOURCE, MONITOR_TICK, since, count=3)
    assert len(ticks) >= 3 and ticks[0].payload["monitor"] == "heartbeat-relay"


def test_the_relay_vouches_for_a_paused_service_and_not_for_a_stopped_one(tmp_path: Path, keeper: Any) -> None:
    settings = make_settings(tmp_path, relay_poll_s=0.2, heartbeat_missing_s=10.0)
    since = datetime.now(UTC) - timedelta(seconds=1)
    daemon = psutil.Process(start(keeper, "backtest", settings))
    from crypto_agent.service import instance_id

    place_hold("backtest", settings, kind=HOLD_PAUSED, by=GUARD_NAME, reason="test",
               instance=instance_id(daemon.pid, daemon.create_time()))
    daemon.send_signal(signal.SIGSTOP)
    trader_pid = start(keeper, "trader", settings)
    os.kill(trader_pid, signal.SIGSTOP)  # hung, with no hold: must fall silent
    try:
        run_relay(settings, max_seconds=8.0)
    finally:
        daemon.send_signal(signal.SIGCONT)
        os.kill(trader_pid, signal.SIGCONT)
    vouched = events_on(BACKTEST_DAEMON_RESOURCE, SERVICE_HEARTBEAT, since, where=lambda e: e.payload["vouched"])
    assert vouched and vouched[0].payload["state"].startswith("held: paused by backtest-window-guard")
    trader_beats = events_on(TRADER_RESOURCE, SERVICE_HEARTBEAT, since, timeout_s=3)
    assert trader_beats and not any(e.payload["vouched"] for e in trader_beats)
    assert len(trader_beats) <= 2  # the one it found, maybe one more written just before SIGSTOP


def test_the_relay_process_runs_until_sigterm(tmp_path: Path, keeper: Any) -> None:
    settings = make_settings(tmp_path)
    since = datetime.now(UTC) - timedelta(seconds=1)
    start(keeper, "backtest", settings)
    env = process.child_env(settings, {"PREFECT_API_URL": str(PREFECT_API_URL.value())})
    env["PYTHONPATH"] = str(PROJECT_DIR)
    relay = keeper.popen([sys.executable, "-m", "deployments.relay", "--services", "backtest"],
                         env=env, cwd=PROJECT_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert events_on(BACKTEST_DAEMON_RESOURCE, SERVICE_HEARTBEAT, since, timeout_s=60)
    relay.send_signal(signal.SIGTERM)
    out, _ = relay.communicate(timeout=30)
    assert relay.returncode == 0, out.decode()
    assert b"stopped:" in out


def test_the_relay_refuses_an_unknown_service(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR), "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    done = subprocess.run([sys.executable, "-m", "deployments.relay", "--services", "backtest,nope"],
                          env=env, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "unknown service(s) nope" in done.stderr


class TestNeedsPersonCleared:
    def _waiting(self, settings: dict[str, Any], scenario: str, resource: str, level: str = "l2") -> int:
        """An incident the recoveries could not fix, waiting for a person, paged at `level`."""
        from crypto_agent import incidents

        with incidents.open_incident_store(load_settings(**settings)) as log:
            inc, _ = incidents.open_or_join(log, scenario, resource, {"event": "test"}, time.time() - 60)
            incidents.told(log, inc.id, level)
            done = incidents.escalate(log, inc.id, level, "the recovery did not succeed")
            assert done.needs_person
            return done.id

    def test_a_sound_store_and_a_healthy_daemon_clear_what_waited_for_a_person_and_say_so_once(
        self, filled: dict[str, Any], keeper: Any, inbox: Receiver
    ) -> None:
        from crypto_agent import incidents

        cfg = load_settings(**filled)
        start(keeper, "backtest", cfg)
        store_id = self._waiting(filled, "db-corruption", STORE_RESOURCE)
        daemon_id = self._waiting(filled, "daemon-crash", BACKTEST_DAEMON_RESOURCE)
        rollback_id = self._waiting(filled, "persistent-failures", BACKTEST_DAEMON_RESOURCE, "l3")
        result, _ = run(health_monitor, services=["backtest"], settings={**filled, **FAST})
        assert sorted(result["cleared"]) == sorted([store_id, daemon_id])
        with incidents.open_incident_store(cfg) as log:
            assert [i.id for i in incidents.needing_person(log)] == [rollback_id]  # a rollback waits for a person
            store_inc = incidents.get(log, store_id)
        assert store_inc.actions[-1]["detail"] == ("resolved by the health monitor: the store is sound again "
                                                   "(quick_check ok, no recovery lock)")
        pages = wait_for_messages(inbox, "/l2", count=2)
        assert sorted(m["body"]["subject"].split(":")[0] for m in pages) == [
            f"[crypto-agent] incident #{store_id} cleared", f"[crypto-agent] incident #{daemon_id} cleared"]
        again, _ = run(health_monitor, services=["backtest"], settings={**filled, **FAST})
        assert again["cleared"] == []
        assert len(wait_for_messages(inbox, "/l2", count=3, timeout_s=3)) == 2

    def test_a_store_still_locked_stays_waiting(self, filled: dict[str, Any]) -> None:
        store_id = self._waiting(filled, "db-corruption", STORE_RESOURCE)
        lock = load_settings(**filled).db_path.parent / "LOCKED"
        lock.write_text('{"owner": "a person investigating"}')
        result, _ = run(health_monitor, services=["backtest"], settings=filled)
        assert result["cleared"] == [] and store_id
