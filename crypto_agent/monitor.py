"""What the monitoring side concludes about a service, without Prefect: the flows and the relay act on it.

- `assess(report, ...)`: from one health probe, its history and the service's hold, the conditions
  worth an event: dead, hung (alive but its heartbeat stale, missing, or the process stopped),
  cpu-high (over the limit for the whole spike window), memory-high, healthy; or held (deliberately
  paused or stopped: no event).
- `claim_crashes(store, ...)`: the crashes recorded in service_events that nobody has reported yet,
  claimed atomically, so each crash becomes exactly one event whoever reports it.
- `HeartbeatWatch`: which heartbeats are new since the last look (and which held services to vouch
  for), for the heartbeat relay.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
from sqlalchemy import select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from crypto_agent.health import HealthStatus, ProbeReport
from crypto_agent.holds import Hold, covering_hold, read_hold
from crypto_agent.process import ProcessCheck, inspect, service_spec
from crypto_agent.schema import reported_service_events, service_events
from crypto_agent.service import SERVICE_NAMES, Heartbeat, read_heartbeat, store_corrupt_error
from crypto_agent.settings import Settings
from crypto_agent.store import Store, store_locked


class Condition(str, enum.Enum):
    """A finding of the monitor about one service; each but HELD and DEGRADED has its own event."""

    HEALTHY = "healthy"
    DEAD = "dead"
    HUNG = "hung"
    CPU_HIGH = "cpu-high"
    MEMORY_HIGH = "memory-high"
    DEGRADED = "degraded"  # a limit broken that no recovery handles (log errors): told, not acted on
    HELD = "held"


@dataclass(frozen=True)
class Assessment:
    """The monitor's conclusions about one service, with the probe they come from."""

    service: str
    conditions: tuple[Condition, ...]
    report: ProbeReport
    hold: Hold | None = None
    reasons: tuple[str, ...] = ()

    def payload(self) -> dict[str, Any]:
        """What an event about this service carries: service, PID, status, heartbeat age, CPU, memory, reasons."""
        r = self.report
        return {
            "service": self.service,
            "pid": r.pid,
            "status": r.status.value,
            "summary": r.summary,
            "conditions": [c.value for c in self.conditions],
            "reasons": list(self.reasons),
            "alive": r.alive,
            "process_status": r.process_status,
            "heartbeat_age_s": r.heartbeat_age_s,
            "heartbeat_state": r.heartbeat_state,
            "cpu_pct": r.cpu_pct,
            "rss_mb": r.rss_mb,
            "log_errors_per_min": r.log_errors_per_min,
            "hold": None if self.hold is None else self.hold.to_dict(),
        }


def assess(
    report: ProbeReport,
    settings: Settings,
    *,
    cpu_high: bool = False,
    hold: Hold | None = None,
) -> Assessment:
    """The conditions one probe (plus its CPU history and the service's hold) shows.

    A hold that covers the service wins: HELD and nothing else. Otherwise DEAD when no live process
    of ours runs; else HUNG (heartbeat stale, missing or unreadable, or the process stopped),
    CPU_HIGH (`cpu_high`: over the limit for the spike window, from history), MEMORY_HIGH (RSS over
    the limit), and HEALTHY only when the probe says so.
    """
    check = inspect(service_spec(report.service, settings))
    if hold is not None and hold.covers(check):
        return Assessment(report.service, (Condition.HELD,), report, hold, (hold.description,))
    if not report.alive:
        return Assessment(report.service, (Condition.DEAD,), report, None, tuple(report.reasons))
    conditions: list[Condition] = []
    reasons: list[str] = []
    age = report.heartbeat_age_s
    if report.process_status == psutil.STATUS_STOPPED:
        conditions.append(Condition.HUNG)
        reasons.append(f"process {report.pid} is stopped (SIGSTOP) and no hold accounts for it")
    elif age is None or age > settings.heartbeat_max_age_s:
        conditions.append(Condition.HUNG)
        reasons.append(
            "no readable heartbeat" if age is None
            else f"heartbeat stale {age:.0f}s > {settings.heartbeat_max_age_s:g}s while the process lives"
        )
    if cpu_high:
        conditions.append(Condition.CPU_HIGH)
        reasons.append(f"CPU over {settings.cpu_max_pct:g}% for {settings.cpu_spike_minutes:g} min")
    if report.rss_mb is not None and report.rss_mb > settings.rss_max_mb:
        conditions.append(Condition.MEMORY_HIGH)
        reasons.append(f"memory {report.rss_mb:.0f} MB > {settings.rss_max_mb:g} MB")
    if not conditions:
        conditions.append(Condition.HEALTHY if report.status is HealthStatus.HEALTHY else Condition.DEGRADED)
        reasons.extend(report.reasons)
    return Assessment(report.service, tuple(conditions), report, None, tuple(reasons))


# --- crashes, each reported once ---


def claim_crashes(
    store: Store,
    services: tuple[str, ...] | list[str] = SERVICE_NAMES,
    *,
    window_hours: float = 24.0,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """The crashes of the last `window_hours` nobody reported yet, claimed for the caller; oldest first.

    The claim is an INSERT OR IGNORE of the crash's (service, kind, instance), so two reporters
    never both get the same crash. [] when the store is locked by a recovery.
    """
    if store_locked(store):
        return []
    now = time.time() if now is None else now
    c = service_events.c
    since_ms = int((now - window_hours * 3600) * 1000)
    claimed: list[dict[str, Any]] = []
    with store.engine.begin() as conn:
        rows = conn.execute(
            select(service_events)
            .where(c.kind == "crashed", c.service.in_(list(services)), c.at >= since_ms)
            .order_by(c.at, c.id)
        ).all()
        for row in rows:
            done = conn.execute(
                sqlite_insert(reported_service_events)
                .values(service=row.service, kind=row.kind, instance=row.instance, reported_at=int(now * 1000))
                .on_conflict_do_nothing()
            )
            if done.rowcount > 0:
                claimed.append(dict(row._mapping))
    return claimed


# --- heartbeats, for the relay ---


@dataclass(frozen=True)
class HeartbeatSignal:
    """A heartbeat worth an event: a new one written by the service, or a held service vouched for."""

    service: str
    epoch: int
    state: str
    pid: int | None
    vouched: bool = False  # sent on behalf of a held service, which writes no heartbeat itself

    def payload(self) -> dict[str, Any]:
        """The event payload: service, epoch, state, pid, vouched."""
        return {"service": self.service, "epoch": self.epoch, "state": self.state, "pid": self.pid,
                "vouched": self.vouched}


@dataclass
class HeartbeatWatch:
    """Follows the services' heartbeat files: `poll()` says which heartbeats are new since the last poll.

    A service covered by a hold writes no heartbeat (it is paused or stopped on purpose); every
    `vouch_every_s` the watch vouches for it instead, so a "heartbeat missing" automation stays quiet.
    """

    settings: Settings
    services: tuple[str, ...] = SERVICE_NAMES
    vouch_every_s: float = 5.0
    _seen: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    _last_signal: dict[str, float] = field(default_factory=dict)

    def poll(self, now: float | None = None) -> list[HeartbeatSignal]:
        """The heartbeats written since the last poll (the current one on the first), and the vouches due."""
        now = time.time() if now is None else now
        signals: list[HeartbeatSignal] = []
        for service in self.services:
            signal = self._poll_one(service, now)
            if signal is not None:
                self._last_signal[service] = now
                signals.append(signal)
        return signals

    def _poll_one(self, service: str, now: float) -> HeartbeatSignal | None:
        spec = service_spec(service, self.settings)
        try:
            beat = read_heartbeat(spec.heartbeat)
        except (ValueError, OSError):
            beat = None  # half-written by a foreign writer, or unreadable: like no heartbeat
        if beat is not None and self._seen.get(service) != (beat.epoch, beat.pid):
            self._seen[service] = (beat.epoch, beat.pid)
            return HeartbeatSignal(service, beat.epoch, beat.state, beat.pid)
        if now - self._last_signal.get(service, float("-inf")) < self.vouch_every_s:
            return None
        hold = read_hold(service, self.settings, now)
        if hold is None:
            return None
        check = inspect(spec)
        if not hold.covers(check):
            return None
        return HeartbeatSignal(service, int(now), f"held: {hold.description}", check.pid, vouched=True)


# --- deaths and store faults a service's own files show, for the relay (issue 10: detection in about a second) ---


@dataclass(frozen=True)
class ServiceFinding:
    """A service found dead (process gone, pidfile left: no clean stop, no hold), or reporting a corrupt store."""

    service: str
    kind: str  # "dead", "hung" or "store-corrupt"
    instance: str
    pid: int | None
    reason: str
    heartbeat_state: str | None = None
    heartbeat_age_s: float | None = None

    def payload(self) -> dict[str, Any]:
        """The event payload: for "dead" and "hung" shaped like the health monitor's (Assessment.payload),
        for "store-corrupt" {check: "service", service, error, problems}."""
        if self.kind == FINDING_STORE_CORRUPT:
            return {"check": "service", "service": self.service, "error": self.reason, "problems": [self.reason],
                    "pid": self.pid, "instance": self.instance}
        dead = self.kind == FINDING_DEAD
        return {
            "service": self.service, "pid": self.pid,
            "status": HealthStatus.DEAD.value if dead else HealthStatus.DEGRADED.value,
            "summary": f"{'DEAD' if dead else 'HUNG'}: {self.reason}",
            "conditions": [(Condition.DEAD if dead else Condition.HUNG).value], "reasons": [self.reason],
            "alive": not dead, "process_status": None,
            "heartbeat_age_s": self.heartbeat_age_s, "heartbeat_state": self.heartbeat_state, "cpu_pct": None,
            "rss_mb": None, "log_errors_per_min": None, "hold": None, "instance": self.instance,
            "detected_by": "heartbeat-relay",
        }


FINDING_DEAD = "dead"
FINDING_STORE_CORRUPT = "store-corrupt"
FINDING_HUNG = "hung"  # alive, silent past the heartbeat limit: the relay's service.hung (a hang seen in a second)


@dataclass
class ServiceWatch:
    """Looks at each service's process and heartbeat: `look()` says which instances died, hang or report a corrupt
    store.

    Dead: the pidfile of an instance this watch saw alive still names it but it is gone (a clean stop, ours or
    a recovery's, removes the pidfile), no hold covers that, and it was so at two looks `confirm_s` apart (process
    control removes the files of a process it killed within milliseconds). Each instance is reported once.
    Hung: alive, not held, and silent past heartbeat_max_age_s (the runbook's heartbeat limit), reported once per
    silence, at the first look past the limit (the proactive heartbeat-stale automation is the fallback).
    """

    settings: Settings
    services: tuple[str, ...] = SERVICE_NAMES
    confirm_s: float = 0.3
    _alive: dict[str, str] = field(default_factory=dict)  # service -> instance last seen alive
    _suspect: dict[tuple[str, str], float] = field(default_factory=dict)
    _reported: set[tuple[str, str, str]] = field(default_factory=set)

    @property
    def pending(self) -> bool:
        """Whether a death waits for its confirming look (look again after confirm_s)."""
        return bool(self._suspect)

    def look(self, now: float | None = None) -> list[ServiceFinding]:
        """The new findings of this look, each (service, kind, instance) once."""
        now = time.time() if now is None else now
        found: list[ServiceFinding] = []
        for service in self.services:
            spec = service_spec(service, self.settings)
            check = inspect(spec)
            try:
                beat = read_heartbeat(spec.heartbeat)
            except (ValueError, OSError):
                beat = None
            if check.alive and check.record is not None:
                instance = check.record.instance
                self._alive[service] = instance
                self._suspect.pop((service, instance), None)
                error = None if beat is None or beat.pid != check.pid else store_corrupt_error(beat.state)
                if error is not None and (service, FINDING_STORE_CORRUPT, instance) not in self._reported:
                    self._reported.add((service, FINDING_STORE_CORRUPT, instance))
                    found.append(ServiceFinding(service, FINDING_STORE_CORRUPT, instance, check.pid, error,
                                                beat.state if beat else None))
                hung = self._hung(service, check, beat, now)
                if hung is not None:
                    found.append(hung)
                continue
            dead = check.crashed_instance
            if dead is None or dead != self._alive.get(service) or (service, FINDING_DEAD, dead) in self._reported:
                continue
            if covering_hold(service, self.settings, check, now) is not None:
                continue
            first = self._suspect.setdefault((service, dead), now)
            if now - first < self.confirm_s:
                continue
            del self._suspect[(service, dead)]
            self._reported.add((service, FINDING_DEAD, dead))
            found.append(ServiceFinding(
                service, FINDING_DEAD, dead, check.pid, f"process {check.pid} is gone ({check.reason})",
                None if beat is None else beat.state, None if beat is None else round(beat.age_s(now), 1),
            ))
        return found

    def _hung(self, service: str, check: ProcessCheck, beat: Heartbeat | None, now: float) -> ServiceFinding | None:
        """A live instance of ours silent past the heartbeat limit (its own heartbeat older than
        heartbeat_max_age_s, or none written since a start that long ago), not held: once per silence (a new
        heartbeat of the same instance begins a new one)."""
        record = check.record
        if record is None:
            return None
        limit = self.settings.heartbeat_max_age_s
        if beat is not None and beat.pid == check.pid:
            age, silence, state = beat.age_s(now), f"{record.instance}@{beat.epoch}", beat.state
            reason = f"heartbeat stale {age:.0f}s > {limit:g}s while the process lives"
        else:
            age = now - record.started_at if record.started_at > 0 else 0.0
            silence, state = f"{record.instance}@none", None
            reason = f"no heartbeat written in the {age:.0f}s since its start (limit {limit:g}s)"
        key = (service, FINDING_HUNG, silence)
        if age <= limit or key in self._reported or covering_hold(service, self.settings, check, now) is not None:
            return None
        self._reported.add(key)
        return ServiceFinding(service, FINDING_HUNG, record.instance, check.pid, reason, state, round(age, 1))
