"""The watchdog outside Prefect: is the Prefect API up, do the serving process and the relay live, does the
monitor still tick? When not, L2 is told straight through the escalation webhook, no Prefect needed.

Made for cron or a systemd timer: `run_checks()` looks (each check bounded in time), `decide_alert()`
says whether to post (a change of what fails, a recovery, or the same failure again after
`realert_s`: one page per problem, not one per minute), `post_alert()` posts the JSON message to
each webhook, and `save_state()` remembers what was told in run/watchdog.json.

The monitor's tick is a Prefect event only: nothing on disk records it. Each round of the health
monitor does write one probe sample per service (health.record), so the newest
`probe_samples.checked_at` stands in for the tick here.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from crypto_agent.process import Liveness, child_spec, inspect
from crypto_agent.service import write_atomic
from crypto_agent.settings import Settings

HTTP_TIMEOUT_S = 5.0
TICK_MAX_AGE_S = 660.0  # two 5-minute rounds of the health monitor and a minute of slack
REALERT_S = 4 * 3600.0  # the same unfixed problem is re-paged at most every 4 h
PARTS = ("serve", "relay", "keeper")
LEVEL = "l2"
STATE_FILE = "watchdog.json"


class CheckState(str, enum.Enum):
    """What one check found."""

    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Check:
    """One look: what was checked, UP or DOWN, and a sentence saying what was seen."""

    name: str
    state: CheckState
    detail: str

    @property
    def ok(self) -> bool:
        """Whether it is UP."""
        return self.state is CheckState.UP


@dataclass(frozen=True)
class WatchdogReport:
    """Every check of one run, and when it ran (epoch s)."""

    checks: tuple[Check, ...]
    at: float

    @property
    def healthy(self) -> bool:
        """Whether every check is UP."""
        return all(c.ok for c in self.checks)

    @property
    def failing(self) -> list[str]:
        """The names of the checks that are DOWN, sorted."""
        return sorted(c.name for c in self.checks if not c.ok)

    @property
    def message(self) -> str:
        """Lines for an operator: one per check."""
        return "\n".join(f"{c.name}: {c.state.value.upper()}: {c.detail}" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"at": self.at, "healthy": self.healthy, "failing": self.failing,
                "checks": [{"name": c.name, "state": c.state.value, "detail": c.detail} for c in self.checks]}


# --- the checks ---


def prefect_api_url(settings: Settings) -> str:
    """The Prefect API the stack uses: PREFECT_API_URL when set, else the local server on prefect_port."""
    return os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{settings.prefect_port}/api"


def check_prefect_api(api_url: str, timeout_s: float = HTTP_TIMEOUT_S) -> Check:
    """GET <api>/health: UP on a 200 within timeout_s, DOWN otherwise (with the status or the error)."""
    url = api_url.rstrip("/") + "/health"
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.TimeoutException:
        return Check("prefect-api", CheckState.DOWN, f"{url} did not answer within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return Check("prefect-api", CheckState.DOWN, f"{url} unreachable ({type(exc).__name__}: {exc})")
    if response.status_code != 200:
        return Check("prefect-api", CheckState.DOWN, f"{url} answered HTTP {response.status_code}")
    return Check("prefect-api", CheckState.UP, f"{url} answered 200")


def check_part(name: str, settings: Settings) -> Check:
    """Whether the stack's part `name` (serve, relay ...) runs: its run/<name>.pid and ownership record."""
    spec = child_spec(name, (), settings)
    found = inspect(spec)
    if found.alive:
        return Check(name, CheckState.UP, f"running, PID {found.pid}")
    if found.state is Liveness.FOREIGN:
        return Check(name, CheckState.DOWN, f"not running: its pidfile names another process ({found.reason})")
    return Check(name, CheckState.DOWN, f"not running ({found.reason})")


def newest_probe_sample(db_path: Path | str) -> float | None:
    """When the health monitor last recorded a probe sample (epoch s), None when it never did.

    Read-only; sqlite3.Error when the store cannot be read.
    """
    db = Path(db_path)
    if not db.is_file():
        raise sqlite3.OperationalError(f"{db} does not exist")
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=HTTP_TIMEOUT_S)
    try:
        newest = conn.execute("SELECT MAX(checked_at) FROM probe_samples").fetchone()[0]
    finally:
        conn.close()
    return None if newest is None else newest / 1000


def check_monitor_tick(db_path: Path | str, max_age_s: float = TICK_MAX_AGE_S, now: float | None = None) -> Check:
    """Whether the health monitor ran within max_age_s: the age of its newest probe sample (see the module doc)."""
    now = time.time() if now is None else now
    try:
        newest = newest_probe_sample(db_path)
    except sqlite3.Error as exc:
        return Check("monitor-tick", CheckState.DOWN, f"cannot read the monitor's samples in {db_path}: {exc}")
    if newest is None:
        return Check("monitor-tick", CheckState.DOWN, "the health monitor has recorded no round yet")
    age = now - newest
    if age > max_age_s:
        return Check("monitor-tick", CheckState.DOWN,
                     f"the health monitor's last round was {age:.0f} s ago (limit {max_age_s:g} s): "
                     "its schedule or the serving process is not running")
    return Check("monitor-tick", CheckState.UP, f"last round {max(age, 0):.0f} s ago")


def run_checks(
    settings: Settings,
    *,
    api_url: str | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
    parts: Sequence[str] = PARTS,
    tick_max_age_s: float = TICK_MAX_AGE_S,
    now: float | None = None,
) -> WatchdogReport:
    """Every check, in order: the Prefect API, each part's process, the monitor's tick."""
    now = time.time() if now is None else now
    checks = [check_prefect_api(api_url or prefect_api_url(settings), timeout_s)]
    checks += [check_part(name, settings) for name in parts]
    checks.append(check_monitor_tick(settings.db_path, tick_max_age_s, now))
    return WatchdogReport(tuple(checks), now)


# --- telling someone, once per problem ---


@dataclass(frozen=True)
class AlertDecision:
    """Whether to post, what kind of message (down or recovered), and why."""

    post: bool
    kind: str  # "down", "recovered" or "" (nothing to post)
    reason: str


def decide_alert(
    report: WatchdogReport, state: dict[str, Any] | None, *, realert_s: float = REALERT_S,
) -> AlertDecision:
    """Post when something newly fails, when what fails changes, on recovery, or the same again after realert_s."""
    told = sorted((state or {}).get("failing") or [])
    told_at = float((state or {}).get("told_at") or 0)
    failing = report.failing
    if not failing:
        if told:
            return AlertDecision(True, "recovered", f"recovered: {', '.join(told)} up again")
        return AlertDecision(False, "", "healthy")
    if failing != told:
        return AlertDecision(True, "down", f"down: {', '.join(failing)}")
    if report.at - told_at >= realert_s:
        hours = (report.at - told_at) / 3600
        return AlertDecision(True, "down", f"still down after {hours:.1f} h: {', '.join(failing)}")
    return AlertDecision(False, "", f"already told {report.at - told_at:.0f} s ago: {', '.join(failing)}")


def alert_payload(report: WatchdogReport, decision: AlertDecision, level: str = LEVEL) -> dict[str, Any]:
    """The JSON the escalation webhooks get (as blocks/register.py's receiver webhook sends it, Slack's `text` too)."""
    host = os.uname().nodename
    if decision.kind == "recovered":
        subject = f"[crypto-agent watchdog] {host}: {decision.reason}"
    else:
        subject = f"[crypto-agent watchdog] {host}: {', '.join(report.failing)} DOWN"
    body = (f"{report.message}\n\nSeen by `crypto-agent watchdog` outside Prefect at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(report.at))}. "
            + ("" if decision.kind == "recovered" else
               "Bring the stack back with `crypto-agent up` (or `systemctl restart` the failed units)."))
    return {"level": level, "subject": subject, "body": body, "text": f"{subject}\n{body}",
            "watchdog": report.to_dict()}


def webhook_urls(settings: Settings, level: str = LEVEL, extra: Sequence[str] = ()) -> list[str]:
    """Where to post: the local receiver's <receiver_url>/<level>, then any extra webhook URLs given."""
    return [f"{settings.receiver_url.rstrip('/')}/{level}", *extra]


@dataclass(frozen=True)
class Delivery:
    """One POST: to where (without its query, which may hold a token), and whether it was accepted."""

    url: str
    ok: bool
    detail: str


def _safe_url(url: str) -> str:
    """The URL without query or path beyond its first segment, for a log line (webhook paths hold secrets)."""
    parsed = httpx.URL(url)
    first = "/".join(parsed.path.split("/")[:2])
    return f"{parsed.scheme}://{parsed.host}{':' + str(parsed.port) if parsed.port else ''}{first}"


def post_alert(payload: dict[str, Any], urls: Sequence[str], timeout_s: float = HTTP_TIMEOUT_S) -> list[Delivery]:
    """POST the payload as JSON to each URL, each bounded by timeout_s; one Delivery per URL."""
    out: list[Delivery] = []
    for url in urls:
        try:
            response = httpx.post(url, json=payload, timeout=timeout_s)
        except httpx.HTTPError as exc:
            out.append(Delivery(_safe_url(url), False, f"{type(exc).__name__}: {exc}"))
            continue
        ok = 200 <= response.status_code < 300
        out.append(Delivery(_safe_url(url), ok, f"HTTP {response.status_code}"))
    return out


def state_path(settings: Settings) -> Path:
    """run/watchdog.json: what the watchdog last told, and when."""
    return Path(settings.run_dir) / STATE_FILE


def load_state(path: Path) -> dict[str, Any] | None:
    """The saved state, None when there is none or it is unreadable (then the next failure is told again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_state(path: Path, report: WatchdogReport, decision: AlertDecision, deliveries: Sequence[Delivery],
               previous: dict[str, Any] | None) -> dict[str, Any]:
    """Remember this run; what was told changes only when a post was accepted somewhere. The state written."""
    state: dict[str, Any] = dict(previous or {})
    state.update({"checked_at": report.at, "healthy": report.healthy, "seen_failing": report.failing})
    if decision.post and any(d.ok for d in deliveries):
        state.update({"failing": report.failing, "told_at": report.at, "told": decision.reason})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(state, sort_keys=True))
    return state


@dataclass
class WatchdogRun:
    """One run of the watchdog end to end: the report, the alert decision and the deliveries."""

    report: WatchdogReport
    decision: AlertDecision
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 healthy; 1 unhealthy; 3 unhealthy and the alert posted reached no webhook."""
        if self.report.healthy:
            return 0
        if self.deliveries and not any(d.ok for d in self.deliveries):
            return 3
        return 1


def watch(
    settings: Settings,
    *,
    api_url: str | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
    parts: Sequence[str] = PARTS,
    tick_max_age_s: float = TICK_MAX_AGE_S,
    realert_s: float = REALERT_S,
    webhooks: Sequence[str] = (),
    alert: bool = True,
    now: float | None = None,
) -> WatchdogRun:
    """Check, decide, post to the local receiver's L2 and `webhooks` when due, and save the state."""
    report = run_checks(settings, api_url=api_url, timeout_s=timeout_s, parts=parts,
                        tick_max_age_s=tick_max_age_s, now=now)
    path = state_path(settings)
    previous = load_state(path)
    decision = decide_alert(report, previous, realert_s=realert_s)
    deliveries: list[Delivery] = []
    if alert and decision.post:
        deliveries = post_alert(alert_payload(report, decision), webhook_urls(settings, LEVEL, webhooks), timeout_s)
    if alert:
        save_state(path, report, decision, deliveries, previous)
    return WatchdogRun(report, decision, deliveries)
