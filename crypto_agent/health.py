"""The health probe of a service, its history in the store, and the questions asked of that history.

`probe("backtest")` says HEALTHY, DEGRADED or DEAD with the reasons, by the runbook's limits
(heartbeat < 120 s, CPU < 90 %, memory < 500 MB, log errors <= 5/min; all settings). `record()`
keeps a report in probe_samples (and a crash in service_events), so `cpu_high_for(...)` ("over 90 %
for 10 minutes?") and `crashes_within(...)` ("3 crashes in 24 h?") are answered from data.
"""

from __future__ import annotations

import calendar
import enum
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import Connection, func, insert, select

from crypto_agent.process import Liveness, ServiceSpec, inspect, service_spec
from crypto_agent.schema import backtest_results, probe_samples, service_events
from crypto_agent.service import (
    LOG_LINE_RE,
    LOG_TIME_FORMAT,
    event_insert,
    read_heartbeat,
)
from crypto_agent.settings import Settings, get_settings
from crypto_agent.store import BUSY_TIMEOUT_MS, Store, store_locked

LOG_ERROR_WINDOW_S = 60.0
LOG_TAIL_BYTES = 256 * 1024


class HealthStatus(str, enum.Enum):
    """The probe's verdict."""

    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    DEAD = "DEAD"


@dataclass(frozen=True)
class ProbeLimits:
    """The limits a service is held to; the runbook's by default."""

    heartbeat_max_age_s: float = 120.0
    cpu_max_pct: float = 90.0
    rss_max_mb: float = 500.0
    log_errors_per_min_max: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ProbeLimits:
        """The limits configured in `settings`."""
        return cls(
            heartbeat_max_age_s=settings.heartbeat_max_age_s,
            cpu_max_pct=settings.cpu_max_pct,
            rss_max_mb=settings.rss_max_mb,
            log_errors_per_min_max=settings.log_errors_per_min_max,
        )


@dataclass(frozen=True)
class ProbeReport:
    """What the probe saw of one service, its verdict and the reasons for it."""

    service: str
    status: HealthStatus
    pid: int | None
    alive: bool
    zombie: bool
    process_status: str | None  # psutil's: running, sleeping, stopped, zombie ...
    heartbeat_age_s: float | None
    heartbeat_state: str | None
    cpu_pct: float | None
    rss_mb: float | None
    log_errors_per_min: float | None
    niceness: int | None
    reasons: list[str] = field(default_factory=list)
    checked_at: float = 0.0
    liveness: str = ""
    crashed_instance: str | None = None  # set when the pidfile's process died without a clean stop

    @property
    def healthy(self) -> bool:
        """Whether the status is HEALTHY."""
        return self.status is HealthStatus.HEALTHY

    @property
    def summary(self) -> str:
        """The runbook's status line: `HEALTHY: PID n`, `DEGRADED: Heartbeat stale Ns`, `DEAD: No PID file` ..."""
        if self.healthy:
            return f"HEALTHY: PID {self.pid}"
        return f"{self.status.value}: {self.reasons[0] if self.reasons else 'unknown'}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the status line under "summary"."""
        d = asdict(self)
        d["status"] = self.status.value
        d["summary"] = self.summary
        return d


def probe(
    service: str | ServiceSpec,
    settings: Settings | None = None,
    *,
    limits: ProbeLimits | None = None,
    cpu_sample_s: float | None = None,
    now: float | None = None,
) -> ProbeReport:
    """Probe a service: DEAD (no live process of ours), DEGRADED (a limit broken) or HEALTHY; never signals."""
    settings = settings or get_settings()
    spec = service if isinstance(service, ServiceSpec) else service_spec(service, settings)
    limits = limits or ProbeLimits.from_settings(settings)
    sample_s = settings.probe_cpu_sample_s if cpu_sample_s is None else cpu_sample_s
    check = inspect(spec)
    checked_at = time.time() if now is None else now
    base: dict[str, Any] = {
        "service": spec.name, "pid": check.pid, "checked_at": checked_at, "liveness": check.state.value,
        "heartbeat_age_s": None, "heartbeat_state": None, "cpu_pct": None, "rss_mb": None, "niceness": None,
        "process_status": None, "log_errors_per_min": None,
    }
    heartbeat_reason: str | None = None
    try:
        beat = read_heartbeat(spec.heartbeat)
    except (ValueError, OSError) as exc:
        beat = None
        heartbeat_reason = f"Heartbeat unreadable ({exc})"
    if beat is not None:
        base["heartbeat_age_s"] = round(beat.age_s(checked_at), 1)
        base["heartbeat_state"] = beat.state
    try:
        base["log_errors_per_min"] = log_errors_per_minute(spec.log, now=checked_at)
    except OSError:
        base["log_errors_per_min"] = None
    if not check.alive or check.process is None:
        zombie = check.state is Liveness.ZOMBIE
        base["process_status"] = "zombie" if zombie else None
        return ProbeReport(
            status=HealthStatus.DEAD, alive=False, zombie=zombie, reasons=[check.reason],
            crashed_instance=check.crashed_instance, **base,
        )
    proc = check.process
    reasons: list[str] = []
    try:
        proc.cpu_percent(None)
        time.sleep(sample_s)
        cpu = proc.cpu_percent(None)
        with proc.oneshot():
            rss_mb = proc.memory_info().rss / (1024 * 1024)
            process_status = proc.status()
            niceness = proc.nice()
    except psutil.NoSuchProcess:
        return ProbeReport(
            status=HealthStatus.DEAD, alive=False, zombie=False,
            reasons=[f"Process {check.pid} not running (it ended during the probe)"],
            crashed_instance=check.record.instance if check.record else None, **base,
        )
    base.update(cpu_pct=round(cpu, 1), rss_mb=round(rss_mb, 1), process_status=process_status, niceness=niceness)
    if process_status == psutil.STATUS_ZOMBIE:
        return ProbeReport(
            status=HealthStatus.DEAD, alive=False, zombie=True,
            reasons=[f"Process {check.pid} not running (zombie)"],
            crashed_instance=check.record.instance if check.record else None, **base,
        )
    if heartbeat_reason is not None:
        reasons.append(heartbeat_reason)
    elif beat is None:
        reasons.append(f"No heartbeat file {spec.heartbeat}")
    elif beat.age_s(checked_at) > limits.heartbeat_max_age_s:
        reasons.append(f"Heartbeat stale {int(beat.age_s(checked_at))}s")
    if process_status == psutil.STATUS_STOPPED:
        reasons.append(f"Process {check.pid} is stopped (SIGSTOP); it does no work until SIGCONT")
    if cpu > limits.cpu_max_pct:
        reasons.append(f"CPU {cpu:.0f}% > {limits.cpu_max_pct:g}%")
    if rss_mb > limits.rss_max_mb:
        reasons.append(f"Memory {rss_mb:.0f} MB > {limits.rss_max_mb:g} MB")
    errors = base["log_errors_per_min"]
    if errors is not None and errors > limits.log_errors_per_min_max:
        reasons.append(f"Log errors {errors:g}/min > {limits.log_errors_per_min_max:g}/min")
    status = HealthStatus.DEGRADED if reasons else HealthStatus.HEALTHY
    return ProbeReport(status=status, alive=True, zombie=False, reasons=reasons, **base)


# --- the log's error rate ---


def log_errors_per_minute(
    log_path: Path, window_s: float = LOG_ERROR_WINDOW_S, now: float | None = None
) -> float:
    """ERROR and CRITICAL records per minute in the log over the last `window_s` (rotated file included)."""
    now = time.time() if now is None else now
    cutoff = now - window_s
    count = 0
    for path in (log_path, log_path.with_name(log_path.name + ".1")):
        n, oldest = _count_errors_since(path, cutoff)
        count += n
        if oldest is not None and oldest < cutoff:
            break  # this file reaches back past the window: older files cannot add to it
    return round(count * 60.0 / window_s, 2)


def _count_errors_since(path: Path, cutoff: float) -> tuple[int, float | None]:
    lines, oldest = _error_lines_since(path, cutoff)
    return len(lines), oldest


def recent_error_lines(
    log_path: Path, window_s: float = LOG_ERROR_WINDOW_S, max_lines: int = 10, now: float | None = None
) -> list[str]:
    """The last `max_lines` ERROR and CRITICAL lines of the log within `window_s` (rotated file included), oldest
    first, as written (callers that show them to people mask secrets: crypto_agent.alerts.redact)."""
    now = time.time() if now is None else now
    cutoff = now - window_s
    found: list[str] = []
    for path in (log_path, log_path.with_name(log_path.name + ".1")):
        lines, oldest = _error_lines_since(path, cutoff)
        found = lines + found
        if len(found) >= max_lines or (oldest is not None and oldest < cutoff):
            break
    return found[-max_lines:]


def _error_lines_since(path: Path, cutoff: float) -> tuple[list[str], float | None]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - LOG_TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return [], None
    lines = data.split(b"\n")[1 if start > 0 else 0:]
    oldest: float | None = None
    out: list[str] = []
    for line in lines:
        m = LOG_LINE_RE.match(line)
        if m is None:
            continue
        if oldest is None:
            # a file read only in part reaches back further than its tail: never look past it
            oldest = _epoch(m.group("time")) if start == 0 else float("-inf")
        if m.group("kind") == b":" and m.group("level") in (b"ERROR", b"CRITICAL") \
                and _epoch(m.group("time")) >= cutoff:
            out.append(line.decode("utf-8", errors="replace").rstrip("\r"))
    return out, oldest


def _epoch(stamp: bytes) -> float:
    return float(calendar.timegm(time.strptime(stamp.decode("ascii"), LOG_TIME_FORMAT)))


# --- history in the store ---


def record(store: Store, report: ProbeReport, busy_timeout_s: float = 2.0) -> bool:
    """Keep a report in probe_samples, and a crash it reveals in service_events; False when the store is locked.

    A writer that holds the database (a hung service stopped mid-transaction) makes this raise
    sqlalchemy's OperationalError after `busy_timeout_s`, instead of holding the probe for the
    store's long default.
    """
    if store_locked(store):
        return False
    with store.engine.connect() as conn:
        raw = conn.connection.driver_connection  # a PRAGMA on the driver: no SQLAlchemy transaction begun
        assert raw is not None  # an open connection always has its driver's
        raw.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        try:
            with conn.begin():
                _insert_sample(conn, report)
                if report.crashed_instance is not None and report.pid is not None:
                    conn.execute(event_insert(
                        report.service, "crashed", pid=report.pid, instance=report.crashed_instance,
                        source="probe", detail=report.summary, at=report.checked_at,
                    ))
        finally:
            raw.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return True


def _insert_sample(conn: Connection, report: ProbeReport) -> None:
    conn.execute(insert(probe_samples).values(
        service=report.service,
        checked_at=int(report.checked_at * 1000),
        status=report.status.value,
        pid=report.pid,
        alive=report.alive,
        zombie=report.zombie,
        heartbeat_age_s=report.heartbeat_age_s,
        cpu_pct=report.cpu_pct,
        rss_mb=report.rss_mb,
        log_errors_per_min=report.log_errors_per_min,
        reasons="; ".join(report.reasons),
    ))


def newest_backtest_result_at(store: Store) -> float | None:
    """When the newest backtest_results row was written (epoch seconds), None when there is none."""
    with store.engine.connect() as conn:
        newest = conn.execute(select(func.max(backtest_results.c.created_at))).scalar()
    return None if newest is None else float(newest) / 1000


def samples(store: Store, service: str, since_s: float | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """The probe samples of a service, oldest first, of the last `since_s` seconds (all when None)."""
    now = time.time() if now is None else now
    q = select(probe_samples).where(probe_samples.c.service == service)
    if since_s is not None:
        q = q.where(probe_samples.c.checked_at >= int((now - since_s) * 1000))
    q = q.order_by(probe_samples.c.checked_at, probe_samples.c.id)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def cpu_high_streak_s(
    store: Store,
    service: str,
    limit: float | None = None,
    now: float | None = None,
    newest_max_age_s: float = 900.0,
) -> float:
    """Seconds from the first to the newest of the latest run of samples over the CPU limit (same PID).

    0 when the newest sample is under the limit, or older than `newest_max_age_s` (no recent data).
    """
    limit = get_settings().cpu_max_pct if limit is None else limit
    now = time.time() if now is None else now
    c = probe_samples.c
    q = (
        select(c.checked_at, c.cpu_pct, c.pid)
        .where(c.service == service)
        .order_by(c.checked_at.desc(), c.id.desc())
        .limit(10_000)
    )
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    if not rows or now - rows[0].checked_at / 1000 > newest_max_age_s:
        return 0.0
    newest = rows[0]
    first = None
    for row in rows:
        if row.cpu_pct is None or row.cpu_pct <= limit or row.pid != newest.pid:
            break
        first = row
    if first is None:
        return 0.0
    return (newest.checked_at - first.checked_at) / 1000


def cpu_high_for(
    store: Store, service: str, minutes: float | None = None, limit: float | None = None, now: float | None = None
) -> bool:
    """Has CPU been over the limit in every sample for `minutes` (runbook: 90 % for 10 min)?

    Samples come every few minutes, so a run is measured from its first high sample to the newest;
    a 1 % slack absorbs the jitter of scheduled probes.
    """
    if minutes is None or limit is None:
        settings = get_settings()
        minutes = settings.cpu_spike_minutes if minutes is None else minutes
        limit = settings.cpu_max_pct if limit is None else limit
    return cpu_high_streak_s(store, service, limit, now) >= minutes * 60 * 0.99


def crashes_within(store: Store, service: str, hours: float | None = None, now: float | None = None) -> int:
    """How many times the service crashed (died without a clean stop) in the last `hours` (default 24)."""
    return failures_within(store, service, hours, now, kinds=("crashed",))


FAILURE_KINDS = ("crashed", "killed", "start-failed")


def failures_within(
    store: Store, service: str, hours: float | None = None, now: float | None = None,
    kinds: tuple[str, ...] = FAILURE_KINDS,
) -> int:
    """Crashes, SIGKILLs after a hang and failed starts of the service in the last `hours` (default 24)."""
    hours = get_settings().persistent_window_hours if hours is None else hours
    now = time.time() if now is None else now
    c = service_events.c
    q = select(func.count()).select_from(service_events).where(
        c.service == service, c.kind.in_(kinds), c.at >= int((now - hours * 3600) * 1000)
    )
    with store.engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


def events(store: Store, service: str, since_s: float | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """The service events (started, stopped, crashed, killed, start-failed), oldest first."""
    now = time.time() if now is None else now
    q = select(service_events).where(service_events.c.service == service)
    if since_s is not None:
        q = q.where(service_events.c.at >= int((now - since_s) * 1000))
    q = q.order_by(service_events.c.at, service_events.c.id)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]
