"""Who is told what, and when again: the decisions behind "every detection reaches someone, with an action".

No Prefect here: the flows (health-monitor, job-watch) act on what these return.

- Episodes: a condition that lasts (log errors over the limit, backtest results stale) is told once when it
  starts and again at most every `page_repeat_after_s` while it lasts, remembered durably in the incident
  log's file (`alert_episodes`), so a restart of the monitor or a restore of the store does not re-page.
  `episode_step` claims the page atomically: two monitors never both page the same episode.
- `log_errors_alert`: a service logging more errors a minute than the limit -> L1, with the last error lines
  (secrets masked by `redact`).
- `results_stale`: the backtest daemon running longer than `backtest_results_max_age_s` with no newer
  backtest_results row, and not idle on purpose (paused for live trading, paused by db/LOCKED, held).
- `job_alert`: a runbook job's run failed, crashed or late -> L1; the same deployment's previous run also
  failed, crashed or late -> L2 (it repeats), with the run's UI link. `late_wait_s` says how long a run that
  Prefect marked Late may still start before it counts as late by the runbook ("alert if > 5 min late").
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text, delete, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent.holds import Hold
from crypto_agent.service import STATE_PAUSED_LIVE_TRADING, STATE_PAUSED_LOCKED, STATE_STORE_CORRUPT
from crypto_agent.store import Store

# --- episodes, remembered in the incident log's file ---

alerts_metadata = MetaData()

alert_episodes = Table(
    "alert_episodes",
    alerts_metadata,
    Column("key", String(200), primary_key=True),  # e.g. "log-errors:backtest"
    Column("since", BigInteger, nullable=False),  # UTC ms: when the condition was first seen
    Column("last_paged_at", BigInteger),  # UTC ms: the last page of this episode, NULL before the first
    Column("pages", Integer, nullable=False),
    Column("detail", Text, nullable=False),
)


def ensure_episodes_table(store: Store) -> None:
    """Create the alert_episodes table in `store` (the incident log's file) when it is missing."""
    for attempt in range(5):
        try:
            alerts_metadata.create_all(store.engine)
            return
        except SQLAlchemyError as exc:  # two monitors creating it at once: the next pass sees it
            if "already exists" not in str(exc) or attempt == 4:
                raise


@dataclass(frozen=True)
class Episode:
    """A condition that lasts, as remembered: since when, when it was last paged, how many pages."""

    key: str
    since: float
    last_paged_at: float | None
    pages: int
    detail: str = ""


@dataclass(frozen=True)
class EpisodeStep:
    """What one look at a condition means: page now or not, and the episode (None once it ended)."""

    page: bool
    episode: Episode | None
    started: bool = False  # this look began the episode
    ended: bool = False  # the condition cleared: the episode was forgotten


def page_due(episode: Episode | None, now: float, repeat_after_s: float) -> bool:
    """Whether a lasting condition is paged now: the first time, then at most every `repeat_after_s`."""
    if episode is None or episode.last_paged_at is None:
        return True
    return now - episode.last_paged_at >= repeat_after_s


def _episode(store: Store, key: str) -> Episode | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(alert_episodes).where(alert_episodes.c.key == key)).first()
    if row is None:
        return None
    last = None if row.last_paged_at is None else row.last_paged_at / 1000
    return Episode(row.key, row.since / 1000, last, row.pages, row.detail)


def episode_step(
    store: Store, key: str, active: bool, *, repeat_after_s: float, now: float | None = None, detail: str = ""
) -> EpisodeStep:
    """Record one look at the condition `key` and say whether to page now.

    Active: the episode is started (when new) and the page claimed when `page_due`; the claim is one
    conditional UPDATE, so of two lookers only one pages. Not active: the episode ends (is forgotten), so
    the next occurrence is a new episode, paged at once.
    """
    now = time.time() if now is None else now
    now_ms = int(now * 1000)
    c = alert_episodes.c
    if not active:
        with store.engine.begin() as conn:
            gone = conn.execute(delete(alert_episodes).where(c.key == key)).rowcount
        return EpisodeStep(page=False, episode=None, ended=gone > 0)
    with store.engine.begin() as conn:
        started = conn.execute(
            sqlite_insert(alert_episodes)
            .values(key=key, since=now_ms, last_paged_at=None, pages=0, detail=detail[:2000])
            .on_conflict_do_nothing()
        ).rowcount > 0
        due_before = now_ms - int(repeat_after_s * 1000)
        claimed = conn.execute(
            update(alert_episodes)
            .where(c.key == key, (c.last_paged_at.is_(None)) | (c.last_paged_at <= due_before))
            .values(last_paged_at=now_ms, pages=c.pages + 1, detail=detail[:2000])
        ).rowcount > 0
    return EpisodeStep(page=claimed, episode=_episode(store, key), started=started)


def unclaim_page(store: Store, key: str, previous: float | None) -> None:
    """Give a claimed page back (it could not be delivered): the next look pages again."""
    c = alert_episodes.c
    value = None if previous is None else int(previous * 1000)
    with store.engine.begin() as conn:
        conn.execute(update(alert_episodes).where(c.key == key)
                     .values(last_paged_at=value, pages=c.pages - 1))


# --- what people are told ---


@dataclass(frozen=True)
class Alert:
    """A page: the level told, its subject and body, and the event payload of the detection."""

    key: str
    level: str
    subject: str
    body: str
    payload: dict[str, Any] = field(default_factory=dict)


# Secrets never reach a page: webhook URLs, credentials in URLs, key=value pairs that name a secret.
_SECRET_PATTERNS = (
    (re.compile(r"https://hooks\.slack\.com/\S+"), "https://hooks.slack.com/***"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1***:***@"),
    (re.compile(r"(?i)([?&](?:api[_-]?key|apikey|token|signature|secret|access[_-]?token)=)[^&\s]+"), r"\1***"),
    (re.compile(r"(?i)\b(api[_-]?key|secret|password|passwd|token|authorization|x-mbx-apikey)(\s*[=:]\s*)"
                r"(?:bearer\s+)?[\"']?[^\s\"',;]+"), r"\1\2***"),
)
MAX_LINE_CHARS = 300


def redact(line: str) -> str:
    """The line with secrets masked (webhook URLs, URL credentials, api keys, tokens, passwords), cut to 300."""
    for pattern, replacement in _SECRET_PATTERNS:
        line = pattern.sub(replacement, line)
    return line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 1] + "…"


def log_errors_key(service: str) -> str:
    """The episode of a service's log errors."""
    return f"log-errors:{service}"


def log_errors_alert(
    service: str,
    errors_per_min: float | None,
    limit: float,
    lines: Sequence[str],
    *,
    log_path: str = "",
    pid: int | None = None,
) -> Alert | None:
    """L1 with the last error lines when the service logs more than `limit` errors a minute; None otherwise."""
    if errors_per_min is None or errors_per_min <= limit:
        return None
    shown = [redact(line) for line in lines]
    subject = f"[crypto-agent] {service}: {errors_per_min:g} log errors/min > {limit:g}/min"
    body = "\n".join([
        (f"what happened: the {service} service (PID {pid if pid is not None else '?'}) logged "
         f"{errors_per_min:g} errors a minute over the last minute; the runbook's limit is {limit:g}"),
        f"log: {log_path or 'unknown'}",
        f"the last {len(shown)} error line(s):" if shown else "no error line could be read back",
        *[f"  {line}" for line in shown],
        (f"to do: read the log around these lines (`crypto-agent status --service {service}`); nothing is "
         "restarted for log errors alone. Told again at most every page_repeat_after_s while it lasts."),
    ])
    payload = {"service": service, "pid": pid, "log_errors_per_min": errors_per_min, "limit": limit,
               "lines": shown, "log": log_path}
    return Alert(log_errors_key(service), "l1", subject, body, payload)


# --- backtest results stale ---

IDLE_STATES = (STATE_PAUSED_LIVE_TRADING, STATE_PAUSED_LOCKED, STATE_STORE_CORRUPT)


def results_stale_key(service: str) -> str:
    """The episode of a service's stale backtest results."""
    return f"results-stale:{service}"


@dataclass(frozen=True)
class ResultsStale:
    """The daemon runs but wrote no backtest result for too long: why, and the figures."""

    reason: str
    newest_result_age_s: float | None
    running_s: float
    max_age_s: float

    def payload(self) -> dict[str, Any]:
        """The event payload's figures."""
        return {"reason": self.reason, "newest_result_age_s": self.newest_result_age_s,
                "running_s": round(self.running_s, 1), "max_age_s": self.max_age_s}


def results_stale(
    *,
    alive: bool,
    started_at: float | None,
    newest_result_at: float | None,
    heartbeat_state: str | None,
    hold: Hold | None,
    max_age_s: float,
    now: float | None = None,
) -> ResultsStale | None:
    """Whether the daemon's results are stale (runbook: "Backtest results stale > 2 h"); None when not.

    Only a live daemon running longer than `max_age_s` whose newest backtest_results row is older than that
    is stale. A dead one is the crash recovery's; one idle on purpose is not stale: paused for live trading,
    paused by db/LOCKED, reporting a corrupt store (the corruption recovery's), or held (crypto_agent.holds).
    """
    now = time.time() if now is None else now
    if not alive or started_at is None or hold is not None:
        return None
    if heartbeat_state is not None and heartbeat_state.startswith(IDLE_STATES):
        return None
    running_s = now - started_at
    if running_s <= max_age_s:
        return None
    age = None if newest_result_at is None else now - newest_result_at
    if age is not None and age <= max_age_s:
        return None
    hours = max_age_s / 3600
    if age is None:
        reason = f"no backtest result at all while the daemon has run {running_s / 3600:.1f} h (> {hours:g} h)"
    else:
        reason = (f"newest backtest result {age / 3600:.1f} h old (> {hours:g} h) while the daemon has run "
                  f"{running_s / 3600:.1f} h")
    return ResultsStale(reason, None if age is None else round(age, 1), running_s, max_age_s)


# --- runbook jobs: failed, crashed or late runs (job-watch) ---

JOB_FAILED = "Failed"
JOB_CRASHED = "Crashed"
JOB_LATE = "Late"
JOB_KINDS = (JOB_FAILED, JOB_CRASHED, JOB_LATE)
RUNBOOK_TAG = "runbook"
UNWATCHED_TAGS = ("recovery", "job-watch")  # recoveries page for themselves; job-watch never watches itself
FINAL_TYPES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@dataclass(frozen=True)
class JobRun:
    """One run of a runbook job, as job-watch sees it (read from the Prefect API by the flow)."""

    id: str
    name: str
    flow: str
    deployment: str | None  # "<flow>/<deployment>", None for a run made without a deployment
    tags: tuple[str, ...]
    state_type: str  # Prefect's StateType value: SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CRASHED ...
    state_name: str  # "Late", "Failed", "Crashed", "Scheduled" ...
    state_message: str | None = None
    expected_start: float | None = None  # epoch seconds
    link: str = ""

    @property
    def bad(self) -> str | None:
        """JOB_FAILED, JOB_CRASHED or JOB_LATE when the run is in that state, else None."""
        if self.state_type == "CRASHED":
            return JOB_CRASHED
        if self.state_type == "FAILED":
            return JOB_FAILED
        if self.state_name == JOB_LATE:
            return JOB_LATE
        return None

    @property
    def waiting(self) -> bool:
        """Whether the run has not started yet (scheduled, late or pending)."""
        return self.state_type in ("SCHEDULED", "PENDING")

    @property
    def has_outcome(self) -> bool:
        """Whether the run ended, or is late: what "twice in a row" compares."""
        return self.state_type in FINAL_TYPES or self.state_name == JOB_LATE


def watched(run: JobRun) -> bool:
    """Whether job-watch pages for this run: a deployment's run tagged `runbook`, not a recovery nor job-watch.

    The state hooks of flows/notify.py stay quiet for exactly these runs, so one failure is one page.
    """
    return watched_tags(run.deployment is not None, run.tags)


def watched_tags(has_deployment: bool, tags: Sequence[str]) -> bool:
    """`watched` from what a state hook knows: whether the run has a deployment, and its tags."""
    return has_deployment and RUNBOOK_TAG in tags and not any(t in tags for t in UNWATCHED_TAGS)


def previous_outcome(current: JobRun, runs: Sequence[JobRun]) -> JobRun | None:
    """The run of the same deployment just before `current` that has an outcome (ended, or late).

    Runs still scheduled, pending or running are skipped: "twice in a row" compares outcomes.
    """
    earlier = [
        r for r in runs
        if r.id != current.id and r.deployment == current.deployment and r.has_outcome
        and (current.expected_start is None or r.expected_start is None or r.expected_start < current.expected_start)
    ]
    earlier.sort(key=lambda r: r.expected_start or 0.0, reverse=True)
    return earlier[0] if earlier else None


def late_wait_s(run: JobRun, late_after_s: float, now: float | None = None) -> float:
    """How long a run Prefect marked Late may still start before it is late by the runbook (0: it is now)."""
    now = time.time() if now is None else now
    if run.expected_start is None:
        return 0.0
    return max(0.0, run.expected_start + late_after_s - now)


DATA_UPDATE_FLOWS = ("data-update", "data-update-deadline")  # the runbook's cell: L3 past the staleness limit


def job_alert(
    kind: str, run: JobRun, previous: JobRun | None, *, late_after_s: float, now: float | None = None,
    stale: str | None = None,
) -> Alert | None:
    """The page for a runbook job's run that failed, crashed or is late; None when nobody is to be told.

    None for a run job-watch does not watch, for a Late run that has started since (or is not yet
    `late_after_s` late). L1 the first time; L2 when the previous run of the same deployment also failed,
    crashed or was late (the job repeats its failure); L3 when it is the data-update and the store is past its
    staleness limit (`stale` says how: the runbook's "data-update misses the staleness limit").
    """
    now = time.time() if now is None else now
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job event kind {kind!r} (one of {', '.join(JOB_KINDS)})")
    if not watched(run):
        return None
    if kind == JOB_LATE:
        if not run.waiting or late_wait_s(run, late_after_s, now) > 0:
            return None
        late_s = now - (run.expected_start or now)
        what = (f"late: not started {late_s / 60:.0f} min after its slot (the runbook alerts after "
                f"{late_after_s / 60:g} min)")
    else:
        what = "crashed (its process died or was killed)" if kind == JOB_CRASHED else "failed"
    repeat = previous is not None and previous.bad is not None
    past_limit = stale if run.flow in DATA_UPDATE_FLOWS and stale else None
    level = "l3" if past_limit else "l2" if repeat else "l1"
    job = run.deployment or run.flow
    subject = f"[crypto-agent] runbook job {job} {kind.lower()}" + (
        f" again (previous run {previous.bad.lower()})" if repeat and previous is not None and previous.bad else ""
    ) + (": the data is past its staleness limit" if past_limit else "")
    lines = [
        f"what happened: run {run.name} of {job} {what}",
        f"state: {run.state_name}: {run.state_message or 'no message'}",
        f"details: {run.link or run.id}",
    ]
    if repeat and previous is not None:
        lines.append(f"it repeats: the previous run {previous.name} was {previous.state_name} "
                     f"({previous.state_message or 'no message'}): {previous.link or previous.id}")
        lines.append("to do (L2): the job fails twice in a row; find the cause in the two runs' logs "
                     "before its next slot")
    elif kind == JOB_LATE:
        lines.append("to do: is the worker or the serving process up (`crypto-agent watchdog`)? "
                     "The run starts as soon as one picks it up")
    else:
        lines.append(f"to do: read the run's logs; rerun it with `prefect deployment run '{job}'` once fixed")
    if past_limit:
        lines.append(f"to do (L3): the data-update missed the staleness limit ({past_limit}); backtests and live "
                     "trading run on stale candles until it completes")
    payload = {"flow_run_id": run.id, "flow_run": run.name, "deployment": run.deployment, "kind": kind,
               "level": level, "repeat": repeat, "previous_flow_run_id": previous.id if previous else None}
    return Alert(f"job:{job}:{run.id}:{kind}", level, subject, "\n".join(lines), payload)


# --- a runbook job that misses its day (issue 11): L2 ---

_DAILY_CRON = re.compile(r"^\s*(\d{1,2})\s+(\d{1,2})\s+\*\s+\*\s+\*\s*$")
MISSED_DAY_GRACE_S = 2 * 3600.0  # a daily job's run may come late (Late, retries): 26 h without one is a missed day


def is_daily(crons: Sequence[str]) -> bool:
    """Whether a deployment's schedules fire once a day (one cron "M H * * *"): the jobs that can miss their day."""
    return len(crons) == 1 and _DAILY_CRON.match(crons[0]) is not None


def missed_day(job: str, crons: Sequence[str], last_completed: float | None, created: float, now: float,
               grace_s: float = MISSED_DAY_GRACE_S) -> Alert | None:
    """The L2 page for a daily runbook job with no completed run in the last day plus `grace_s` (counted from the
    deployment's creation when it never completed), or None: not a daily job, or it completed in time."""
    if not is_daily(crons):
        return None
    since = last_completed if last_completed is not None else created
    silent_s = now - since
    if silent_s < 86400 + grace_s:
        return None
    last = "never" if last_completed is None else f"{silent_s / 3600:.1f} h ago"
    subject = f"[crypto-agent] runbook job {job} missed its day: no completed run for {silent_s / 3600:.0f} h"
    body = "\n".join([
        (f"what happened: the daily job {job} ({crons[0]} UTC) has not completed a run for {silent_s / 3600:.1f} h "
        f"(last completed: {last})"),
        ("to do (L2): is the serving process or worker up (`crypto-agent watchdog`)? Are its runs failing or "
        f"stuck (the UI, Runs, deployment {job})? Run it by hand with `prefect deployment run '{job}'` once fixed"),
    ])
    return Alert(f"job:{job}:missed-day", "l2", subject, body, {"deployment": job, "silent_s": round(silent_s)})
