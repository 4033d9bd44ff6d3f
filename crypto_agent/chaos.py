"""Chaos drills of the runbook's incidents, without Prefect: the faults themselves and the checks around them.

Each injection acts on the running stack found through the settings: the services through their
pidfiles (a signal only after the ownership check of crypto_agent.process), the store file, and the
bundled simulator's `/_sim/` fault API. `verify` says whether the stack is back: services HEALTHY,
quick_check and the data checks passing, no incident open. deployments/chaos.py runs the drills:
it injects, lets (or makes) the scheduled checks find the fault, follows the recovery the automations
start, and prints the timeline and the MTTR table.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from sqlalchemy import delete

from crypto_agent import backup, health, incidents, process, recovery
from crypto_agent.daemon import FAULT_ENV, parse_fault
from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.incidents import Incident
from crypto_agent.quality import check_data
from crypto_agent.schema import metadata
from crypto_agent.settings import Settings
from crypto_agent.store import Store, check_integrity
from crypto_agent.universe import timeframe

DAEMON = "backtest"
TRADER = "trader"
SIM_TIMEOUT_S = 5.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# The WAL is folded into the file before a page is damaged, so the damaged page is the one SQLite reads.
CHECKPOINT_BUSY_MS = 30_000


class ChaosError(CryptoAgentError):
    """A drill cannot be injected here (no stack, not our process, no simulator, the store locked)."""


@dataclass(frozen=True)
class Drill:
    """One chaos scenario: the runbook scenario it rehearses, what it injects, and which incident recovers it."""

    name: str
    runbook: int  # the runbook's scenario number (1-5)
    title: str
    fault: str  # what is injected, in words
    detection: str  # what finds it
    incident_scenarios: tuple[str, ...]  # crypto_agent.incidents scenario names that count as its recovery
    eta_min: float  # the runbook's Quick Reference ETA

    @property
    def eta_s(self) -> float:
        """The runbook's ETA in seconds."""
        return self.eta_min * 60.0


DRILLS: dict[str, Drill] = {d.name: d for d in (
    Drill("daemon-killed", 1, "Daemon crashed",
          "SIGKILL of the backtest daemon (our PID, after the ownership check), as the OOM killer would",
          "its heartbeat events stop: the proactive automation crypto-agent/heartbeat-missing",
          ("daemon-crash",), 2),
    Drill("daemon-hung", 4, "Process hang",
          "SIGSTOP of the backtest daemon: alive, but no heartbeat and no work",
          "its heartbeat events stop: crypto-agent/heartbeat-missing, then the triage hands over to "
          "recover-process-hang", ("daemon-crash", "process-hang"), 5),
    Drill("cpu-spike", 4, "CPU spike",
          "the backtest daemon restarted with CRYPTO_AGENT_DAEMON_FAULT=burn-cpu (it spins, heart-beating)",
          "health-monitor: CPU over cpu_max_pct in every sample for cpu_spike_minutes (the drill runs the "
          "monitor as a fast cron)", ("process-hang",), 5),
    Drill("exchange-down", 2, "Stale data: exchange down",
          "the simulator answers 503 for a while and the newest H1 candles of some symbols are gone, "
          "as if the collector had failed while it was down",
          "data-validation (run now, as at 01:00, and every 30 s while the store is stale) or health-monitor; "
          "a recovery that finds the exchange still down tells L2, the next one backfills",
          ("stale-data",), 15),
    Drill("data-gap", 2, "Stale data: gap, throttled",
          "a run of H1 candles deleted inside the continuity window, and the simulator answering 429 "
          "(Retry-After) to the next requests",
          "data-validation (run now) or health-monitor: continuity", ("stale-data",), 15),
    Drill("db-corrupt", 3, "Database corruption",
          "a page of the live database file overwritten (the WAL folded in first; a good backup taken "
          "first when there is none)",
          "integrity-check/quick (run now, as every hour) or health-monitor: quick_check",
          ("db-corruption",), 30),
    Drill("crash-loop", 5, "Persistent failures: rollback",
          "the backtest daemon restarted with CRYPTO_AGENT_DAEMON_FAULT=crash-after:N, three times in a row "
          "(each crash recovered by recover-daemon-crash)",
          "health-monitor reports each crash; the threshold automation crypto-agent/persistent-failures "
          "(3 crashes in 24 h)", ("persistent-failures",), 60),
)}


def drill(name: str) -> Drill:
    """The drill called `name`; InputError naming them all otherwise."""
    try:
        return DRILLS[name]
    except KeyError:
        raise InputError(f"unknown chaos scenario {name!r}",
                         hint=f"use one of: {', '.join(DRILLS)}, or all") from None


@dataclass(frozen=True)
class Injection:
    """A fault put in place: when, and what was done, in one line for the timeline."""

    at: float  # epoch seconds
    what: str
    pid: int | None = None


# --- services ---


def signal_service(settings: Settings, service: str, sig: signal.Signals) -> Injection:
    """Send `sig` to our live service (ownership record checked; psutil re-checks the create time as it sends).

    NotOurProcess when the pidfile names another process, ServiceNotRunning when nothing runs; nothing is sent then.
    """
    spec = process.service_spec(service, settings)
    proc = process.owned_process(spec)
    proc.send_signal(sig)
    return Injection(time.time(), f"{sig.name} sent to the {service} service, PID {proc.pid} "
                     f"(ours: checked against {spec.pid_record.name})", proc.pid)


def continue_if_stopped(settings: Settings, service: str) -> bool:
    """SIGCONT our service when it is stopped (the cleanup of a hang drill that was not recovered); True if sent."""
    try:
        proc = process.owned_process(process.service_spec(service, settings))
        if proc.status() != psutil.STATUS_STOPPED:
            return False
        proc.send_signal(signal.SIGCONT)
        return True
    except (CryptoAgentError, psutil.Error):
        return False


def restart_with_fault(settings: Settings, service: str, fault: str) -> Injection:
    """Restart our service (SIGTERM, then start) with CRYPTO_AGENT_DAEMON_FAULT=fault; ConfigError for a bad fault."""
    parse_fault(fault)
    spec = process.service_spec(service, settings)
    stopped, started = process.restart(spec, settings, env={FAULT_ENV: fault})
    before = f"stopped PID {stopped.pid} with {stopped.signal}, " if stopped.was_running else ""
    return Injection(time.time(), f"{service} restarted with {FAULT_ENV}={fault}: {before}started PID "
                     f"{started.pid}", started.pid)


def restart_clean(settings: Settings, service: str) -> str:
    """Restart our service without any injected fault (the cleanup of a drill that was not recovered)."""
    spec = process.service_spec(service, settings)
    stopped, started = process.restart(spec, settings, env=dict(recovery.CLEAN_START_ENV))
    return f"{service} restarted without the fault: PID {started.pid}" + (
        f" (PID {stopped.pid} stopped with {stopped.signal})" if stopped.was_running else "")


def fault_of(settings: Settings, service: str) -> str | None:
    """The fault our running service was started with (from its environment), None without one or when not running."""
    try:
        proc = process.owned_process(process.service_spec(service, settings))
        return proc.environ().get(FAULT_ENV) or None
    except (CryptoAgentError, psutil.Error):
        return None


def resume_service(settings: Settings, service: str) -> str:
    """Lift a pause (the backtest after a rollback) and start the service when it does not run; what was done."""
    spec = process.service_spec(service, settings)
    was = recovery.resume_kept(service, settings)
    said = "not paused" if was is None else f"pause lifted (paused by {was.get('by', '?')})"
    if process.inspect(spec).alive:
        return f"{service}: {said}; already running"
    started = process.start(spec, settings, env=dict(recovery.CLEAN_START_ENV))
    return f"{service}: {said}; started PID {started.pid}"


# --- the simulator's fault API ---


@dataclass(frozen=True)
class SimulatorControl:
    """The bundled exchange simulator's control plane (/_sim/), local only."""

    base_url: str

    @classmethod
    def of(cls, settings: Settings) -> SimulatorControl:
        """The simulator the settings' exchange_url points at; ChaosError when it is not a local one."""
        url = settings.exchange_url.rstrip("/")
        if urlsplit(url).hostname not in LOCAL_HOSTS:
            raise ChaosError(
                f"exchange_url {url} is not the bundled simulator on this machine: its faults cannot be injected",
                hint="run the exchange drills on the stack `crypto-agent up` starts (exchange on 127.0.0.1)",
            )
        return cls(url)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = httpx.request(method, f"{self.base_url}{path}", json=body, timeout=SIM_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise ChaosError(f"the simulator at {self.base_url} does not answer {method} {path}: {exc}",
                             hint="is the stack up? `crypto-agent up`") from None
        if resp.status_code != 200:
            raise ChaosError(f"the simulator refused {method} {path}: HTTP {resp.status_code} {resp.text[:200]}",
                             hint="its log is logs/simulator.log")
        return resp.json()

    def faults(self) -> dict[str, Any]:
        """The faults in force."""
        return self._call("GET", "/_sim/faults")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge fault settings (down, slow_s, storm_429, retry_after_s, ban_418_s, malformed, gaps)."""
        return self._call("POST", "/_sim/faults", faults)

    def down_503(self, for_s: float) -> dict[str, Any]:
        """Answer 503 to every market request for `for_s` seconds, then serve again by itself."""
        return self._call("POST", "/_sim/down", {"mode": "503", "for_s": for_s})

    def heal(self) -> None:
        """Serve again, without any fault."""
        self._call("POST", "/_sim/up")
        self._call("DELETE", "/_sim/faults")


# --- the store ---


def _writable_store(settings: Settings) -> Store:
    """The live store for a drill's damage; ChaosError when it is missing or a recovery holds it."""
    if not Path(settings.db_path).is_file():
        raise ChaosError(f"no database at {settings.db_path}", hint="bring the stack up first: `crypto-agent up`")
    if backup.lock_path(settings.db_path).exists():
        raise ChaosError(f"{backup.lock_path(settings.db_path)} exists: a recovery holds the store",
                         hint="wait until it ends (`crypto-agent incidents --open`), then drill again")
    return Store(settings.database_url, create=False)


def stale_symbols(settings: Settings, share: float = 0.1) -> list[str]:
    """The symbols a staleness drill damages: the first tenth of the universe, at least one."""
    return list(settings.symbols[: max(1, math.ceil(len(settings.symbols) * share))])


def delete_newest_candles(settings: Settings, symbols: list[str], timeframe_name: str, hours: float,
                          now: float | None = None) -> Injection:
    """Delete the candles of the last `hours` of `symbols` in one timeframe (the collector "missed" them)."""
    tf = timeframe(timeframe_name)
    since_ms = int(((time.time() if now is None else now) - hours * 3600) * 1000)
    table = metadata.tables[tf.table]
    with _writable_store(settings) as store, store.engine.begin() as conn:
        gone = conn.execute(delete(table).where(table.c.symbol.in_(symbols), table.c.timestamp >= since_ms)).rowcount
    return Injection(time.time(), f"deleted the newest {hours:g} h of {timeframe_name} candles of "
                     f"{', '.join(symbols)} ({gone} candles)")


def punch_gap(settings: Settings, symbol: str, timeframe_name: str, candles: int, hours_ago: float,
              now: float | None = None) -> Injection:
    """Delete `candles` consecutive candles of one series, starting `hours_ago` back (a hole for the continuity check)."""
    tf = timeframe(timeframe_name)
    start_ms = (int(((time.time() if now is None else now) - hours_ago * 3600) * 1000) // tf.ms) * tf.ms
    end_ms = start_ms + candles * tf.ms
    table = metadata.tables[tf.table]
    with _writable_store(settings) as store, store.engine.begin() as conn:
        gone = conn.execute(delete(table).where(table.c.symbol == symbol, table.c.timestamp >= start_ms,
                                                table.c.timestamp < end_ms)).rowcount
    first = datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    return Injection(time.time(), f"deleted {gone} consecutive {timeframe_name} candles of {symbol} from "
                     f"{first} UTC (continuity allows {settings.max_gap_candles})")


@dataclass(frozen=True)
class BackupReady:
    """The backup a recovery will find: its name and whether the drill had to take it."""

    name: str
    created: bool
    note: str


def ensure_backup(settings: Settings, hours_ago: float = 0.0, now: datetime | None = None) -> BackupReady:
    """Make sure a good backup of `hours_ago` (or older) exists, taking one of the live store when none does.

    With hours_ago > 0 a fresh stack has no such history, so the backup taken now is dated that far
    back (its file name and manifest): the rollback then finds "the 48 h backup" it needs.
    """
    now = now or datetime.now(UTC)
    try:
        found = backup.backup_for_hours_ago(settings.backup_dir, hours_ago, now=now)
        return BackupReady(found.name, False, f"a good backup exists: {found.name}")
    except backup.NoGoodBackup:
        pass
    dated = now - timedelta(hours=hours_ago)
    info = backup.create(settings.db_path, settings.backup_dir, now=dated)
    note = f"no good backup of {hours_ago:g} h ago: took {info.name}" if hours_ago else \
        f"no good backup: took {info.name}"
    if hours_ago:
        note += f" (today's data, dated {hours_ago:g} h back so the rollback has one)"
    return BackupReady(info.name, True, note)


def corrupt_page(settings: Settings, table: str = "ohlcv_h1") -> Injection:
    """Overwrite the start of one leaf page of `table` in the live database file, after folding the WAL in.

    ChaosError when the damage does not show in quick_check (it never should).
    """
    db = Path(settings.db_path)
    _writable_store(settings).close()
    conn = sqlite3.connect(db, timeout=CHECKPOINT_BUSY_MS / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        try:
            row = conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno "
                               "LIMIT 1 OFFSET 1", (table,)).fetchone()
        except sqlite3.OperationalError:  # SQLite built without dbstat: the table's root page will do
            row = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    finally:
        conn.close()
    if row is None:
        raise ChaosError(f"table {table} has no page to damage in {db}", hint="is the store filled? `crypto-agent up`")
    page = int(row[0])
    with db.open("r+b") as f:
        f.seek((page - 1) * page_size)
        # a garbage b-tree page header and cell pointers: SQLite can no longer read the page
        f.write(b"\x0d\x00\x00\x00\x10" + b"\xff" * 300)
        f.flush()
        os.fsync(f.fileno())
    check = check_integrity(db)
    if check.ok:
        raise ChaosError(f"page {page} of {db} was overwritten but quick_check still passes "
                         f"(checkpoint busy={busy}: the page may live in the WAL)",
                         hint="run the drill again when the services are idle")
    return Injection(time.time(), f"page {page} ({table}, {page_size} bytes) of {db.name} overwritten; "
                     f"quick_check now says: {check.problems[0][:120]}")


# --- what a drill follows and checks ---


def incidents_since(settings: Settings, since: float, scenarios: tuple[str, ...] | None = None,
                    resource: str | None = None) -> list[Incident]:
    """Incidents opened at or after `since` (epoch s), oldest first, of these scenarios and resource when given."""
    path = incidents.incidents_db_path(settings)
    if not path.exists():
        return []
    with incidents.open_incident_store(settings) as log:
        found = incidents.list_incidents(log, limit=500)
    since_ms = int(since * 1000)
    return sorted((i for i in found if i.opened_at >= since_ms
                   and (scenarios is None or i.scenario in scenarios)
                   and (resource is None or i.resource == resource)), key=lambda i: (i.opened_at, i.id))


def incident(settings: Settings, incident_id: int) -> Incident:
    """One incident of the log."""
    with incidents.open_incident_store(settings) as log:
        return incidents.get(log, incident_id)


def open_incident_list(settings: Settings) -> list[Incident]:
    """The incidents a recovery is still working on."""
    if not incidents.incidents_db_path(settings).exists():
        return []
    with incidents.open_incident_store(settings) as log:
        return incidents.list_incidents(log, open_only=True)


@dataclass(frozen=True)
class Verification:
    """Whether the stack is back: every check, passed or not, in one line each."""

    ok: bool
    passed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """The passed checks, or the problems."""
        return "; ".join(self.passed if self.ok else self.problems)


def verify(settings: Settings, paused: tuple[str, ...] = ()) -> Verification:
    """The stack is verified when every service is HEALTHY (or paused, for those in `paused`), the store is not
    locked, quick_check and the data checks pass and no incident is open."""
    passed: list[str] = []
    problems: list[str] = []
    for service in (TRADER, DAEMON):
        spec = process.service_spec(service, settings)
        if service in paused:
            held = process.paused(spec)
            alive = process.inspect(spec).alive
            if held is not None and not alive:
                passed.append(f"{service} paused ({held.get('by', '?')})")
            else:
                problems.append(f"{service} should stay paused, but it is "
                                f"{'running' if alive else 'not paused'}")
            continue
        held = process.paused(spec)
        if held is not None and not process.inspect(spec).alive:
            problems.append(f"{service} is paused (by {held.get('by', '?')}): resume it with "
                            f"`crypto-agent service resume {service}`")
            continue
        report = health.probe(spec, settings)
        (passed if report.healthy else problems).append(f"{service} {report.summary}")
    lock = backup.lock_path(settings.db_path)
    if lock.exists():
        problems.append(f"{lock} exists (a recovery holds the store)")
    else:
        check = check_integrity(settings.db_path)
        (passed if check.ok else problems).append(
            f"{check.mode} ok" if check.ok else f"{check.mode}: {'; '.join(check.problems[:2])}")
        if check.ok:
            try:
                with Store(settings.database_url, create=False) as store:
                    quality = check_data(store, settings)
                (passed if quality.ok else problems).append(
                    "data checks pass" if quality.ok else "data checks: " + "; ".join(quality.reasons[:2]))
            except CryptoAgentError as exc:
                problems.append(f"data checks: {exc.message}")
    still_open = open_incident_list(settings)
    if still_open:
        problems.append("incident(s) open: " + ", ".join(f"#{i.id} {i.scenario}" for i in still_open))
    return Verification(not problems, passed, problems)


# --- the result of a drill ---


@dataclass
class DrillResult:
    """A drill's timeline (epoch seconds) and outcome; MTTR runs from the runbook's symptom to verified."""

    drill: Drill
    injected_at: float | None = None
    symptom_at: float | None = None  # when the runbook's symptom holds (the CPU spike: after cpu_spike_minutes)
    detected_at: float | None = None
    recovered_at: float | None = None
    verified_at: float | None = None
    incident_id: int | None = None  # the first incident the fault opened
    incident_ids: list[int] = field(default_factory=list)  # every incident of the drill's recovery, in order
    error: str | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Recovered and verified."""
        return self.error is None and self.verified_at is not None

    @property
    def mttr_s(self) -> float | None:
        """From the symptom (the fault, for every drill but the CPU spike) to verified recovery."""
        start = self.symptom_at if self.symptom_at is not None else self.injected_at
        if start is None or self.verified_at is None:
            return None
        return max(0.0, self.verified_at - start)

    def after(self, at: float | None) -> float | None:
        """Seconds from the injection to `at`."""
        return None if at is None or self.injected_at is None else at - self.injected_at


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def mttr_table(results: list[DrillResult]) -> list[str]:
    """The MTTR of every drill against the runbook's ETA, one line each, with a header."""
    lines = [f"{'scenario':<15} {'runbook':<33} {'detected':>9} {'recovered':>10} {'MTTR':>9} {'ETA':>7}  verdict"]
    for r in results:
        d = r.drill
        if not r.ok:
            verdict = "NOT RECOVERED"
        elif r.mttr_s is not None and r.mttr_s <= d.eta_s:
            verdict = "within ETA"
        else:
            verdict = "OVER ETA"
        lines.append(f"{d.name:<15} {f'{d.runbook}. {d.title}':<33} {_duration(r.after(r.detected_at)):>9} "
                     f"{_duration(r.after(r.recovered_at)):>10} {_duration(r.mttr_s):>9} {d.eta_min:>5g} m  {verdict}")
    return lines
