"""Holds: a service kept stopped or paused on purpose, so monitoring does not take it for a failure.

A hold is the service's pause marker (`run/<name>.paused`, crypto_agent.process.pause): the one
file that says "leave it as it is", honoured by process control (`start` refuses a paused service),
by the recoveries (they do not restart it) and by monitoring (the health monitor emits no dead or
hung event for it; the heartbeat relay vouches for it, so no automation restarts it). A rollback
writes one so the backtest stays stopped until a person resumes it (`crypto-agent service resume`).

This module reads that marker as a `Hold` and writes two richer kinds of it:

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
from typing import Any

from crypto_agent.errors import InputError
from crypto_agent.process import ProcessCheck, pause_marker, paused, service_spec
from crypto_agent.service import write_atomic
from crypto_agent.settings import Settings

HOLD_PAUSED = "paused"
HOLD_STOPPED = "stopped"
HOLD_KINDS = (HOLD_PAUSED, HOLD_STOPPED)
STAMP = "%Y-%m-%dT%H:%M:%SZ"  # the pause marker's time format


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


def place_hold(
    service: str,
    settings: Settings,
    *,
    kind: str,
    by: str,
    reason: str,
    until: float | None = None,
    instance: str | None = None,
    now: float | None = None,
) -> Hold:
    """Write (or replace) the pause marker of a service as a hold; InputError for a bad kind or a nameless one."""
    if kind not in HOLD_KINDS:
        raise InputError(f"unknown hold kind {kind!r}", hint=f"use one of: {', '.join(HOLD_KINDS)}")
    if kind == HOLD_PAUSED and not instance:
        raise InputError("a paused hold must name the paused process instance", hint="pass instance=<pid>@<create time>")
    if not by.strip():
        raise InputError("a hold must say who placed it", hint="pass by=<flow or operator name>")
    hold = Hold(service, kind, by.strip(), reason, time.time() if now is None else now, until, instance)
    marker = pause_marker(service_spec(service, settings))
    marker.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"service": service, "reason": reason, "by": hold.by, "since": _stamp(hold.since or 0),
                            "kind": kind}
    if until is not None:
        data["until"] = _stamp(until)
    if instance is not None:
        data["instance"] = instance
    write_atomic(marker, json.dumps(data) + "\n")
    return hold


def read_hold(
    service: str, settings: Settings, now: float | None = None, *, include_ended: bool = False
) -> Hold | None:
    """The hold on a service (its pause marker), or None: no marker, or one whose `until` has passed.

    With include_ended, an ended hold is returned too (to undo what it did). A marker written by
    `crypto-agent service pause` or a rollback is a "stopped" hold without an end.
    """
    data = paused(service_spec(service, settings))
    if data is None:
        return None
    kind = data.get("kind") if data.get("kind") in HOLD_KINDS else HOLD_STOPPED
    hold = Hold(
        service=service,
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


def release_hold(service: str, settings: Settings, by: str | None = None) -> Hold | None:
    """Remove the hold of a service (only one placed by `by`, when given); the hold removed, or None."""
    hold = read_hold(service, settings, include_ended=True)
    if hold is None or (by is not None and hold.by != by):
        return None
    pause_marker(service_spec(service, settings)).unlink(missing_ok=True)
    return hold
