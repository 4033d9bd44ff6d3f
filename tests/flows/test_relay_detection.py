"""Issue 10: the heartbeat relay emits service.dead within a poll of a service's exit, service.hung within a poll of
a live service's heartbeat passing the limit, and store.corrupt when a service's heartbeat says so, to a real
Prefect server (the flows' session server)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.events.schemas.events import ReceivedEvent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for service_kit
from service_kit import keeper, make_settings, wait_until  # noqa: F401

from crypto_agent import process
from crypto_agent.service import store_corrupt_state, write_heartbeat
from deployments.relay import flush_events, run_relay
from flows.events import BACKTEST_DAEMON_RESOURCE, SERVICE_DEAD, SERVICE_HUNG, STORE_CORRUPT, STORE_RESOURCE


def events_on(resource_id: str, name: str, since: datetime, timeout_s: float = 30.0) -> list[ReceivedEvent]:
    """The events `name` on a resource since `since`, once there is one (or at the timeout)."""
    wanted = EventFilter(
        occurred=EventOccurredFilter(since=since, until=datetime.now(UTC) + timedelta(hours=1)),
        event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id]),
    )
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            found = list(client.read_events(filter=wanted, limit=50).events)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.25)


def test_the_relay_reports_a_killed_daemon_once_within_a_poll(tmp_path: Path, keeper: Any) -> None:
    settings = make_settings(tmp_path, relay_poll_s=0.2, relay_tick_s=30.0)
    spec = process.service_spec("backtest", settings)
    pid = keeper.start(spec, settings).pid
    since = datetime.now(UTC) - timedelta(seconds=1)
    stop = threading.Event()
    counts: list[Any] = []
    relay = threading.Thread(target=lambda: counts.append(run_relay(settings, services=("backtest",), stop=stop)))
    relay.start()
    try:
        time.sleep(1.0)  # the relay sees it alive (a condition below would not tell: it has no public state)
        killed_at = datetime.now(UTC)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not process.inspect(spec).alive, timeout=10, what="the daemon gone")
        time.sleep(2.0)  # further polls must not report the same instance again
    finally:
        stop.set()
        relay.join(30)
    flush_events()
    dead = events_on(BACKTEST_DAEMON_RESOURCE, SERVICE_DEAD, since)
    assert len(dead) == 1 and counts[0].dead == 1
    assert dead[0].payload["service"] == "backtest" and dead[0].payload["pid"] == pid
    latency = (dead[0].occurred - killed_at).total_seconds()
    print(f"kill -> service.dead occurred: {latency:.2f} s")
    assert latency < 5.0  # a bound on a measured figure, not a wait: the poll is 0.2 s


def test_the_relay_reports_a_store_corrupt_heartbeat_once(tmp_path: Path, keeper: Any) -> None:
    settings = make_settings(tmp_path, relay_poll_s=0.2, relay_tick_s=30.0)
    spec = process.service_spec("backtest", settings)
    pid = keeper.start(spec, settings).pid
    os.kill(pid, signal.SIGSTOP)  # so the heartbeat written below stays
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP")
    write_heartbeat(spec.heartbeat, store_corrupt_state("database disk image is malformed"), pid=pid)
    since = datetime.now(UTC) - timedelta(seconds=1)
    counts = run_relay(settings, services=("backtest",), max_seconds=2.0)
    os.kill(pid, signal.SIGCONT)
    flush_events()
    corrupt = events_on(STORE_RESOURCE, STORE_CORRUPT, since)
    assert counts.corrupt == 1 and len(corrupt) == 1
    assert corrupt[0].payload["check"] == "service" and corrupt[0].payload["service"] == "backtest"
    assert corrupt[0].payload["error"] == "database disk image is malformed" and corrupt[0].payload["detected_at"]


def test_the_relay_reports_a_silent_daemon_hung_once_at_the_heartbeat_limit(tmp_path: Path, keeper: Any) -> None:
    settings = make_settings(tmp_path, relay_poll_s=0.2, relay_tick_s=30.0, heartbeat_max_age_s=2.0)
    spec = process.service_spec("backtest", settings)
    pid = keeper.start(spec, settings).pid
    os.kill(pid, signal.SIGSTOP)  # its heartbeats stop; the process lives
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, timeout=10, what="SIGSTOP")
    epoch = write_heartbeat(spec.heartbeat, "running", pid=pid)
    since = datetime.now(UTC) - timedelta(seconds=1)
    try:
        counts = run_relay(settings, services=("backtest",), max_seconds=5.0)  # the limit passes 3 s before the end
    finally:
        os.kill(pid, signal.SIGCONT)
    flush_events()
    hung = events_on(BACKTEST_DAEMON_RESOURCE, SERVICE_HUNG, since)
    assert counts.hung == 1 and len(hung) == 1 and counts.dead == 0
    assert hung[0].payload["service"] == "backtest" and hung[0].payload["pid"] == pid
    assert hung[0].payload["conditions"] == ["hung"] and hung[0].payload["detected_by"] == "heartbeat-relay"
    late = hung[0].occurred.timestamp() - (epoch + settings.heartbeat_max_age_s)
    print(f"heartbeat limit -> service.hung occurred: {late:.2f} s")
    assert 0 <= late < 3.0  # a bound on a measured figure: the poll is 0.2 s
