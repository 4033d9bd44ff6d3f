"""Silences, as Alertmanager has them: pages about a resource held back for a while (maintenance), the recoveries
still running; every page a silence held is listed in it and told once, in one message per level, after it ends.

Rows of the `silences` table in the incident log's file. A silence matches a resource by its id
(`crypto-agent.service.paper-trader`), a glob of ids (`crypto-agent.service.*`), or a name that is one
of the id's parts (`trader`, `backtest`, `store`, `paper-trader`); an alert's key (`log-errors:backtest`)
matches the same way.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import func, insert, select, update

from crypto_agent.errors import InputError
from crypto_agent.incidents.log import iso
from crypto_agent.schema import silences
from crypto_agent.store import Store

MAX_HELD_SUBJECT = 300
MAX_DURATION_S = 30 * 86400.0  # a silence longer than a month is a switched-off alert: refuse it
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Silence:
    """One silence; times are UTC epoch milliseconds."""

    id: int
    pattern: str
    reason: str
    created_by: str
    starts_at: int
    ends_at: int
    held: list[dict[str, Any]] = field(default_factory=list)
    summarized_at: int | None = None

    def active(self, now_ms: int) -> bool:
        """Whether it holds pages at `now_ms`."""
        return self.starts_at <= now_ms < self.ends_at

    def matches(self, resource: str) -> bool:
        """Whether pages about `resource` (a Prefect resource id or an alert key) are its business."""
        return matches(self.pattern, resource)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ISO times."""
        return {"id": self.id, "pattern": self.pattern, "reason": self.reason, "created_by": self.created_by,
                "starts": iso(self.starts_at), "ends": iso(self.ends_at), "held": self.held,
                "summarized": iso(self.summarized_at)}


def matches(pattern: str, resource: str) -> bool:
    """A resource id or alert key against a silence's pattern: the id itself, a glob, or one of its parts."""
    pattern = pattern.strip()
    if not pattern or not resource:
        return False
    if fnmatchcase(resource, pattern):
        return True
    parts = set(re.split(r"[.:/]", resource))
    words = {w for p in parts for w in p.split("-")}
    return pattern in parts or pattern in words


def parse_duration(value: str) -> float:
    """'90s', '15m', '2h', '1d' (a bare number is seconds) -> seconds; InputError otherwise."""
    m = _DURATION_RE.match(value or "")
    if not m:
        raise InputError(f"cannot read the duration {value!r}", hint="write it as 90s, 15m, 2h or 1d")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not 0 < seconds <= MAX_DURATION_S:
        raise InputError(f"a silence of {value!r} is out of range",
                         hint="silence for more than 0 s and at most 30 days (30d)")
    return seconds


def _from_row(row: Any) -> Silence:
    m = row._mapping
    try:
        held = json.loads(m["held"] or "[]")
    except ValueError:
        held = []
    return Silence(id=int(m["id"]), pattern=m["pattern"], reason=m["reason"], created_by=m["created_by"],
                   starts_at=int(m["starts_at"]), ends_at=int(m["ends_at"]), held=held,
                   summarized_at=m["summarized_at"])


def _now_ms(now: float | None) -> int:
    return int((time.time() if now is None else now) * 1000)


def add(store: Store, pattern: str, duration_s: float, reason: str, by: str, now: float | None = None) -> Silence:
    """Start a silence of `pattern` for `duration_s` from now."""
    pattern, reason = pattern.strip(), reason.strip()
    if not pattern:
        raise InputError("a silence needs a resource",
                         hint="e.g. --resource trader, --resource 'crypto-agent.service.*'")
    if not reason:
        raise InputError("a silence needs a reason", hint="say why with --reason, e.g. --reason 'disk swap'")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise InputError(f"a silence of {duration_s:g} s is out of range", hint="at most 30 days")
    now_ms = _now_ms(now)
    with store.engine.begin() as conn:
        new_id = conn.execute(insert(silences).values(
            pattern=pattern[:200], reason=reason, created_by=by[:120], starts_at=now_ms,
            ends_at=now_ms + int(duration_s * 1000), held="[]")).inserted_primary_key
    if new_id is None:  # pragma: no cover (SQLite always returns the row id)
        raise InputError("the silence was not recorded", hint="check that the incident log is writable")
    return get(store, int(new_id[0]))


def get(store: Store, silence_id: int) -> Silence:
    """One silence; InputError when there is no such silence."""
    with store.engine.connect() as conn:
        row = conn.execute(select(silences).where(silences.c.id == int(silence_id))).first()
    if row is None:
        raise InputError(f"no silence #{silence_id}", hint="list them with `crypto-agent silence list`")
    return _from_row(row)


def list_silences(store: Store, *, active_only: bool = False, now: float | None = None) -> list[Silence]:
    """Silences, newest first (only those in force with active_only)."""
    q = select(silences).order_by(silences.c.id.desc())
    if active_only:
        now_ms = _now_ms(now)
        q = q.where(silences.c.starts_at <= now_ms, silences.c.ends_at > now_ms)
    with store.engine.connect() as conn:
        return [_from_row(r) for r in conn.execute(q)]


def expire(store: Store, silence_id: int, now: float | None = None) -> Silence:
    """End a silence now (the pages it held are told at the next page-clock round)."""
    current = get(store, silence_id)
    now_ms = _now_ms(now)
    if current.ends_at > now_ms:
        with store.engine.begin() as conn:
            conn.execute(update(silences).where(silences.c.id == current.id).values(ends_at=now_ms))
    return get(store, current.id)


def silencing(store: Store, resource: str, now: float | None = None) -> Silence | None:
    """The oldest silence in force that holds pages about `resource`, or None."""
    for s in reversed(list_silences(store, active_only=True, now=now)):
        if s.matches(resource):
            return s
    return None


def hold(store: Store, silence_id: int, *, resource: str, level: str, subject: str,
         incident_id: int | None = None, now: float | None = None) -> dict[str, Any]:
    """Record a page the silence held back; the record."""
    record = {"at": _now_ms(now), "resource": resource, "level": level, "subject": subject[:MAX_HELD_SUBJECT],
              "incident_id": incident_id}
    with store.engine.begin() as conn:
        conn.execute(update(silences).where(silences.c.id == int(silence_id)).values(
            held=func.json_insert(silences.c.held, "$[#]", func.json(json.dumps(record)))))
    return record


def ended_unsummarized(store: Store, now: float | None = None) -> list[Silence]:
    """Silences that ended and whose held pages were not told yet (none held: marked told at once)."""
    now_ms = _now_ms(now)
    q = select(silences).where(silences.c.ends_at <= now_ms, silences.c.summarized_at.is_(None))
    with store.engine.connect() as conn:
        return [_from_row(r) for r in conn.execute(q.order_by(silences.c.id))]


def claim_summary(store: Store, silence_id: int, now: float | None = None) -> bool:
    """Mark a silence's held pages as told; False when another round did it first."""
    with store.engine.begin() as conn:
        done = conn.execute(update(silences).where(silences.c.id == int(silence_id),
                                                   silences.c.summarized_at.is_(None))
                            .values(summarized_at=_now_ms(now)))
    return bool(done.rowcount)


def unclaim_summary(store: Store, silence_id: int) -> None:
    """Give a summary back (its message was not delivered): the next round tries again."""
    with store.engine.begin() as conn:
        conn.execute(update(silences).where(silences.c.id == int(silence_id)).values(summarized_at=None))


def summary_messages(s: Silence) -> dict[str, tuple[str, str]]:
    """Per level that had pages held, the one message telling what the silence held back."""
    by_level: dict[str, list[dict[str, Any]]] = {}
    for page in s.held:
        by_level.setdefault(str(page.get("level", "l1")), []).append(page)
    out = {}
    for level, pages in sorted(by_level.items()):
        subject = (f"[crypto-agent] silence #{s.id} ({s.pattern}) ended: it held {len(pages)} "
                   f"page{'s' if len(pages) != 1 else ''} for {level.upper()}")
        head = f"Silence #{s.id} of {s.pattern!r} by {s.created_by}, {iso(s.starts_at)} to {iso(s.ends_at)}: {s.reason}"
        lines = [head, "Held back while it was in force:"]
        lines += [f"- {iso(p.get('at'))} {p.get('subject', '')}"
                  + (f" (incident #{p['incident_id']}: `crypto-agent incidents --report {p['incident_id']}`)"
                     if p.get("incident_id") else "") for p in pages]
        out[level] = (subject, "\n".join(lines))
    return out
