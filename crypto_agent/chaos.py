"""Chaos drills of the runbook's incidents, without Prefect: which fault each injects, what finds it, which
incidents count as its recovery, and the checks around them.

The faults themselves are crypto_agent.faults (the one catalogue: the e2e tests and the bench inject
the same); each drill's ETA is its runbook scenario's (crypto_agent.incidents.SCENARIOS, the one
table). `verify` says whether the stack is back: services HEALTHY, quick_check and the data checks
passing, no incident open. deployments/chaos.py runs the drills: it injects, lets (or makes) the
scheduled checks find the fault, follows the recovery the automations start, and prints the
timeline and the MTTR table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from crypto_agent import backup, health, holds, incidents, process, recovery
from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.faults import SERVICES
from crypto_agent.incidents import ESCALATED, RECOVERED, RESOLVED, Incident
from crypto_agent.quality import check_data
from crypto_agent.settings import Settings
from crypto_agent.store import Store, check_integrity
from crypto_agent.storelock import lock_path


@dataclass(frozen=True)
class Drill:
    """One chaos scenario: the runbook scenario it rehearses, what it injects, and which incident recovers it."""

    name: str
    scenario: str  # the crypto_agent.incidents scenario it rehearses: its runbook number and ETA
    title: str
    fault: str  # what is injected, in words
    detection: str  # what finds it
    incident_scenarios: tuple[str, ...]  # crypto_agent.incidents scenario names that count as its recovery

    @property
    def runbook(self) -> int:
        """The runbook's scenario number (1-5)."""
        return incidents.scenario(self.scenario).number

    @property
    def eta_s(self) -> float:
        """The runbook's Quick Reference ETA in seconds (crypto_agent.incidents.SCENARIOS)."""
        return incidents.scenario(self.scenario).eta_s

    @property
    def eta_min(self) -> float:
        """The runbook's ETA in minutes."""
        return self.eta_s / 60.0

    @property
    def line(self) -> str:
        """The drill in one line, for `crypto-agent chaos list`."""
        return f"{self.name:<14} runbook {self.runbook} ({self.title}, ETA {self.eta_min:g} min): {self.fault}"


DRILLS: dict[str, Drill] = {d.name: d for d in (
    Drill("daemon-killed", "daemon-crash", "Daemon crashed",
          "SIGKILL of the backtest daemon (our PID, after the ownership check), as the OOM killer would",
          "its heartbeat events stop: the proactive automation crypto-agent/heartbeat-missing",
          ("daemon-crash",)),
    Drill("daemon-hung", "process-hang", "Process hang",
          "SIGSTOP of the backtest daemon: alive, but no heartbeat and no work",
          "its heartbeat events stop: crypto-agent/heartbeat-missing, then the triage hands over to "
          "recover-process-hang", ("daemon-crash", "process-hang")),
    Drill("cpu-spike", "process-hang", "CPU spike",
          "the backtest daemon restarted with CRYPTO_AGENT_DAEMON_FAULT=burn-cpu (it spins, heart-beating)",
          "health-monitor: CPU over cpu_max_pct in every sample for cpu_spike_minutes (the drill runs the "
          "monitor as a fast cron)", ("process-hang",)),
    Drill("exchange-down", "stale-data", "Stale data: exchange down",
          "the simulator answers 503 for a while and the newest H1 candles of some symbols are gone, "
          "as if the collector had failed while it was down",
          "data-validation (run now, as at 01:00, and every 30 s while the store is stale) or health-monitor; "
          "a recovery that finds the exchange still down tells L2, the next one backfills",
          ("stale-data",)),
    Drill("data-gap", "stale-data", "Stale data: gap, throttled",
          "a run of H1 candles deleted inside the continuity window, and the simulator answering 429 "
          "(Retry-After) to the next requests",
          "data-validation (run now) or health-monitor: continuity", ("stale-data",)),
    Drill("db-corrupt", "db-corruption", "Database corruption",
          "a page of the live database file overwritten (the WAL folded in first; a good backup taken "
          "first when there is none)",
          "integrity-check/quick (run now, as every hour) or health-monitor: quick_check",
          ("db-corruption",)),
    Drill("crash-loop", "persistent-failures", "Persistent failures: rollback",
          "the backtest daemon restarted with CRYPTO_AGENT_DAEMON_FAULT=crash-after:N, three times in a row "
          "(each crash recovered by recover-daemon-crash)",
          "health-monitor reports each crash; the threshold automation crypto-agent/persistent-failures "
          "(3 crashes in 24 h)", ("persistent-failures",)),
)}


def drill(name: str) -> Drill:
    """The drill called `name`; InputError naming them all otherwise."""
    try:
        return DRILLS[name]
    except KeyError:
        raise InputError(f"unknown chaos scenario {name!r}",
                         hint=f"use one of: {', '.join(DRILLS)}, or all") from None


def stale_symbols(settings: Settings, share: float = 0.1) -> list[str]:
    """The symbols a staleness drill damages: the first tenth of the universe, at least one."""
    return list(settings.symbols[: max(1, math.ceil(len(settings.symbols) * share))])


def gap_symbol(settings: Settings) -> str:
    """The symbol the gap drill punches its hole in: the second of the universe (the first when alone)."""
    symbols = list(settings.symbols)
    return symbols[1] if len(symbols) > 1 else symbols[0]


def resume_service(settings: Settings, service: str) -> str:
    """Lift a pause (the backtest after a rollback) and start the service when it does not run; what was done."""
    spec = process.service_spec(service, settings)
    was = holds.release_hold(service, settings)
    said = "not paused" if was is None else f"pause lifted (paused by {was.by})"
    if process.inspect(spec).alive:
        return f"{service}: {said}; already running"
    started = process.start(spec, settings, env=dict(recovery.CLEAN_START_ENV))
    return f"{service}: {said}; started PID {started.pid}"


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


# --- what a drill follows and checks ---


def incidents_since(settings: Settings, since: float, scenarios: tuple[str, ...] | None = None,
                    resource: str | None = None) -> list[Incident]:
    """Incidents opened (or rejoined, a needs-person incident run again) at or after `since` (epoch s), oldest
    first, of these scenarios and resource when given."""
    path = incidents.incidents_db_path(settings)
    if not path.exists():
        return []
    with incidents.open_incident_store(settings) as log:
        found = incidents.list_incidents(log, limit=500)
    since_ms = int(since * 1000)
    def started(i: Incident) -> int:
        return max(i.opened_at, i.rejoined_at or 0)

    return sorted((i for i in found if started(i) >= since_ms
                   and (scenarios is None or i.scenario in scenarios)
                   and (resource is None or i.resource == resource)), key=lambda i: (started(i), i.id))


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


def counts_as(inc: Incident, escalation_ok: bool = False) -> str:
    """How a closed incident counts for its drill: "recovered" (resolved and recovered), "escalated" (told a level
    and closed, which a drill accepts only with escalation_ok: the exchange still down) or "failed"."""
    if inc.status == RESOLVED and inc.outcome == RECOVERED:
        return "recovered"
    return "escalated" if escalation_ok and inc.status == ESCALATED else "failed"


def clock(at: float) -> str:
    """An epoch time as HH:MM:SS UTC, for a timeline."""
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S")


def describe_trigger(settings: Settings, inc: Incident, threshold: str = "crypto-agent/persistent-failures") -> str:
    """What set an incident's recovery off, in words; `threshold` names the persistent-failures automation."""
    event = str(inc.trigger.get("event") or "")
    payload = inc.trigger.get("payload") or {}
    when = f" at {clock(inc.detected_at / 1000)}"
    if not event:
        return "a manual run (no event)"
    if event.endswith(".heartbeat"):
        return (f"no heartbeat event since {clock(inc.detected_at / 1000)} for {settings.heartbeat_missing_s:g} s "
                "(proactive automation crypto-agent/heartbeat-missing)")
    if event.endswith(".crashed"):
        return (f"{event}{when}: {settings.persistent_failures} crash events within "
                f"{settings.persistent_window_hours:g} h (threshold automation {threshold})")
    reasons = payload.get("reasons") or payload.get("problems") or []
    detail = f" ({'; '.join(str(r) for r in reasons[:2])})" if reasons else ""
    return f"{event}{when}{detail}"


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
    for service in SERVICES:
        spec = process.service_spec(service, settings)
        if service in paused:
            held = holds.read_hold(spec)
            alive = process.inspect(spec).alive
            if held is not None and not alive:
                passed.append(f"{service} paused ({held.by})")
            else:
                problems.append(f"{service} should stay paused, but it is "
                                f"{'running' if alive else 'not paused'}")
            continue
        held = holds.read_hold(spec)
        if held is not None and not process.inspect(spec).alive:
            problems.append(f"{service} is paused (by {held.by}): resume it with "
                            f"`crypto-agent service resume {service}`")
            continue
        report = health.probe(spec, settings)
        (passed if report.healthy else problems).append(f"{service} {report.summary}")
    lock = lock_path(settings.db_path)
    if lock.exists():
        problems.append(f"{lock} exists (a recovery holds the store)")
    else:
        check = check_integrity(settings.db_path)
        (passed if check.ok else problems).append(
            f"{check.mode} ok" if check.ok else f"{check.mode}: {'; '.join(check.problems[:2])}")
        if check.ok:
            try:
                with Store(settings.database_url or f"sqlite:///{settings.db_path}", create=False) as store:
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

    @property
    def verdict(self) -> str:
        """Against the runbook's ETA: within ETA, OVER ETA, or NOT RECOVERED."""
        if not self.ok:
            return "NOT RECOVERED"
        return "within ETA" if self.mttr_s is not None and self.mttr_s <= self.drill.eta_s else "OVER ETA"

    def after(self, at: float | None) -> float | None:
        """Seconds from the injection to `at`."""
        return None if at is None or self.injected_at is None else at - self.injected_at


def _duration(seconds: float | None) -> str:
    """Seconds, or minutes from 2 minutes on; "-" for none."""
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def mttr_table(results: list[DrillResult]) -> list[str]:
    """The MTTR of every drill against the runbook's ETA, one line each, with a header."""
    lines = [f"{'scenario':<15} {'runbook':<33} {'detected':>9} {'recovered':>10} {'MTTR':>9} {'ETA':>7}  verdict"]
    for r in results:
        d = r.drill
        lines.append(f"{d.name:<15} {f'{d.runbook}. {d.title}':<33} {_duration(r.after(r.detected_at)):>9} "
                     f"{_duration(r.after(r.recovered_at)):>10} {_duration(r.mttr_s):>9} {d.eta_min:>5g} m  "
                     f"{r.verdict}")
    return lines
