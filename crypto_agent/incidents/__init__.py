"""Incidents of the runbook's five scenarios: the log (open or join, act, close), the report, and the decisions.

- scenarios: the five scenarios and their ETAs (the one table), statuses, outcomes, levels.
- log: the incident log in its own SQLite file, so it survives a restore or rollback of the store.
- report: the runbook's post-incident checklist filled in from an incident.
- policy: who beyond L1 is told at the close (`levels_to_tell`); join, page or hold while an incident needs a
  person (`needs_person_action`).
- root_cause: the root cause of each scenario from what the recovery found (`crash_root_cause`, ...).

No Prefect here: the flows act on what these return. Every name is importable from
`crypto_agent.incidents` as before the package was split.
"""

from __future__ import annotations

from crypto_agent.incidents import policy, root_cause
from crypto_agent.incidents.log import (
    ABANDONED_AFTER_S,
    MAX_ACTION_DETAIL,
    MAX_TRIGGER_CHARS,
    Incident,
    IncidentError,
    ScenarioStats,
    add_action,
    clear_needs_person,
    close,
    detected_at,
    escalate,
    event_payload,
    fail,
    get,
    incidents_db_path,
    iso,
    list_incidents,
    mttr_by_scenario,
    needing_person,
    needs_person_incident,
    open_incident_store,
    open_incidents,
    open_or_join,
    owner_alive,
    owner_id,
    parse_time,
    percentile,
    recent_count,
    rejoin,
    resolve,
    told,
    trigger_of,
    update_fields,
)
from crypto_agent.incidents.policy import (
    NeedsPersonAction,
    budget_left_s,
    condition_cleared,
    levels_to_tell,
    needs_person_action,
    over_budget_note,
)
from crypto_agent.incidents.report import render_report, root_cause_boxes
from crypto_agent.incidents.scenarios import (
    ABSORBED,
    ESCALATED,
    FAILED,
    LEVELS,
    OPEN,
    OUTCOMES,
    RECOVERED,
    RESOLVED,
    ROOT_CAUSES,
    SCENARIOS,
    SKIPPED,
    STATUSES,
    Scenario,
    scenario,
)

__all__ = [
    "ABANDONED_AFTER_S", "ABSORBED", "ESCALATED", "FAILED", "LEVELS", "MAX_ACTION_DETAIL", "MAX_TRIGGER_CHARS",
    "OPEN", "OUTCOMES", "RECOVERED", "RESOLVED", "ROOT_CAUSES", "SCENARIOS", "SKIPPED", "STATUSES",
    "Incident", "IncidentError", "NeedsPersonAction", "Scenario", "ScenarioStats",
    "add_action", "budget_left_s", "clear_needs_person", "close", "condition_cleared", "detected_at", "escalate",
    "event_payload", "fail", "get",
    "incidents_db_path", "iso",
    "levels_to_tell", "list_incidents", "mttr_by_scenario", "needing_person",
    "needs_person_action", "needs_person_incident", "open_incident_store", "open_incidents",
    "open_or_join", "over_budget_note", "owner_alive", "owner_id", "parse_time", "percentile", "policy", "recent_count",
    "rejoin", "render_report", "resolve", "root_cause", "root_cause_boxes", "scenario", "told", "trigger_of",
    "update_fields",
]
