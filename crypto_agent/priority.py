"""Live trading first: the backtest yields to the trader while the trader is DEAD, hung or over its budget.

A recovery of the trader asks the backtest daemon to yield by writing `run/backtest.yield` (JSON: who,
why, since, the incident id; written atomically). While the request exists the daemon finishes the unit
in progress, then pauses: no new backtests, no writes, still running and heart-beating with the state
`paused: live trading first` (service.STATE_PAUSED_LIVE_TRADING), so monitoring takes it for a
healthy, idle daemon. It resumes within about one heartbeat interval of the request going away.

This is not a hold (crypto_agent.holds, `run/<name>.paused`): a hold keeps a service stopped or
SIGSTOPped and process control refuses to start it; a yield is the daemon's own pause, like its pause
while `db/LOCKED` exists, and a restarted daemon honours it too.

The recovery releases the request when the trader is confirmed HEALTHY; a recovery that fails leaves
it, and the health monitor releases it once the trader is HEALTHY and the requesting incident is closed
(`should_release`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from crypto_agent.service import service_paths, write_atomic
from crypto_agent.settings import Settings

YIELDING_SERVICE = "backtest"  # the service that yields
FIRST_SERVICE = "trader"  # the service it yields to
STAMP = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Request:
    """A request that the backtest yields to live trading: who asked, why, since when, for which incident."""

    by: str
    reason: str
    since: float
    incident_id: int | None = None

    @property
    def since_iso(self) -> str:
        """`since` as UTC ISO 8601 (seconds)."""
        return datetime.fromtimestamp(self.since, UTC).strftime(STAMP)

    @property
    def description(self) -> str:
        """One line for people: `by recover-daemon-crash #12 since 2026-01-02T03:22:10Z: live trading first (...)`."""
        incident = f" (incident #{self.incident_id})" if self.incident_id is not None else ""
        return f"by {self.by} since {self.since_iso}{incident}: {self.reason or 'no reason given'}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what the marker holds, plus `since_iso`)."""
        return {**asdict(self), "since_iso": self.since_iso}


def yield_marker(settings: Settings) -> Path:
    """The request's marker file: run/backtest.yield, next to the daemon's pidfile."""
    return service_paths(YIELDING_SERVICE, settings).pidfile.with_name(f"{YIELDING_SERVICE}.yield")


def request_yield(
    settings: Settings, by: str, reason: str, incident_id: int | None = None, now: float | None = None
) -> Request:
    """Ask the backtest to yield to live trading (replacing an earlier request); the request written."""
    request = Request(by=by, reason=reason, since=time.time() if now is None else now, incident_id=incident_id)
    path = yield_marker(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(request.to_dict(), sort_keys=True) + "\n")
    return request


def release_yield(settings: Settings, by: str | None = None) -> Request | None:
    """Withdraw the request (only when `by` made it, if given); the request withdrawn, None when there was none."""
    request = yield_request(settings)
    path = yield_marker(settings)
    if request is None:
        path.unlink(missing_ok=True)  # an unreadable marker is no request: clear it
        return None
    if by is not None and request.by != by:
        return None
    path.unlink(missing_ok=True)
    return request


def yield_request(settings: Settings) -> Request | None:
    """The request in force, None when there is none (an unreadable marker counts as a request by "unknown")."""
    path = yield_marker(settings)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return Request(by="unknown", reason=f"{path} cannot be read", since=_mtime(path))
    return parse_request(text, fallback_since=_mtime(path))


def parse_request(text: str, fallback_since: float = 0.0) -> Request:
    """The request a marker's text says; a damaged marker still asks to yield (live trading first)."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return Request(by="unknown", reason="unreadable yield request", since=fallback_since)
    incident = data.get("incident_id")
    try:
        since = float(data.get("since", fallback_since))
    except (TypeError, ValueError):
        since = fallback_since
    return Request(
        by=str(data.get("by") or "unknown"),
        reason=str(data.get("reason") or ""),
        since=since,
        incident_id=int(incident) if isinstance(incident, int) or (isinstance(incident, str) and incident.isdigit())
        else None,
    )


def should_release(request: Request | None, trader_healthy: bool, incident_open: bool) -> bool:
    """Whether a request left behind can go: the trader is HEALTHY and the incident that asked is closed."""
    return request is not None and trader_healthy and not incident_open


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
