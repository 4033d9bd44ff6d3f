"""The incident log: open (or join), record actions, close, and the questions asked of it (counts, MTTR).

One row per incident in the `incidents` table of its own SQLite file (settings.incidents_db_path),
so the log survives the restore or rollback of the store that a recovery may do. At most one
incident per resource and family is open at a time: a unique index on the open row makes
`open_or_join` atomic, and a second event during a recovery joins (is absorbed by) the open one.
A recovery that closes an incident failed or escalated leaves it needing a person (`needs_person`):
the next recovery of that scenario and resource opens it again (`rejoin`) instead of a new one, until
a recovery resolves it or a person clears it (`clear_needs_person`, `crypto-agent incidents --resolve`).
Columns added after the first version are added to an older file with ALTER TABLE (`ADDED_COLUMNS`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.incidents.scenarios import (
    ESCALATED,
    FAILED,
    LEVELS,
    OPEN,
    RECOVERED,
    RESOLVED,
    SCENARIOS,
    Scenario,
    scenario,
)
from crypto_agent.schema import incidents, incidents_metadata
from crypto_agent.settings import Settings
from crypto_agent.store import Store

# An open incident whose recovery process is gone, or older than this, is abandoned: any recovery
# flow's timeout is shorter, so nobody will ever close it.
ABANDONED_AFTER_S = 4 * 3600.0
MAX_ACTION_DETAIL = 20_000
MAX_TRIGGER_CHARS = 20_000


class IncidentError(CryptoAgentError):
    """The incident log cannot be read or written, or an incident does not exist."""


# --- values ---


@dataclass(frozen=True)
class Incident:
    """One row of the incident log, its JSON columns decoded; times are UTC epoch milliseconds."""

    id: int
    scenario: str
    resource: str
    family: str
    status: str
    outcome: str | None
    trigger: dict[str, Any]
    detected_at: int
    fault_at: int | None
    opened_at: int
    resolved_at: int | None
    detection_delay_s: float | None
    recovery_time_s: float | None
    data_lost_hours: float | None
    actions: list[dict[str, Any]]
    impact: str
    root_cause: str
    summary: str
    levels_told: list[str]
    events_absorbed: int
    flow_run_id: str | None
    owner: str
    report_md: str | None = None
    needs_person: bool = False  # the recoveries could not fix it: the same signal rejoins it until it clears
    needs_person_since: int | None = None
    last_paged_at: int | None = None  # the last message about it that was delivered
    detections: int = 0  # recoveries that rejoined it while it needed a person
    rejoined_at: int | None = None  # the last of them
    first_paged_at: int | None = None  # the first delivered page: MTTA counts from it
    paged_level: str | None = None  # the highest level paged (l1, l2, l3)
    paged_level_at: int | None = None  # when it was reached: the ack timeout counts from it
    acked_at: int | None = None
    acked_by: str | None = None
    report_owner: str | None = None
    report_due: str | None = None
    report_prevention: list[str] = field(default_factory=list)
    report_published_at: int | None = None
    report_updated_at: int | None = None

    @property
    def is_open(self) -> bool:
        """Whether a recovery is still working on it."""
        return self.status == OPEN

    @property
    def automated(self) -> bool:
        """Whether monitoring (an event) found it, rather than a person running the recovery by hand."""
        return bool(self.trigger.get("event"))

    @property
    def duration_s(self) -> float | None:
        """From the fault (or its detection, when the fault time is unknown) to the close."""
        if self.resolved_at is None:
            return None
        return (self.resolved_at - (self.fault_at if self.fault_at is not None else self.detected_at)) / 1000

    @property
    def ack_s(self) -> float | None:
        """Time to acknowledge: from the first page to the acknowledgement (None until both happened)."""
        if self.acked_at is None or self.first_paged_at is None:
            return None
        return max(0, self.acked_at - self.first_paged_at) / 1000

    @property
    def scenario_info(self) -> Scenario | None:
        """The runbook scenario, None for a name this version does not know."""
        return SCENARIOS.get(self.scenario)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ISO times beside the epoch milliseconds."""
        d = asdict(self)
        for key in ("detected_at", "fault_at", "opened_at", "resolved_at"):
            d[key.replace("_at", "") + "_iso"] = iso(d[key])
        d["duration_s"] = self.duration_s
        return d


def iso(ms: int | None) -> str | None:
    """UTC ISO 8601 of epoch milliseconds (seconds precision), None for None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _now_ms(now: float | None = None) -> int:
    return int((time.time() if now is None else now) * 1000)


def _from_row(row: Any) -> Incident:
    m = row._mapping
    return Incident(
        id=int(m["id"]),
        scenario=m["scenario"],
        resource=m["resource"],
        family=m["family"],
        status=m["status"],
        outcome=m["outcome"],
        trigger=_loads(m["trigger"], {}),
        detected_at=int(m["detected_at"]),
        fault_at=m["fault_at"],
        opened_at=int(m["opened_at"]),
        resolved_at=m["resolved_at"],
        detection_delay_s=m["detection_delay_s"],
        recovery_time_s=m["recovery_time_s"],
        data_lost_hours=m["data_lost_hours"],
        actions=_loads(m["actions"], []),
        impact=m["impact"],
        root_cause=m["root_cause"],
        summary=m["summary"],
        levels_told=_loads(m["levels_told"], []),
        events_absorbed=int(m["events_absorbed"]),
        flow_run_id=m["flow_run_id"],
        owner=m["owner"],
        report_md=m["report_md"],
        needs_person=bool(m.get("needs_person") or 0),
        needs_person_since=m.get("needs_person_since"),
        last_paged_at=m.get("last_paged_at"),
        detections=int(m.get("detections") or 0),
        rejoined_at=m.get("rejoined_at"),
        first_paged_at=m.get("first_paged_at"),
        paged_level=m.get("paged_level"),
        paged_level_at=m.get("paged_level_at"),
        acked_at=m.get("acked_at"),
        acked_by=m.get("acked_by"),
        report_owner=m.get("report_owner"),
        report_due=m.get("report_due"),
        report_prevention=_loads(m.get("report_prevention"), []),
        report_published_at=m.get("report_published_at"),
        report_updated_at=m.get("report_updated_at"),
    )


def _loads(value: str | None, default: Any) -> Any:
    if not value:
        return default
    try:
        return json.loads(value)
    except ValueError:
        return default


# --- the log's own database ---


def incidents_db_path(settings: Settings) -> Path:
    """The incident log's SQLite file (incidents_db_path, relative to home)."""
    path = Path(settings.incidents_db_path).expanduser()
    return path if path.is_absolute() else Path(settings.home).expanduser() / path


# Columns later versions added to the incidents table: ALTER TABLE adds them to an older file.
ADDED_COLUMNS = {
    "needs_person": "INTEGER NOT NULL DEFAULT 0",
    "needs_person_since": "BIGINT",
    "last_paged_at": "BIGINT",
    "detections": "INTEGER NOT NULL DEFAULT 0",
    "rejoined_at": "BIGINT",
    "first_paged_at": "BIGINT",
    "paged_level": "VARCHAR(4)",
    "paged_level_at": "BIGINT",
    "acked_at": "BIGINT",
    "acked_by": "VARCHAR(120)",
    "report_owner": "VARCHAR(120)",
    "report_due": "VARCHAR(10)",
    "report_prevention": "TEXT",
    "report_published_at": "BIGINT",
    "report_updated_at": "BIGINT",
}


def _add_missing_columns(store: Store) -> None:
    """Add the columns an incident log written by an older version lacks (another process may add them too)."""
    with store.engine.connect() as conn:
        have = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(incidents)")}
    for name, ddl in ADDED_COLUMNS.items():
        if name in have:
            continue
        try:
            with store.engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE incidents ADD COLUMN {name} {ddl}")
        except SQLAlchemyError as exc:
            if "duplicate column" not in str(exc):
                raise


def open_incident_store(settings: Settings) -> Store:
    """The incident log: its own SQLite file, the incidents table created (or its new columns added) when missing."""
    store = Store(f"sqlite:///{incidents_db_path(settings)}", create=False)
    for attempt in range(5):
        try:
            incidents_metadata.create_all(store.engine)
            _add_missing_columns(store)
            return store
        except SQLAlchemyError as exc:
            # two recoveries opening a fresh file at once race on CREATE: the next pass sees the table
            if "already exists" in str(exc) and attempt < 4:
                continue
            store.close()
            raise IncidentError(
                f"cannot open the incident log {incidents_db_path(settings)}: {getattr(exc, 'orig', exc)}",
                hint="check that the folder is writable (setting incidents_db_path)",
            ) from None
    return store  # pragma: no cover (the loop returns or raises)


# --- who runs a recovery ---


def owner_id() -> str:
    """This process as the owner of an incident: host:pid:create time."""
    try:
        create_time = psutil.Process(os.getpid()).create_time()
    except psutil.Error:
        create_time = 0.0
    return f"{socket.gethostname()}:{os.getpid()}:{create_time:.2f}"


def owner_alive(owner: str) -> bool:
    """Whether the process that owns an incident still runs (an owner on another host is assumed alive)."""
    host, _, rest = owner.partition(":")
    pid_text, _, create_text = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    try:
        proc = psutil.Process(int(pid_text))
        return abs(proc.create_time() - float(create_text or 0)) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.Error:
        return True


# --- the triggering event ---


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an ISO 8601 string (naive means UTC) or an epoch number (ms when huge); None if unreadable."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) / 1000 if value > 1e11 else float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    try:
        parsed = datetime.fromisoformat(str(value).strip())
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def event_payload(event: dict[str, Any] | None) -> dict[str, Any]:
    """The payload of a triggering event as the automation passed it ({} when there is none or it is no dict)."""
    if not isinstance(event, dict):
        return {}
    payload = event.get("payload")
    if isinstance(payload, str):  # a template rendered to text instead of a dict
        try:
            payload = json.loads(payload)
        except ValueError:
            return {}
    return payload if isinstance(payload, dict) else {}


def detected_at(event: dict[str, Any] | None, now: float | None = None) -> float:
    """When the fault was detected: the payload's detected_at, else the event's time, else now (a manual run)."""
    payload = event_payload(event)
    for value in (payload.get("detected_at"), (event or {}).get("occurred")):
        t = parse_time(value)
        if t is not None:
            return t
    return time.time() if now is None else now


def trigger_of(event: dict[str, Any] | None) -> dict[str, Any]:
    """What to keep of the triggering event: id, name, time, resource, payload (bounded); {} for a manual run."""
    if not isinstance(event, dict):
        return {}
    kept = {k: event.get(k) for k in ("id", "event", "occurred", "resource") if event.get(k) is not None}
    payload = event_payload(event)
    if payload:
        kept["payload"] = payload
    if len(json.dumps(kept, default=str)) > MAX_TRIGGER_CHARS:
        kept["payload"] = {"truncated": True, "keys": sorted(payload)[:50]}
    return kept


# --- open, join, act, close ---


def get(store: Store, incident_id: int) -> Incident:
    """One incident; IncidentError when there is none with that id."""
    with store.engine.connect() as conn:
        row = conn.execute(select(incidents).where(incidents.c.id == int(incident_id))).first()
    if row is None:
        raise IncidentError(f"no incident #{incident_id}", hint="list them with `crypto-agent incidents`")
    return _from_row(row)


def open_or_join(
    store: Store,
    scenario_name: str,
    resource: str,
    trigger: dict[str, Any] | None,
    detected_at_s: float,
    *,
    fault_at_s: float | None = None,
    flow_run_id: str | None = None,
    owner: str | None = None,
    now: float | None = None,
    abandoned_after_s: float = ABANDONED_AFTER_S,
) -> tuple[Incident, bool]:
    """Open an incident for (scenario, resource), or join the one already open for that resource and family.

    Atomic across processes: the unique index on the open incident decides who opens; the others
    join it (its events_absorbed counts them) and get joined=True. An open incident whose owner
    process is gone, or older than abandoned_after_s, is closed as failed first.
    """
    sc = scenario(scenario_name)
    owner = owner or owner_id()
    trigger_json = json.dumps(trigger or {}, default=str)
    c = incidents.c
    is_open = (c.resource == resource) & (c.family == sc.family) & (c.status == OPEN)
    for _ in range(20):
        now_ms = _now_ms(now)
        with store.engine.connect() as conn:
            current = conn.execute(select(incidents).where(is_open)).first()
        if current is not None:
            found = _from_row(current)
            started = max(found.opened_at, found.rejoined_at or 0)
            if not owner_alive(found.owner) or now_ms - started > abandoned_after_s * 1000:
                _abandon(store, found, now_ms)
                continue
            with store.engine.begin() as conn:
                joined = conn.execute(
                    update(incidents).where(is_open).values(events_absorbed=c.events_absorbed + 1).returning(c.id)
                ).scalar()
            if joined is None:
                continue  # it closed in between: open a new one
            return get(store, joined), True
        values = {
            "scenario": sc.name, "resource": resource, "family": sc.family, "status": OPEN, "outcome": None,
            "trigger": trigger_json, "detected_at": int(detected_at_s * 1000),
            "fault_at": None if fault_at_s is None else int(fault_at_s * 1000), "opened_at": now_ms,
            "actions": "[]", "impact": "", "root_cause": "", "summary": "", "levels_told": "[]",
            "events_absorbed": 0, "flow_run_id": flow_run_id, "owner": owner,
        }
        try:
            with store.engine.begin() as conn:
                inserted = conn.execute(insert(incidents).values(**values)).inserted_primary_key
        except IntegrityError:
            continue  # another recovery opened it first: join that one
        if inserted is None:  # pragma: no cover (SQLite always returns the new row's key)
            raise IncidentError(f"opening an incident for {resource} returned no id", hint="check the incident log")
        return get(store, inserted[0]), False
    raise IncidentError(
        f"could not open or join an incident for {resource} ({sc.family}): it kept changing",
        hint="another process opens and closes incidents of this resource in a loop; check the automations",
    )


def _abandon(store: Store, found: Incident, now_ms: int) -> None:
    why = (
        f"abandoned: its recovery ({found.owner}) is gone or ran past {ABANDONED_AFTER_S / 3600:g} h "
        "without closing it"
    )
    action = {"at": now_ms, "step": "abandoned", "ok": False, "detail": why}
    with store.engine.begin() as conn:
        conn.execute(
            update(incidents)
            .where(incidents.c.id == found.id, incidents.c.status == OPEN)
            .values(
                status=FAILED, outcome="failed", resolved_at=now_ms, summary=found.summary or why,
                actions=func.json_insert(incidents.c.actions, "$[#]", func.json(json.dumps(action))),
            )
        )


def add_action(
    store: Store, incident_id: int, step: str, detail: str, *, ok: bool = True, now: float | None = None
) -> dict[str, Any]:
    """Append one action (what was done, and how it went) to the incident; the action recorded."""
    action = {"at": _now_ms(now), "step": step, "ok": bool(ok), "detail": str(detail)[:MAX_ACTION_DETAIL]}
    with store.engine.begin() as conn:
        # json_insert appends in one statement: an absorbed event updating the same row cannot interleave
        conn.execute(
            update(incidents)
            .where(incidents.c.id == int(incident_id))
            .values(actions=func.json_insert(incidents.c.actions, "$[#]", func.json(json.dumps(action))))
        )
    return action


def told(store: Store, incident_id: int, level: str, now: float | None = None) -> None:
    """Record that an escalation level (l1, l2, l3) was told about the incident (once per level), and when."""
    level = level.lower()
    if level not in LEVELS:
        raise InputError(f"unknown escalation level {level!r}", hint="use l1, l2 or l3")
    now_ms = _now_ms(now)
    c = incidents.c
    with store.engine.begin() as conn:
        conn.execute(update(incidents).where(c.id == int(incident_id)).values(
            last_paged_at=now_ms, first_paged_at=func.coalesce(c.first_paged_at, now_ms)))
        # the highest level reached, and when: the ack clock climbs from it ("l1" < "l2" < "l3" as text)
        conn.execute(update(incidents).where(c.id == int(incident_id),
                                             (c.paged_level.is_(None)) | (c.paged_level < level))
                     .values(paged_level=level, paged_level_at=now_ms))
        conn.execute(
            text(
                "UPDATE incidents SET levels_told = json_insert(levels_told, '$[#]', :level) "
                "WHERE id = :id AND NOT EXISTS (SELECT 1 FROM json_each(incidents.levels_told) WHERE value = :level)"
            ),
            {"level": level, "id": int(incident_id)},
        )


_EDITABLE = {"impact", "root_cause", "summary", "fault_at", "data_lost_hours", "flow_run_id", "report_md",
             "report_published_at"}


def update_fields(store: Store, incident_id: int, **fields: Any) -> None:
    """Set descriptive fields of an incident (impact, root_cause, summary, fault_at ms, data_lost_hours, ...)."""
    unknown = set(fields) - _EDITABLE
    if unknown:
        raise InputError(f"incident fields {sorted(unknown)} cannot be set", hint=f"settable: {sorted(_EDITABLE)}")
    if fields:
        with store.engine.begin() as conn:
            conn.execute(update(incidents).where(incidents.c.id == int(incident_id)).values(**fields))


def close(
    store: Store,
    incident_id: int,
    status: str,
    *,
    outcome: str,
    summary: str,
    impact: str | None = None,
    root_cause: str | None = None,
    data_lost_hours: float | None = None,
    needs_person: bool | None = None,
    now: float | None = None,
) -> Incident:
    """Close an open incident (resolved, failed or escalated), computing detection delay and recovery time.

    Recovery time runs from the detection to now; detection delay from the fault, when known, to
    the detection. Closed failed or escalated it needs a person (unless needs_person=False says
    otherwise), resolved it no longer does. Closing an incident that is not open changes nothing.
    """
    if status not in (RESOLVED, FAILED, ESCALATED):
        raise InputError(f"cannot close an incident as {status!r}", hint="use resolved, failed or escalated")
    current = get(store, incident_id)
    if not current.is_open:
        return current
    now_ms = _now_ms(now)
    values: dict[str, Any] = {
        "status": status, "outcome": outcome, "summary": summary, "resolved_at": now_ms,
        "recovery_time_s": round(max(0, now_ms - current.detected_at) / 1000, 3),
        "detection_delay_s": None if current.fault_at is None
        else round(max(0, current.detected_at - current.fault_at) / 1000, 3),
    }
    if impact is not None:
        values["impact"] = impact
    if root_cause is not None:
        values["root_cause"] = root_cause
    if data_lost_hours is not None:
        values["data_lost_hours"] = round(float(data_lost_hours), 3)
    if needs_person is None:
        needs_person = status != RESOLVED
    values["needs_person"] = int(needs_person)
    if needs_person:
        values["needs_person_since"] = current.needs_person_since or now_ms
    with store.engine.begin() as conn:
        conn.execute(update(incidents).where(incidents.c.id == int(incident_id), incidents.c.status == OPEN)
                     .values(**values))
    return get(store, incident_id)


def resolve(store: Store, incident_id: int, *, summary: str, outcome: str = RECOVERED, **kw: Any) -> Incident:
    """Close the incident as resolved (recovered and verified, or nothing to do: outcome skipped)."""
    return close(store, incident_id, RESOLVED, outcome=outcome, summary=summary, **kw)


def escalate(store: Store, incident_id: int, level: str, reason: str, **kw: Any) -> Incident:
    """Close the incident as escalated: the recovery could not finish and hands over to a person at `level`."""
    add_action(store, incident_id, f"escalate-{level.lower()}", reason, ok=False)
    return close(store, incident_id, ESCALATED, outcome="escalated", summary=reason, **kw)


def fail(store: Store, incident_id: int, error: str, **kw: Any) -> Incident:
    """Close the incident as failed: the recovery itself broke (an unexpected error)."""
    add_action(store, incident_id, "recovery-failed", error, ok=False)
    return close(store, incident_id, FAILED, outcome="failed", summary=error, **kw)


# --- the incidents that need a person ---


def needs_person_incident(store: Store, scenario_name: str, resource: str) -> Incident | None:
    """The newest incident of this scenario and resource that still needs a person (open again or not), or None."""
    c = incidents.c
    q = (select(incidents).where(c.scenario == scenario_name, c.resource == resource, c.needs_person == 1)
         .order_by(c.id.desc()).limit(1))
    with store.engine.connect() as conn:
        row = conn.execute(q).first()
    return None if row is None else _from_row(row)


def previous_closed(store: Store, scenario_name: str, resource: str, before_id: int) -> Incident | None:
    """The newest closed incident of this scenario and resource older than incident `before_id`, or None."""
    c = incidents.c
    q = (select(incidents).where(c.scenario == scenario_name, c.resource == resource, c.id < int(before_id),
                                 c.status != OPEN)
         .order_by(c.id.desc()).limit(1))
    with store.engine.connect() as conn:
        row = conn.execute(q).first()
    return None if row is None else _from_row(row)


def rejoin(
    store: Store,
    incident_id: int,
    *,
    flow_run_id: str | None = None,
    owner: str | None = None,
    now: float | None = None,
) -> Incident | None:
    """Open again a closed incident that needs a person, for a recovery that works in it (detections + 1).

    None when it is open already, no longer needs a person, or another incident of its resource and
    family is open (the unique index): the caller then opens or joins as usual.
    """
    c = incidents.c
    try:
        with store.engine.begin() as conn:
            done = conn.execute(
                update(incidents).where(c.id == int(incident_id), c.status != OPEN, c.needs_person == 1)
                .values(status=OPEN, outcome=None, resolved_at=None, owner=owner or owner_id(),
                        flow_run_id=flow_run_id, detections=c.detections + 1, rejoined_at=_now_ms(now))
                .returning(c.id)
            ).scalar()
    except IntegrityError:
        return None
    return None if done is None else get(store, done)


def clear_needs_person(
    store: Store, incident_id: int, by: str, note: str = "", now: float | None = None
) -> Incident:
    """A person resolved it: it no longer needs a person, and the next detection opens a new incident."""
    current = get(store, incident_id)
    if current.is_open:
        raise InputError(f"incident #{current.id} is open: a recovery is working in it",
                         hint="wait until it closes, then resolve it")
    if not current.needs_person:
        raise InputError(f"incident #{current.id} does not need a person ({current.status})",
                         hint="list those that do with `crypto-agent incidents --needs-person`")
    detail = f"resolved by {by}" + (f": {note}" if note else "")
    action = {"at": _now_ms(now), "step": "resolved-by-person", "ok": True, "detail": detail[:MAX_ACTION_DETAIL]}
    with store.engine.begin() as conn:
        conn.execute(
            update(incidents).where(incidents.c.id == current.id).values(
                needs_person=0, actions=func.json_insert(incidents.c.actions, "$[#]", func.json(json.dumps(action))))
        )
    return get(store, current.id)


def needing_person(store: Store) -> list[Incident]:
    """The incidents that need a person, oldest first."""
    q = select(incidents).where(incidents.c.needs_person == 1).order_by(incidents.c.id)
    with store.engine.connect() as conn:
        return [_from_row(r) for r in conn.execute(q)]


# --- acknowledgements and the report's last fields (issue 11) ---


def acknowledge(store: Store, incident_id: int, by: str, note: str = "", now: float | None = None) -> Incident:
    """A person took the incident: its pages stop climbing (the ack clock), MTTA is counted. Acknowledging
    one already acknowledged changes nothing (the first acknowledgement stays)."""
    current = get(store, incident_id)
    if current.acked_at is not None:
        return current
    by = (by or "").strip()[:120] or "a person"
    detail = f"acknowledged by {by}" + (f": {note}" if note else "")
    now_ms = _now_ms(now)
    action = {"at": now_ms, "step": "acknowledged", "ok": True, "detail": detail[:MAX_ACTION_DETAIL]}
    with store.engine.begin() as conn:
        conn.execute(
            update(incidents).where(incidents.c.id == current.id, incidents.c.acked_at.is_(None)).values(
                acked_at=now_ms, acked_by=by,
                actions=func.json_insert(incidents.c.actions, "$[#]", func.json(json.dumps(action))))
        )
    return get(store, current.id)


def set_report_fields(
    store: Store, incident_id: int, *, owner: str, prevention: list[str], due: str | None = None,
    report_md: str | None = None, now: float | None = None,
) -> Incident:
    """Fill the report's Owner (and due date) and Prevention fields; report_md, when given, is the re-rendered
    report, marked for republishing (report_updated_at newer than report_published_at)."""
    current = get(store, incident_id)
    if current.is_open:
        raise InputError(f"incident #{current.id} is open: a recovery is still working in it",
                         hint="close its report once the recovery has closed it (`crypto-agent incidents --open`)")
    values: dict[str, Any] = {"report_owner": owner.strip()[:120], "report_prevention": json.dumps(prevention),
                              "report_due": due, "report_updated_at": _now_ms(now)}
    if report_md is not None:
        values["report_md"] = report_md
    with store.engine.begin() as conn:
        conn.execute(update(incidents).where(incidents.c.id == current.id).values(**values))
    return get(store, current.id)


def reports_to_publish(store: Store) -> list[Incident]:
    """Incidents whose report changed outside a flow after it was last published as an artifact."""
    c = incidents.c
    q = select(incidents).where(c.report_updated_at.is_not(None), c.report_md.is_not(None),
                                (c.report_published_at.is_(None)) | (c.report_published_at < c.report_updated_at))
    with store.engine.connect() as conn:
        return [_from_row(r) for r in conn.execute(q.order_by(c.id))]


def awaiting_ack(store: Store) -> list[Incident]:
    """Incidents that paged someone and are not acknowledged, open or needing a person (the ack clock's list)."""
    c = incidents.c
    q = select(incidents).where(c.acked_at.is_(None), c.paged_level.is_not(None),
                                (c.status == OPEN) | (c.needs_person == 1)).order_by(c.id)
    with store.engine.connect() as conn:
        return [_from_row(r) for r in conn.execute(q)]


# --- questions asked of the log ---


def list_incidents(store: Store, *, open_only: bool = False, limit: int = 200) -> list[Incident]:
    """Incidents, newest first (only the open ones with open_only)."""
    q = select(incidents).order_by(incidents.c.opened_at.desc(), incidents.c.id.desc()).limit(limit)
    if open_only:
        q = q.where(incidents.c.status == OPEN)
    with store.engine.connect() as conn:
        return [_from_row(r) for r in conn.execute(q)]


def open_incidents(store: Store, flow_run_id: str | None = None) -> list[Incident]:
    """The open incidents (of one flow run, when given), oldest first."""
    q = select(incidents).where(incidents.c.status == OPEN).order_by(incidents.c.id)
    if flow_run_id is not None:
        q = q.where(incidents.c.flow_run_id == str(flow_run_id))
    with store.engine.connect() as conn:
        return [_from_row(r) for r in conn.execute(q)]


def recent_count(store: Store, scenario_name: str, hours: float, now: float | None = None) -> int:
    """How many incidents of a scenario were opened in the last `hours` (absorbed events not counted)."""
    since = _now_ms(now) - int(hours * 3_600_000)
    q = select(func.count()).select_from(incidents).where(
        incidents.c.scenario == scenario_name, incidents.c.opened_at >= since
    )
    with store.engine.connect() as conn:
        return int(conn.execute(q).scalar() or 0)


@dataclass(frozen=True)
class ScenarioStats:
    """MTTR of one scenario: recovery times of its recovered incidents against the runbook's ETA."""

    scenario: str
    number: int
    title: str
    incidents: int
    recovered: int
    open: int
    escalated: int
    failed: int
    mttr_s: float | None
    p95_s: float | None
    max_s: float | None
    eta_s: float
    recovery_times_s: list[float] = field(default_factory=list, repr=False)
    acked: int = 0
    mtta_s: float | None = None  # mean time from the first page to the acknowledgement

    @property
    def within_eta(self) -> bool | None:
        """Whether the mean recovery time is within the runbook's ETA (None without recoveries)."""
        return None if self.mttr_s is None else self.mttr_s <= self.eta_s

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (without the raw times)."""
        d = asdict(self)
        d.pop("recovery_times_s")
        d["within_eta"] = self.within_eta
        return d


def percentile(values: list[float], pct: float) -> float | None:
    """The nearest-rank percentile of values (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def mttr_by_scenario(store: Store, since_ms: int | None = None) -> list[ScenarioStats]:
    """Per runbook scenario: incidents, outcomes, mean/p95/max recovery time of the recovered ones, the ETA."""
    q = select(incidents.c.scenario, incidents.c.status, incidents.c.outcome, incidents.c.recovery_time_s,
               incidents.c.first_paged_at, incidents.c.acked_at)
    if since_ms is not None:
        q = q.where(incidents.c.opened_at >= since_ms)
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
    out = []
    for sc in SCENARIOS.values():
        mine = [r for r in rows if r.scenario == sc.name]
        times = [float(r.recovery_time_s) for r in mine
                 if r.status == RESOLVED and r.outcome == RECOVERED and r.recovery_time_s is not None]
        acks = [max(0, r.acked_at - r.first_paged_at) / 1000 for r in mine
                if r.acked_at is not None and r.first_paged_at is not None]
        out.append(ScenarioStats(
            scenario=sc.name, number=sc.number, title=sc.title, incidents=len(mine), recovered=len(times),
            open=sum(r.status == OPEN for r in mine), escalated=sum(r.status == ESCALATED for r in mine),
            failed=sum(r.status == FAILED for r in mine),
            mttr_s=round(sum(times) / len(times), 3) if times else None,
            p95_s=percentile(times, 95), max_s=max(times) if times else None, eta_s=sc.eta_s,
            recovery_times_s=times, acked=len(acks),
            mtta_s=round(sum(acks) / len(acks), 3) if acks else None,
        ))
    return out
