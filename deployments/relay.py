"""The heartbeat relay: turns the services' heartbeat files into Prefect events, so a dead or hung daemon
is noticed within seconds (a proactive automation fires when the heartbeats stop).

crypto_agent stays free of Prefect: the services only write their heartbeat files; this small
long-running process, run by the stack next to the serving process, reads them every second
(`relay_poll_s`) and emits `crypto-agent.service.heartbeat` on the service's resource each time one
advances (payload: service, epoch, state, pid, vouched). Each poll also looks at the services' processes: an
instance it saw alive that is gone without a clean stop or a hold is `crypto-agent.service.dead` (once per
instance, payload shaped like the health monitor's), one alive but silent past `heartbeat_max_age_s` (the
runbook's heartbeat limit) is `crypto-agent.service.hung` at once (once per silence; the reactive automation
runs recover-process-hang, seconds sooner than the proactive heartbeat-stale one, which stays as the fallback),
and a heartbeat saying "store corrupt: <error>" is `crypto-agent.store.corrupt` on the store (once per
instance). A
service deliberately paused or stopped (a hold, crypto_agent.holds) is vouched for instead. Every
`relay_tick_s` it emits `crypto-agent.monitor.tick` on its own resource for its dead man's switch.

Run: `python -m deployments.relay [--services backtest,trader]` with PREFECT_API_URL set and the
services' settings (CRYPTO_AGENT_*) in the environment; SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

from prefect.events import emit_event

from crypto_agent import process
from crypto_agent.errors import ConfigError, CryptoAgentError
from crypto_agent.monitor import FINDING_DEAD, FINDING_HUNG, HeartbeatWatch, ServiceWatch
from crypto_agent.service import SERVICE_NAMES
from crypto_agent.settings import Settings, load_settings
from flows.events import (
    MONITOR_TICK,
    RELAY_RESOURCE,
    SERVICE_DEAD,
    SERVICE_HEARTBEAT,
    SERVICE_HUNG,
    STORE_CORRUPT,
    STORE_RESOURCE,
    emit,
    resource_of_service,
)

log = logging.getLogger("deployments.relay")

# A held service is vouched for this often; well inside the heartbeat-missing window.
MAX_VOUCH_EVERY_S = 5.0


@dataclass
class RelayCounts:
    """What a relay run emitted."""

    heartbeats: int = 0
    vouched: int = 0
    ticks: int = 0
    dead: int = 0
    hung: int = 0
    corrupt: int = 0


def run_relay(
    settings: Settings,
    *,
    services: tuple[str, ...] = SERVICE_NAMES,
    stop: threading.Event | None = None,
    max_seconds: float | None = None,
) -> RelayCounts:
    """Relay heartbeats and tick until `stop` is set (or `max_seconds` passed); what it emitted."""
    stop = stop or threading.Event()
    watch = HeartbeatWatch(
        settings, services, vouch_every_s=min(MAX_VOUCH_EVERY_S, settings.heartbeat_missing_s / 3)
    )
    deaths = ServiceWatch(settings, services)
    counts = RelayCounts()
    started = time.monotonic()
    next_tick = 0.0
    while not stop.is_set():
        now = time.time()
        for beat in watch.poll(now):
            # A heartbeat detects nothing: no `detected_at` (flows.events.emit would stamp one), so the
            # recovery a missing heartbeat starts takes the automation's firing time as its detection.
            resource = resource_of_service(beat.service)
            emit_event(event=SERVICE_HEARTBEAT, payload=beat.payload(),
                       resource={"prefect.resource.id": resource, "prefect.resource.name": resource.rsplit(".", 1)[-1]})
            counts.heartbeats += 1
            counts.vouched += beat.vouched
        for finding in deaths.look(now):
            # detected_at is stamped now: the service's exit seen within a poll (issue 10)
            if finding.kind == FINDING_DEAD:
                emit(SERVICE_DEAD, resource_of_service(finding.service), finding.payload())
                counts.dead += 1
            elif finding.kind == FINDING_HUNG:
                emit(SERVICE_HUNG, resource_of_service(finding.service), finding.payload())
                counts.hung += 1
            else:
                emit(STORE_CORRUPT, STORE_RESOURCE, finding.payload())
                counts.corrupt += 1
            log.warning("%s %s: %s", finding.service, finding.kind, finding.reason)
        if time.monotonic() >= next_tick:
            emit(MONITOR_TICK, RELAY_RESOURCE, {
                "monitor": "heartbeat-relay", "pid": os.getpid(), "interval_s": settings.relay_tick_s,
                "services": list(services),
            })
            counts.ticks += 1
            next_tick = time.monotonic() + settings.relay_tick_s
        if max_seconds is not None and time.monotonic() - started >= max_seconds:
            break
        stop.wait(min(settings.relay_poll_s, deaths.confirm_s) if deaths.pending else settings.relay_poll_s)
    return counts


def flush_events(timeout_s: float = 10.0) -> None:
    """Send what is still queued to the Prefect API before the process ends."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=timeout_s)


def parse_services(text: str) -> tuple[str, ...]:
    """'backtest,trader' -> ('backtest', 'trader'); ConfigError naming an unknown service."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SERVICE_NAMES]
    if unknown or not names:
        raise ConfigError(f"unknown service(s) {', '.join(unknown) or '(none given)'}",
                          hint=f"use a comma-separated list of: {', '.join(SERVICE_NAMES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.relay`: relay until SIGTERM or Ctrl-C; exit 2 on a bad setting or no Prefect API."""
    parser = argparse.ArgumentParser(prog="python -m deployments.relay", description=__doc__.splitlines()[0])
    parser.add_argument("--services", default=",".join(SERVICE_NAMES), help="comma-separated services to watch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from prefect.events.worker import should_emit_events_to_running_server

        services = parse_services(args.services)
        settings = load_settings()
        if not should_emit_events_to_running_server():
            raise ConfigError("no Prefect API to send heartbeats to",
                              hint="set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    except CryptoAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    stop = process.stop_event_on_signals()
    log.info("relaying the heartbeats of %s from %s every %g s; tick every %g s",
             ", ".join(services), settings.run_dir, settings.relay_poll_s, settings.relay_tick_s)
    counts = run_relay(settings, services=services, stop=stop)
    flush_events()
    log.info("stopped: %d heartbeat events (%d vouched), %d ticks, %d dead, %d hung, %d store-corrupt",
             counts.heartbeats, counts.vouched, counts.ticks, counts.dead, counts.hung, counts.corrupt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
