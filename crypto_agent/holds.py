"""Holds: a service kept stopped or paused on purpose, so monitoring does not take it for a failure.

A hold is the service's hold marker (`run/<name>.paused`, `ServicePaths.hold_marker`): the one
file that says "leave it as it is". This module is its only writer and `read_hold` its only reader,
honoured by process control (`start` refuses a service with a hold in force), by the recoveries
(they do not restart it), by monitoring (the health monitor emits no dead or hung event for it; the
heartbeat relay vouches for it, so no automation restarts it) and by the backtest-window guard. A
rollback or `crypto-agent service pause` keeps a service stopped until a person resumes it
(`crypto-agent service resume`).

There are two kinds of hold:

- "stopped": no instance runs (the rollback's, an operator's, the window guard's stop);
- "paused": a live instance stopped with SIGSTOP by the backtest-window guard; the marker names
  that instance, and covers it alone, never a successor or a dead process.

A hold with `until` ends by itself then (the guard's end with the backtest window); one without
lasts until it is released.
"""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.service import ServicePaths, service_paths, write_atomic
from crypto_agent.settings import Settings

if TYPE_CHECKING:
    from crypto_agent.process import ProcessCheck

HOLD_PAUSED = "paused"
HOLD_STOPPED = "stopped"
HOLD_KINDS = (HOLD_PAUSED, HOLD_STOPPED)
STAMP = "%Y-%m-%dT%H:%M:%SZ"  # the hold marker's time format


class ServicePaused(CryptoAgentError):
    """The service has a hold in force (`run/<name>.paused`); nothing starts it until it ends or a person resumes it."""


@dataclass(frozen=True)
class Hold:
    """Why a service is kept paused or stopped, by whom, since and until when (epoch seconds)."""

    service: str
    kind: str
    by: str
    reason: str
    since: float | None = None
    until: float | None = None
    instance: str | None = None  # "<pid>@<create time>" of the paused process (kind "paused")

    def in_force(self, now: float | None = None) -> bool:
        """Whether the hold has not ended yet."""
        return self.until is None or (time.time() if now is None else now) < self.until

    def covers(self, check: ProcessCheck) -> bool:
        """Whether the hold accounts for what process control sees: our paused instance, or no instance at all."""
        if self.kind == HOLD_PAUSED:
            return check.alive and check.record is not None and check.record.instance == self.instance
        return not check.alive

    @property
    def description(self) -> str:
        """One line for people: `paused by backtest-window-guard until 2026-01-02 01:30 UTC: CPU 45% > 30%`."""
        until = "" if self.until is None else f" until {_stamp(self.until)[:-4].replace('T', ' ')} UTC"
        return f"{self.kind} by {self.by}{until}: {self.reason or 'no reason given'}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def marker(self) -> dict[str, Any]:
        """The hold as its marker file says it: service, reason, by, since, kind, and until/instance when set."""
        data: dict[str, Any] = {"service": self.service, "reason": self.reason, "by": self.by,
                                "since": _stamp(self.since or 0), "kind": self.kind}
        if self.until is not None:
            data["until"] = _stamp(self.until)
        if self.instance is not None:
            data["instance"] = self.instance
        return data


def _stamp(epoch: float) -> str:
    return time.strftime(STAMP, time.gmtime(epoch))


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(calendar.timegm(time.strptime(str(value), STAMP)))
    except ValueError:
        try:
            return datetime.fromisoformat(str(value)).astimezone(UTC).timestamp()
        except ValueError:
            return None


def _paths(service: str | ServicePaths, settings: Settings | None) -> ServicePaths:
    return service if isinstance(service, ServicePaths) else service_paths(service, settings)


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        text = marker.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {"reason": text.strip()[:200]}
    return data if isinstance(data, dict) else {}


def place_hold(
    service: str | ServicePaths,
    settings: Settings | None = None,
    *,
    kind: str,
    by: str,
    reason: str,
    until: float | None = None,
    instance: str | None = None,
    now: float | None = None,
) -> Hold:
    """Write (or replace) the hold marker of a service; InputError for a bad kind or service, or a nameless hold."""
    if kind not in HOLD_KINDS:
        raise InputError(f"unknown hold kind {kind!r}", hint=f"use one of: {', '.join(HOLD_KINDS)}")
    if kind == HOLD_PAUSED and not instance:
        raise InputError("a paused hold must name the paused process instance",
                         hint="pass instance=<pid>@<create time>")
    if not by.strip():
        raise InputError("a hold must say who placed it", hint="pass by=<flow or operator name>")
    paths = _paths(service, settings)
    hold = Hold(paths.name, kind, by.strip(), reason, time.time() if now is None else now, until, instance)
    paths.hold_marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.hold_marker, json.dumps(hold.marker()) + "\n")
    return hold


def read_hold(
    service: str | ServicePaths, settings: Settings | None = None, now: float | None = None,
    *, include_ended: bool = False,
) -> Hold | None:
    """The hold on a service (its marker), or None: no marker, or one whose `until` has passed.

    The one reader of the marker. With include_ended, an ended hold is returned too (to undo what
    it did). A marker without a kind (older, or written by hand) is a "stopped" hold; an unreadable
    one still holds.
    """
    paths = _paths(service, settings)
    data = _read_marker(paths.hold_marker)
    if data is None:
        return None
    kind = data.get("kind") if data.get("kind") in HOLD_KINDS else HOLD_STOPPED
    hold = Hold(
        service=paths.name,
        kind=str(kind),
        by=str(data.get("by") or "unknown"),
        reason=str(data.get("reason") or ""),
        since=_epoch(data.get("since")),
        until=_epoch(data.get("until")),
        instance=None if data.get("instance") is None else str(data["instance"]),
    )
    if not include_ended and not hold.in_force(now):
        return None
    return hold


def release_hold(service: str | ServicePaths, settings: Settings | None = None, by: str | None = None) -> Hold | None:
    """Remove the hold of a service, ended or not (only one placed by `by`, when given); the hold removed, or None."""
    paths = _paths(service, settings)
    hold = read_hold(paths, include_ended=True)
    if hold is None or (by is not None and hold.by != by):
        return None
    paths.hold_marker.unlink(missing_ok=True)
    return hold


def keep_stopped(service: str | ServicePaths, settings: Settings | None = None, *, by: str, reason: str) -> Path:
    """Keep a service stopped until a person resumes it: a stopped hold without end; its marker's path."""
    paths = _paths(service, settings)
    place_hold(paths, kind=HOLD_STOPPED, by=by, reason=reason)
    return paths.hold_marker


def covering_hold(service: str | ServicePaths, settings: Settings | None, check: ProcessCheck,
                  now: float | None = None) -> Hold | None:
    """The hold in force that accounts for what process control sees (`check`), or None."""
    hold = read_hold(service, settings, now)
    return hold if hold is not None and hold.covers(check) else None


def refuse_start(paths: ServicePaths, now: float | None = None) -> None:
    """ServicePaused when the service has a hold in force (so nothing starts it); nothing otherwise."""
    hold = read_hold(paths, now=now)
    if hold is None:
        return
    since = "unknown" if hold.since is None else _stamp(hold.since)
    raise ServicePaused(
        f"the {paths.name} service is paused ({hold.reason or 'no reason given'}, by "
        f"{hold.by} since {since}); it was not started",
        hint=f"a person resumes it with `crypto-agent service resume {paths.name}`",
    )
