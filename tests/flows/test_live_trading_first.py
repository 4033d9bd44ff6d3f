"""Live trading first: while the trader is recovered, the real backtest daemon yields (run/backtest.yield) and
resumes once the trader is HEALTHY; a failed recovery leaves the request, which the health monitor releases."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from flow_kit import wait_for_messages
from recovery_kit import (
    FAST_SERVICES,
    Keeper,
    Make,
    action,
    all_incidents,
    incident_of,
    kill_and_wait,
    settings_of,
    steps,
    stop_services,
    wait_until,
)
from service_kit import (
    keeper,  # noqa: F401 (the fixture, one for every test module)
    read_lines,
    seed_store,
)
from sqlalchemy import func, select

from crypto_agent import health, incidents, priority, process
from crypto_agent.receiver import Receiver
from crypto_agent.schema import backtest_results
from crypto_agent.service import STATE_PAUSED_LIVE_TRADING, Heartbeat, read_heartbeat
from crypto_agent.settings import Settings
from crypto_agent.store import Store
from flows.monitoring import health_monitor
from flows.recovery import recover_daemon_crash

TRADER = "crypto-agent.service.trader"


@pytest.fixture
def env(settings_for: Make) -> Iterator[dict[str, Any]]:
    """Fast service limits, two symbols of H1 candles; whatever ran is stopped after."""
    overrides = settings_for(**FAST_SERVICES, symbols=["BTCUSDT", "ETHUSDT"], timeframes=["1h"])
    seed_store(settings_of(overrides))
    yield overrides
    stop_services(settings_of(overrides))


def results(cfg: Settings) -> int:
    with Store(cfg.database_url) as store, store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(backtest_results)).scalar())


def daemon_state(cfg: Settings) -> str:
    beat = read_heartbeat(process.service_spec("backtest", cfg).heartbeat)
    return beat.state if beat else ""


def start_daemon(keeper: Keeper, cfg: Settings) -> int:
    pid = keeper.start(process.service_spec("backtest", cfg), cfg).pid
    wait_until(lambda: results(cfg) > 0, 60, "a first backtest result")
    return pid


def kill_trader(keeper: Keeper, cfg: Settings) -> None:
    kill_and_wait(keeper.start(process.service_spec("trader", cfg), cfg).pid)


class Watch:
    """The daemon's heartbeat states seen while something runs (polled in a thread)."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.states: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.wait(0.05):
            self.states.add(daemon_state(self.cfg))

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(5)


class TestLiveTradingFirst:
    def test_the_backtest_yields_while_the_trader_is_recovered_and_resumes_after(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        daemon = start_daemon(keeper, cfg)
        kill_trader(keeper, cfg)
        with Watch(cfg) as watch:
            result = recover_daemon_crash(service="trader", settings=env)

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert STATE_PAUSED_LIVE_TRADING in watch.states, watch.states
        assert steps(inc)[0] == "pause-backtest"
        assert f"until the trader is HEALTHY (incident #{inc.id})" in action(inc, "pause-backtest")["detail"]
        done = [s for s in steps(inc) if not s.startswith("notify-")]  # the close's pages come after
        assert done[-2:] == ["confirm-healthy", "resume-backtest"], steps(inc)
        assert priority.yield_request(cfg) is None and not priority.yield_marker(cfg).exists()
        log = read_lines(process.service_spec("backtest", cfg).log)
        assert any(" WARNING " in line and "live trading first" in line and f"#{inc.id}" in line for line in log)
        resumed = results(cfg)
        wait_until(lambda: results(cfg) > resumed, 60, "the backtest to resume")
        assert process.inspect(process.service_spec("backtest", cfg)).pid == daemon, "it yielded, never stopped"
        [l3] = wait_for_messages(inbox, "/l3", 1)
        assert "live trading was affected" in l3["body"]["body"]

    def test_a_failed_recovery_leaves_the_request_the_monitor_releases_it_once_healthy_and_closed(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        start_daemon(keeper, cfg)
        kill_trader(keeper, cfg)
        state = recover_daemon_crash(service="trader", settings={**env, "start_timeout_s": 0.05},
                                     return_state=True)

        assert state.is_failed()
        [inc] = all_incidents(cfg)
        assert inc.status == "failed" and "resume-backtest" not in steps(inc)
        request = priority.yield_request(cfg)
        assert request is not None and request.incident_id == inc.id
        wait_until(lambda: daemon_state(cfg) == STATE_PAUSED_LIVE_TRADING, 30, "the yielding daemon")
        paused_at = results(cfg)

        # the trader still down: the monitor keeps the request, and finds the yielding daemon healthy
        summary = health_monitor(services=["backtest", "trader"], store_checks=False, settings=env)
        assert summary["yield_released"] is None and priority.yield_request(cfg) is not None
        assert summary["services"]["backtest"]["conditions"] == ["healthy"], summary["services"]["backtest"]
        assert results(cfg) == paused_at

        # the trader HEALTHY again (a person started it), its incident closed: the monitor releases the request
        keeper.start(process.service_spec("trader", cfg), cfg)
        wait_until(lambda: health.probe("trader", cfg).healthy, 60, "a healthy trader")
        summary = health_monitor(services=["backtest", "trader"], store_checks=False, settings=env)
        assert summary["yield_released"] and f"incident #{inc.id}" in summary["yield_released"]
        assert priority.yield_request(cfg) is None
        wait_until(lambda: results(cfg) > paused_at, 60, "the backtest to resume")

    def test_the_monitor_keeps_a_request_whose_incident_is_still_open(
        self, env: dict[str, Any], keeper: Keeper
    ) -> None:
        cfg = settings_of(env)
        keeper.start(process.service_spec("trader", cfg), cfg)
        wait_until(lambda: health.probe("trader", cfg).healthy, 60, "a healthy trader")
        with incidents.open_incident_store(cfg) as log:
            inc, _ = incidents.open_or_join(log, "daemon-crash", TRADER, {}, time.time())
        priority.request_yield(cfg, "recover-daemon-crash", "the trader is being recovered", incident_id=inc.id)

        summary = health_monitor(services=["trader"], store_checks=False, settings=env)
        assert summary["yield_released"] is None and priority.yield_request(cfg) is not None
        with incidents.open_incident_store(cfg) as log:
            incidents.resolve(log, inc.id, summary="done elsewhere")
        summary = health_monitor(services=["trader"], store_checks=False, settings=env)
        assert summary["yield_released"] is not None and priority.yield_request(cfg) is None

    def test_a_hung_trader_handed_to_the_hang_recovery_is_asked_for_once_and_released_once(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        start_daemon(keeper, cfg)
        spec = process.service_spec("trader", cfg)
        trader = keeper.start(spec, cfg).pid
        os.kill(trader, signal.SIGSTOP)  # alive, its heartbeat going stale: hung
        wait_until(lambda: (read_heartbeat(spec.heartbeat) or Heartbeat(0, "", None)).age_s() > 3.5, 30,
                   "a stale trader heartbeat")
        result = recover_daemon_crash(service="trader", settings=env)

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert "handover" in steps(inc)
        assert steps(inc).count("pause-backtest") == 1 and steps(inc)[0] == "pause-backtest"
        assert steps(inc).count("resume-backtest") == 1
        assert steps(inc).index("resume-backtest") == steps(inc).index("confirm-healthy") + 1
        assert priority.yield_request(cfg) is None
        assert health.probe("trader", cfg).pid != trader
        resumed = results(cfg)
        wait_until(lambda: results(cfg) > resumed, 60, "the backtest to resume")
