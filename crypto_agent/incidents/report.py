"""The runbook's post-incident report, filled in from an incident (markdown)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from crypto_agent.incidents.log import Incident, get, iso, set_report_fields
from crypto_agent.incidents.scenarios import ROOT_CAUSES
from crypto_agent.store import Store


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 120:
        return f"{seconds:.0f} s ({seconds / 60:.2f} min)"
    return f"{seconds / 60:.1f} min"


def _box(checked: bool) -> str:
    return "[x]" if checked else "[ ]"


def root_cause_boxes(root_cause: str) -> str:
    """The runbook's root-cause line with the matching box ticked (`Other: <detail>` for the rest)."""
    category, _, detail = root_cause.partition(":")
    category = category.strip()
    known = category if category in ROOT_CAUSES[:-1] else None
    parts = [f"{_box(known == c)} {c}" for c in ROOT_CAUSES[:-1]]
    if known is None and root_cause.strip():
        other = root_cause.strip() if category != "Other" else detail.strip()
        parts.append(f"[x] Other: {other}")
    else:
        parts.append("[ ] Other: ___")
    line = " ".join(parts)
    if known is not None and detail.strip():
        line += f"\n\n{detail.strip()}"
    return line


PREVENTIONS = ("Auto-restart added", "Backup validation improved", "Monitoring threshold adjusted")


def prevention_item(text: str) -> str:
    """One --prevention value as the report keeps it: one of the runbook's items (matched loosely, e.g.
    'auto-restart', 'backup validation', 'monitoring threshold'), or 'Other: <text>'."""
    clean = " ".join(text.split())
    key = clean.lower().replace("-", " ")
    for item in PREVENTIONS:
        words = item.lower().replace("-", " ").split()
        if key == item.lower().replace("-", " ") or key == " ".join(words[:2]) or key == words[0]:
            return item
    return f"Other: {clean}"


def prevention_boxes(items: list[str]) -> list[str]:
    """The runbook's Prevention checklist with the items done ticked, one line each; free text as Other."""
    lines = [f"{_box(item in items)} {item}" for item in PREVENTIONS]
    others = [i.partition(":")[2].strip() for i in items if i.startswith("Other:")]
    lines += [f"[x] Other: {o}" for o in others] or ["[ ] Other: ___"]
    return lines


def render_report(incident: Incident, flow_run_link: str | None = None) -> str:
    """The runbook's post-incident checklist, filled in from the incident (markdown)."""
    sc = incident.scenario_info
    title = f"scenario {sc.number}: {sc.title}" if sc else incident.scenario
    started_ms = incident.fault_at if incident.fault_at is not None else incident.detected_at
    started = datetime.fromtimestamp(started_ms / 1000, UTC)
    recovery = _minutes(incident.recovery_time_s)
    if sc is not None and incident.recovery_time_s is not None:
        verdict = "within" if incident.recovery_time_s <= sc.eta_s else "over"
        recovery += f" ({verdict} the runbook's ETA of {sc.eta_min:g} min)"
    if incident.detection_delay_s is not None:
        delay = _minutes(incident.detection_delay_s)
        delay += f" (fault {iso(incident.fault_at)}, detected {iso(incident.detected_at)})"
    else:
        delay = f"unknown (fault time not known; detected {iso(incident.detected_at)})"
    trigger = incident.trigger.get("event") or "a manual run of the recovery"
    lost = "unknown" if incident.data_lost_hours is None else f"{incident.data_lost_hours:g} hours"
    actions = []
    for a in incident.actions:
        at = datetime.fromtimestamp(a.get("at", 0) / 1000, UTC).strftime("%H:%M:%S")
        mark = "" if a.get("ok", True) else " **(failed)**"
        detail = str(a.get("detail", "")).strip()
        first, _, rest = detail.partition("\n")
        line = f"- {at} `{a.get('step', '?')}`{mark}: {first}"
        if rest.strip():
            body = rest.strip()
            if len(body) > 4000:
                body = body[:4000] + "\n... (truncated; the full text is in the incident log)"
            line += "\n\n  ```\n" + "\n".join(f"  {ln}" for ln in body.splitlines()) + "\n  ```"
        actions.append(line)
    absorbed = (f" ({incident.events_absorbed} more event(s) absorbed during the recovery)"
                if incident.events_absorbed else "")
    told = ", ".join(lv.upper() for lv in incident.levels_told) or "nobody yet"
    status = incident.status + (f" ({incident.outcome})" if incident.outcome else "")
    if incident.needs_person:
        status += (f"; NEEDS A PERSON since {iso(incident.needs_person_since)} ({incident.detections} detection(s) "
                   f"since; once fixed by hand: `crypto-agent incidents --resolve {incident.id}`)")
    due = (started + timedelta(days=2)).strftime("%Y-%m-%d")
    if incident.acked_at is not None:
        mtta = _minutes(incident.ack_s) if incident.ack_s is not None else "unknown"
        acked = f"by {incident.acked_by or 'a person'} at {iso(incident.acked_at)} (time to acknowledge {mtta})"
    else:
        acked = "not yet" if incident.first_paged_at is not None else "nobody was paged"
    lines = [
        f"# Incident Report #{incident.id}: {title}",
        "",
        f"**Date:** {started:%Y-%m-%d}  ",
        f"**Time:** {started:%H:%M} UTC  ",
        f"**Duration:** {_minutes(incident.duration_s) if incident.resolved_at else 'ongoing'}  ",
        f"**Impact:** {incident.impact or 'not assessed'}  ",
        f"**Resource:** `{incident.resource}`  ",
        f"**Status:** {status}  ",
        "",
        "## Root Cause",
        root_cause_boxes(incident.root_cause),
        "",
        "## Detection",
        f"Who found? {_box(incident.automated)} Automated {_box(not incident.automated)} Manual notice  ",
        f"Trigger: `{trigger}`{absorbed}  ",
        f"Detection delay: {delay}",
        "",
        "## Recovery",
        f"Summary: {incident.summary or 'in progress'}  ",
        "Action taken:",
        "",
        *(actions or ["- none yet"]),
        "",
        f"Recovery time: {recovery}  ",
        f"Data loss: {lost}  ",
        f"Escalated to: {told}  ",
        f"Acknowledged: {acked}",
    ]
    if flow_run_link:
        lines.append(f"\nFlow run: {flow_run_link}")
    lines += [
        "",
        "## Prevention",
        *prevention_boxes(incident.report_prevention),
        "",
        "## Assigned to",
        f"Owner: {incident.report_owner or '___'} | Due: {incident.report_due or due}",
        "",
    ]
    return "\n".join(lines)


def close_report(store: Store, incident_id: int, *, owner: str, prevention: list[str], due: str | None = None,
                 link: str | None = None) -> Incident:
    """Fill the report's Owner (and due date) and Prevention fields and keep the report rendered with them, marked
    for republishing; InputError for an incident still open."""
    filled = replace(get(store, incident_id), report_owner=owner.strip()[:120], report_prevention=prevention,
                     report_due=due)
    return set_report_fields(store, incident_id, owner=owner, prevention=prevention, due=due,
                             report_md=render_report(filled, link))
