"""The decisions and the careful steps of the runbook's recoveries, without Prefect.

What the runbook does with shell one-liners, done safely: triage a service (dead, hung, or
running), how long to hold a restart after a start, the log's recent errors, REINDEX on a scratch
copy (never on the only copy), a repaired file put in place with the corrupt one quarantined, the
candle windows to resync after a restore, and the rows to salvage from a quarantined database.
The flows (flows/recovery/) call these and act on what they return, and their steps return the
values defined at the end (a stop, a restore, a resync, a stack dump, the exchange's status).
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent import backup, holds, storelock
from crypto_agent.collector import Window, plan_windows
from crypto_agent.daemon import FAULT_ENV
from crypto_agent.exchange import RateLimitStatus
from crypto_agent.health import ProbeReport
from crypto_agent.process import (
    Liveness,
    ServiceSpec,
    StopResult,
    inspect,
    service_spec,
    tail_text,
)
from crypto_agent.schema import OHLCV_TABLES, service_events
from crypto_agent.service import LOG_LINE_RE, read_heartbeat, read_pid_record
from crypto_agent.settings import Settings
from crypto_agent.store import BUSY_TIMEOUT_MS, Store

# A recovery starts a service with this on top of its own environment: a fault injected into the
# instance that failed (a chaos drill's CRYPTO_AGENT_DAEMON_FAULT) must not come back with the restart.
CLEAN_START_ENV: dict[str, str] = {FAULT_ENV: ""}

LOG_ERROR_WORDS = re.compile(rb"error|exception|traceback|fatal", re.IGNORECASE)
HOUR_MS = 3_600_000


# --- services ---


class Verdict(str, enum.Enum):
    """What a look at a service says for the daemon-crash recovery."""

    DEAD = "dead"  # no live process of ours: restart it (scenario 1)
    HUNG = "hung"  # our process lives but does no work (stale heartbeat, stopped): scenario 4
    RUNNING = "running"  # it lives and beats: not a crash


@dataclass(frozen=True)
class Triage:
    """The verdict on a service and why; `foreign` names a pidfile that points at someone else's process."""

    verdict: Verdict
    reason: str
    foreign: str | None = None


def triage(report: ProbeReport, heartbeat_max_age_s: float) -> Triage:
    """Dead, hung (alive with a stale or missing heartbeat, or stopped) or running, from a probe report."""
    if not report.alive:
        foreign = report.reasons[0] if report.liveness == Liveness.FOREIGN.value and report.reasons else None
        return Triage(Verdict.DEAD, report.summary, foreign)
    if report.process_status == "stopped":
        return Triage(Verdict.HUNG, f"PID {report.pid} is stopped (SIGSTOP): it does no work")
    age = report.heartbeat_age_s
    if age is None:
        return Triage(Verdict.HUNG, f"PID {report.pid} lives but writes no heartbeat")
    if age > heartbeat_max_age_s:
        return Triage(Verdict.HUNG, f"PID {report.pid} lives but its heartbeat is {age:.0f} s old "
                      f"(limit {heartbeat_max_age_s:g} s)")
    return Triage(Verdict.RUNNING, report.summary)


def stale_signal(healthy: bool, started_at: float | None, detected_at: float | None,
                 pid: int | None = None, *, reported_pid: int | None = None,
                 heartbeat_signal: bool = False) -> str | None:
    """Why a "this service is dead or silent" signal is already answered, or None when it is to be recovered.

    Answered: the service is HEALTHY as an instance started after the signal's detection (an earlier recovery
    restarted it: the signal is a late or duplicate report of that crash), or as another instance than the one
    the signal names (`reported_pid`), or, for a heartbeat signal (missing or stale heartbeats), HEALTHY at all:
    its heartbeat is fresh now, so the silence was the relay's or a restart's, not the service's. Such a signal
    opens no incident and pages nobody."""
    if not healthy:
        return None
    if started_at is not None and detected_at is not None and started_at > detected_at:
        return (f"a late report of a crash already recovered: PID {pid} is HEALTHY, started "
                f"{started_at - detected_at:.1f} s after the signal's detection")
    if reported_pid is not None and pid is not None and reported_pid != pid:
        return f"a report about PID {reported_pid}, which is gone: PID {pid} is HEALTHY"
    if heartbeat_signal:
        return f"a false alarm: PID {pid} is HEALTHY, its heartbeat fresh (the heartbeats' relay was away)"
    return None


def repaired_since(closed: list[Any], detected_at: float | None, scenario: str = "db-corruption") -> Any | None:
    """The incident of `scenario` that recovered after the signal's detection (seconds), from `closed` incidents
    (newest first), or None: a store.corrupt detected before the store was repaired is a late report of it."""
    if detected_at is None:
        return None
    for inc in closed:
        if (inc.scenario == scenario and inc.outcome == "recovered" and inc.resolved_at is not None
                and inc.resolved_at / 1000 > detected_at):
            return inc
    return None


def last_start(spec: ServiceSpec, store: Store | None = None) -> float | None:
    """When the service was last started (epoch s): its ownership record, or its newest `started` event."""
    times: list[float] = []
    record = read_pid_record(spec.pid_record)
    if record is not None and record.started_at > 0:
        times.append(record.started_at)
    if store is not None:
        c = service_events.c
        try:
            with store.engine.connect() as conn:
                newest = conn.execute(
                    select(func.max(c.at)).where(c.service == spec.name, c.kind == "started")
                ).scalar()
        except SQLAlchemyError:
            newest = None  # a damaged store: the record alone decides
        if newest is not None:
            times.append(newest / 1000)
    return max(times) if times else None


def restart_wait_s(last_start_s: float | None, grace_s: float, now: float | None = None) -> float:
    """Seconds to hold a restart: the rest of the grace period after the last start (0 when it is over).

    The fixed grace of issue 5; recover-daemon-crash now follows restart_policy.decide() (a backoff).
    """
    if last_start_s is None:
        return 0.0
    now = time.time() if now is None else now
    return max(0.0, last_start_s + grace_s - now)


def stop_grace_s(settings: Settings, heartbeat_age_s: float | None = None) -> float:
    """The SIGTERM grace of a stop: stop_grace_s, or the shorter hung_stop_grace_s for a service whose main loop
    has been silent past the heartbeat limit (heartbeat_age_s over heartbeat_max_age_s): it had that long to
    finish its unit already, and SQLite rolls back what SIGKILL interrupts. One that still beats (CPU or memory
    over its limit, stale results) gets the whole grace."""
    if heartbeat_age_s is not None and heartbeat_age_s > settings.heartbeat_max_age_s:
        return min(settings.hung_stop_grace_s, settings.stop_grace_s)
    return settings.stop_grace_s


def last_heartbeat_at(spec: ServiceSpec) -> float | None:
    """When the service last wrote its heartbeat (epoch s), None without a readable one."""
    try:
        beat = read_heartbeat(spec.heartbeat)
    except (ValueError, OSError):
        return None
    return float(beat.epoch) if beat is not None else None


def log_errors(log_path: Path, lines: int = 100) -> list[str]:
    """The runbook's `tail -100 <log> | grep -i error`: ERROR/CRITICAL records (with their continuation
    lines) and stray lines that mention an error, among the last `lines` lines of the log."""
    out: list[str] = []
    in_error = False
    for line in tail_text(log_path, lines=lines, max_bytes=256 * 1024).splitlines():
        raw = line.encode("utf-8", "replace")
        m = LOG_LINE_RE.match(raw)
        if m is None:
            in_error = False
            if LOG_ERROR_WORDS.search(raw):
                out.append(line)
            continue
        if m.group("kind") == b"|":  # a continuation of the record above
            if in_error:
                out.append(line)
            continue
        in_error = m.group("level") in (b"ERROR", b"CRITICAL")
        if in_error:
            out.append(line)
    return out


def service_state(name: str, settings: Settings) -> str:
    """One line on a service for a message: running (PID, heartbeat age), held, or not running and why."""
    spec = service_spec(name, settings)
    check = inspect(spec)
    hold = holds.read_hold(spec)
    paused_note = f"; paused ({hold.reason or 'no reason given'})" if hold is not None else ""
    if not check.alive:
        return f"{name}: not running ({check.reason}){paused_note}"
    beat = last_heartbeat_at(spec)
    age = f", heartbeat {time.time() - beat:.0f} s old" if beat is not None else ", no heartbeat"
    return f"{name}: running, PID {check.pid}{age}{paused_note}"


def store_state(settings: Settings) -> str:
    """One line on the store for a message: its size, and who holds its recovery lock."""
    db = Path(settings.db_path)
    holder = storelock.lock_holder(db)
    lock = "" if holder is None else f"; LOCKED by {holder.get('owner', 'an unknown owner')}"
    if not db.exists():
        return f"store: {db} does not exist{lock}"
    return f"store: {db} ({db.stat().st_size / 1e6:.1f} MB){lock}"


# --- store repair ---


@dataclass(frozen=True)
class ReindexResult:
    """REINDEX tried on a scratch copy: whether the copy is sound afterwards, and where it is."""

    ok: bool
    problems: list[str]
    repaired: Path | None
    seconds: float


def reindex_copy(db_path: Path | str, work_dir: Path | str) -> ReindexResult:
    """Copy the database (with its WAL) to work_dir, REINDEX the copy and check it fully; the live file is untouched.

    A sound copy is left at `repaired` (self-contained, no WAL) for put_repaired_in_place; a
    copy that stays corrupt is deleted with work_dir.
    """
    started = time.perf_counter()
    db = Path(db_path)
    work = Path(work_dir)
    if not db.is_file():
        return ReindexResult(False, [f"database file {db} does not exist"], None, 0.0)
    work.mkdir(parents=True, exist_ok=True)
    copy = work / db.name
    problems: list[str] = []
    try:
        shutil.copyfile(db, copy)
        wal = db.with_name(db.name + "-wal")
        if wal.exists():  # the newest pages live there until a checkpoint
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        conn = sqlite3.connect(copy, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("REINDEX")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA journal_mode=DELETE")
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(100)")]
            problems = [] if rows == ["ok"] else rows
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        problems = problems or [f"{type(exc).__name__}: {exc}"]
    seconds = time.perf_counter() - started
    if problems:
        shutil.rmtree(work, ignore_errors=True)
        return ReindexResult(False, problems, None, seconds)
    return ReindexResult(True, [], copy, seconds)


def put_repaired_in_place(db_path: Path | str, repaired: Path | str, quarantine_dir: Path | str, reason: str) -> Path:
    """Quarantine the corrupt database (with -wal/-shm; never overwritten), then move the repaired copy
    into its place; the quarantine folder. The caller holds the recovery lock and has stopped the services."""
    db, fixed = Path(db_path), Path(repaired)
    folder = backup.quarantine(db, quarantine_dir, reason)
    os.replace(fixed, db)
    fd = os.open(db.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(fixed.parent, ignore_errors=True)
    return folder


def hand_lock_to_person(db_path: Path | str, owner: str) -> Path:
    """Rewrite the recovery lock we hold so it stays after we exit, naming who must act; its path.

    Used when a recovery gives up: no service, collector or scheduled job may write (or create an
    empty database) until a person has looked and deletes the file.
    """
    path = storelock.lock_path(db_path)
    content = {"owner": owner, "host": socket.gethostname(),
               "since": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.handover")
    tmp.write_text(json.dumps(content) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def resync_windows(store: Store, settings: Settings, since_ms: int, now_ms: int) -> list[Window]:
    """The candle windows a restored store lacks: every hole of the configured symbols and timeframes from
    the backup's time (or the continuity window, whichever reaches further back) up to now."""
    hours = max((now_ms - since_ms) / HOUR_MS + 4, settings.continuity_window_hours)
    return plan_windows(
        store, settings.symbols, settings.timeframes, mode="update-all", lookback_hours=hours,
        initial_history_days=settings.initial_history_days, now_ms=now_ms,
    )


# The column that says when a row of each table was (last) written; candles are resynced from the
# exchange instead. A table not named here is salvaged by the first of GENERIC_TIME_COLUMNS it has.
SALVAGE_TIME_COLUMNS: dict[str, tuple[str, ...]] = {
    "backtest_results": ("created_at",),
    "paper_signals": ("evaluated_at",),
    "paper_positions": ("opened_at", "closed_at"),
    "probe_samples": ("checked_at",),
    "service_events": ("at",),
    # the monitor's claims of the crashes it reported: salvaged with the crashes, or a restore would make the
    # monitor report them again and the persistent-failures threshold count them twice (a rollback for nothing)
    "reported_service_events": ("reported_at",),
    "sentimento_mercado": ("fetched_at",),
    "macro_series": ("fetched_at",),
}
GENERIC_TIME_COLUMNS = ("updated_at", "created_at", "fetched_at", "timestamp", "at")


@dataclass
class SalvageSummary:
    """Rows copied from the quarantined database per table, and the key ranges that could not be read."""

    copied: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every row newer than the backup was read."""
        return not self.unreadable

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"copied": dict(self.copied), "unreadable": dict(self.unreadable), "skipped": list(self.skipped)}


def salvage_since(corrupt_db: Path | str, target_db: Path | str, since_ms: int) -> SalvageSummary:
    """Copy the readable rows newer than since_ms of every non-candle table from a quarantined database."""
    target = Path(target_db)
    conn = sqlite3.connect(f"{target.resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")
        tables = {r[0]: [c[1] for c in conn.execute(f'PRAGMA table_info("{r[0]}")')] for r in names.fetchall()}
    finally:
        conn.close()
    candle_tables = {t.name for t in OHLCV_TABLES.values()}
    summary = SalvageSummary()
    for table, columns in sorted(tables.items()):
        if table in candle_tables:
            continue
        wanted = SALVAGE_TIME_COLUMNS.get(table) or tuple(c for c in GENERIC_TIME_COLUMNS if c in columns)[:1]
        wanted = tuple(c for c in wanted if c in columns)
        if not wanted:
            summary.skipped.append(table)
            continue
        for column in wanted:
            result = backup.salvage(corrupt_db, target, since_ms, tables=[table], time_column=column)
            summary.copied[table] = summary.copied.get(table, 0) + result.get(table, 0)
            if result.unreadable.get(table):
                summary.unreadable.setdefault(table, []).extend(result.unreadable[table])
    return summary


def minutes_lost(tables: dict[str, int], point_ms: int, now_ms: int, *, resync_ok: bool,
                 salvage: SalvageSummary | None, salvaged: bool) -> dict[str, float]:
    """Minutes of rows each table of a restored store may have lost, from the restored point (`point_ms`: the
    replica's transaction or the backup's time) to `now_ms`: 0 for the candles when the resync fetched them all
    again, 0 for a table whose newer rows were all salvaged from the quarantined file, the whole span for a table
    with unreadable ranges, or when nothing was salvaged (a rollback drops them on purpose; they stay in quarantine).
    """
    span = round(max(0, now_ms - point_ms) / 60_000, 1)
    candles = {t.name for t in OHLCV_TABLES.values()}
    lost: dict[str, float] = {}
    for table in sorted(tables):
        if table in candles:
            lost[table] = 0.0 if resync_ok else span
        elif not salvaged:
            lost[table] = span
        else:
            lost[table] = span if salvage is not None and salvage.unreadable.get(table) else 0.0
    return lost


def hours_between(start_ms: int | None, end_ms: int) -> float:
    """Hours from start_ms to end_ms, 0 when start is unknown or later."""
    if start_ms is None:
        return 0.0
    return max(0.0, (end_ms - start_ms) / HOUR_MS)


# --- what the recovery steps return ---


@dataclass(frozen=True)
class ServiceStop:
    """A recovery's stop of one service: what the stop did, or why it was refused (a pidfile naming a stranger)."""

    service: str
    result: StopResult | None  # None when refused: nothing was signalled
    refused: str | None = None

    @property
    def was_running(self) -> bool:
        """Whether our process ran until this stop."""
        return self.result is not None and self.result.was_running

    @property
    def cleaned(self) -> list[str]:
        """The state files the stop removed (a dead instance's pidfile means it had crashed)."""
        return [p.name for p in self.result.cleaned] if self.result is not None else []


@dataclass(frozen=True)
class RestoredBackup:
    """A good backup put in place of the database: which one, when it was taken, where the replaced file went."""

    path: Path
    created_at_ms: int
    quarantined: Path | None  # the replaced database file, kept in quarantine (None when there was none)
    tables: dict[str, int]
    seconds: float

    @property
    def name(self) -> str:
        """The backup's file name."""
        return self.path.name


@dataclass(frozen=True)
class ResyncSummary:
    """Candles fetched after a restore: the windows planned (None when planning failed), rows, failures."""

    windows: int | None
    written: int
    failures: dict[str, str]
    now_ms: int

    @property
    def ok(self) -> bool:
        """Whether every window was fetched."""
        return not self.failures


@dataclass(frozen=True)
class Restoration:
    """A store restored from a good backup (or why none was), with the candles resynced and the rows salvaged."""

    backup: RestoredBackup | None  # None: no backup qualified, the database was not touched
    message: str = ""  # why no backup qualified
    refused: tuple[str, ...] = ()  # backups that failed their check on the way (marked bad)
    resync: ResyncSummary | None = None
    salvage: SalvageSummary | None = None
    data_lost_hours: float = 0.0


@dataclass(frozen=True)
class StackDump:
    """A service's thread stacks (SIGUSR1), or why there are none; whether it had to be woken (SIGCONT) first."""

    path: Path | None
    text: str
    continued: bool
    timeout: str | None = None


@dataclass(frozen=True)
class ExchangeStatus:
    """The exchange's answer to the runbook's first two checks: its clock, and the request weight used."""

    server_time_ms: int
    skew_ms: int
    limits: RateLimitStatus

    @property
    def used_share(self) -> float | None:
        """The share of the weight limit used (None when the exchange did not say)."""
        return self.limits.used_share
