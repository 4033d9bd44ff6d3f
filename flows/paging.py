"""Paging as on-call tools do it: the ack clock, silences ending, reports republished; acknowledge and close a
report from the Prefect UI.

- page-clock (cron, every minute): an incident that paged and is not acknowledged climbs to the next level
  once its level was reached `ack_timeout_s` ago (L1 -> L2 -> L3, crypto_agent.incidents.ack_climb decides);
  a silence that ended tells each level once what it held back; a report closed from the CLI is republished
  as the artifact `incident-<id>`.
- acknowledge (a deployment run from the UI with its form: incident_id, by): what `crypto-agent ack` does.
- close-report (likewise): what `crypto-agent incidents close-report` does, the artifact republished at once.

Silences are honoured where pages leave (flows.notify.silenced): a page about a silenced resource is held and
recorded in the silence instead of sent; the recoveries themselves still run.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.utilities.urls import url_for

from crypto_agent import alerts, incidents
from crypto_agent.errors import InputError
from crypto_agent.incidents import silences
from crypto_agent.incidents.report import prevention_item
from flows.common import run_settings
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, notify_level, page_episode, silenced

MAX_CLIMBS_PER_ROUND = 20  # a backlog after an outage climbs over several rounds, not in one burst


def incident_link(inc: incidents.Incident) -> str:
    """The UI page of the flow run that worked in the incident (Prefect 3's /runs/flow-run/<id>)."""
    if not inc.flow_run_id:
        return f"`crypto-agent incidents --report {inc.id}`"
    return url_for("flow-run", obj_id=inc.flow_run_id) or f"flow run id {inc.flow_run_id}"


def climb_message(inc: incidents.Incident, climb: incidents.Climb) -> tuple[str, str]:
    """Short first (what, where, state, link), the detail after."""
    sc = inc.scenario_info
    title = sc.title if sc else inc.scenario
    state = "needs a person" if inc.needs_person else inc.status
    subject = (f"[crypto-agent] incident #{inc.id} unacknowledged, escalated to {climb.level.upper()}: {title} "
               f"({inc.resource}), {state}")
    body = "\n".join([
        f"What: {title}: {inc.summary or inc.root_cause or 'being recovered'}",
        f"Where: {inc.resource}",
        f"State: {state}; paged {', '.join(lv.upper() for lv in inc.levels_told) or 'nobody'} so far",
        f"Link: {incident_link(inc)}",
        f"Acknowledge: `crypto-agent ack {inc.id} --by NAME` (or run the acknowledge deployment)",
        "",
        f"Why {climb.level.upper()}: {climb.why}",
        "",
        inc.report_md or incidents.render_report(inc, incident_link(inc)),
    ])
    return subject, body


def climb_unacknowledged(cfg: Any, store: Any, now: float) -> list[dict[str, Any]]:
    """Page the next level of every incident whose page nobody acknowledged in time; what was paged."""
    logger = get_run_logger()
    done: list[dict[str, Any]] = []
    for inc in incidents.awaiting_ack(store)[:MAX_CLIMBS_PER_ROUND]:
        climb = incidents.ack_climb(inc, int(now * 1000), cfg.ack_timeout_s)
        if climb is None:
            continue
        subject, body = climb_message(inc, climb)
        if silenced(cfg, inc.resource, climb.level, subject, incident_id=inc.id, store=store):
            incidents.add_action(store, inc.id, "ack-timeout", f"{climb.why} (held by a silence)")
            # held: the level counts as reached, so the clock goes on from here, once the silence ends
            incidents.told(store, inc.id, climb.level, now=now)
            done.append({"incident_id": inc.id, "level": climb.level, "held": True})
            continue
        try:
            notify_level(climb.level, subject, body)
        except Exception as exc:  # noqa: BLE001 (the next round tries again; the run still shows it)
            logger.error("incident #%d: the %s page did not go out: %s", inc.id, climb.level.upper(), exc)
            incidents.add_action(store, inc.id, f"notify-{climb.level}", f"not delivered: {exc}", ok=False)
            continue
        incidents.told(store, inc.id, climb.level, now=now)
        incidents.add_action(store, inc.id, "ack-timeout", climb.why, ok=False)
        done.append({"incident_id": inc.id, "level": climb.level, "held": False})
    return done


def tell_ended_silences(store: Any, now: float) -> list[int]:
    """One message per level about the pages each ended silence held; the silences told."""
    told: list[int] = []
    for s in silences.ended_unsummarized(store, now=now):
        if not silences.claim_summary(store, s.id, now=now):
            continue
        try:
            for level, (subject, body) in silences.summary_messages(s).items():
                notify_level(level, subject, body)
        except Exception:
            silences.unclaim_summary(store, s.id)  # the next round tells them
            raise
        told.append(s.id)
    return told


def publish_report(store: Any, inc: incidents.Incident) -> None:
    """The incident's report as its artifact `incident-<id>` again, and marked published."""
    create_markdown_artifact(markdown=inc.report_md or incidents.render_report(inc), key=f"incident-{inc.id}",
                             description=f"incident #{inc.id} {inc.scenario}: {inc.status} ({inc.outcome}); "
                             f"owner {inc.report_owner or 'not assigned'}")
    incidents.update_fields(store, inc.id, report_published_at=int(time.time() * 1000))


def watch_missed_days(cfg: Any, now: float) -> list[str]:
    """L2 for every daily runbook job (tag `runbook`, one daily cron) with no completed run for a day and
    alerts.MISSED_DAY_GRACE_S: once per episode, over when it completes again; the jobs paged."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        DeploymentFilterTags,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    paged = []
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[alerts.RUNBOOK_TAG])))
        names = {}
        for dep in deployments:
            crons = [str(getattr(s.schedule, "cron", "")) for s in dep.schedules if s.active]
            if not alerts.is_daily(crons):
                continue
            if dep.flow_id not in names:
                names[dep.flow_id] = client.read_flow(dep.flow_id).name
            job = f"{names[dep.flow_id]}/{dep.name}"
            done = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))),
                sort=FlowRunSort.END_TIME_DESC, limit=1)
            last = done[0].end_time.timestamp() if done and done[0].end_time else None
            created = dep.created.timestamp() if dep.created else now
            alert = alerts.missed_day(job, crons, last, created, now)
            if page_episode(cfg, f"job:{job}:missed-day", alert is not None, "l2",
                            alert.subject if alert else "", alert.body if alert else ""):
                paged.append(job)
    return paged


@flow(name="page-clock", log_prints=True, timeout_seconds=300, on_failure=FAILURE_HOOKS, on_crashed=CRASH_HOOKS)
def page_clock(settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Climb unacknowledged pages (L1 -> L2 -> L3 after ack_timeout_s), tell what ended silences held, republish
    reports closed from the CLI."""
    cfg = run_settings(settings)
    if not incidents.incidents_db_path(cfg).exists():
        return {"climbed": [], "silences_told": [], "reports": [], "missed_days": watch_missed_days(cfg, time.time())}
    store = incidents.open_incident_store(cfg)
    try:
        now = time.time()
        climbed = climb_unacknowledged(cfg, store, now)
        ended = tell_ended_silences(store, now)
        reports = []
        for inc in incidents.reports_to_publish(store):
            publish_report(store, inc)
            reports.append(inc.id)
    finally:
        store.close()
    return {"climbed": climbed, "silences_told": ended, "reports": reports,
            "missed_days": watch_missed_days(cfg, now)}


@flow(name="acknowledge", log_prints=True, timeout_seconds=60, on_failure=FAILURE_HOOKS, on_crashed=CRASH_HOOKS)
def acknowledge(incident_id: int, by: str, note: str = "", settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Acknowledge incident `incident_id` as `by` (you are on it): its pages stop climbing, MTTA is counted."""
    if not str(by).strip():
        raise InputError("acknowledge: say who you are (by)", hint="fill the form's `by` with your name")
    cfg = run_settings(settings)
    if not incidents.incidents_db_path(cfg).exists():
        raise incidents.IncidentError(f"no incident #{incident_id} (no incident log yet)",
                                      hint="list them with `crypto-agent incidents`")
    with incidents.open_incident_store(cfg) as store:
        before = incidents.get(store, incident_id)
        inc = incidents.acknowledge(store, incident_id, by=by, note=note)
    already = before.acked_at is not None
    print(f"incident #{inc.id} {'was already ' if already else ''}acknowledged by {inc.acked_by} "
          f"at {incidents.iso(inc.acked_at)}")
    return {"incident_id": inc.id, "acked_by": inc.acked_by, "acked_at": incidents.iso(inc.acked_at),
            "already": already, "mtta_s": inc.ack_s}


@flow(name="close-report", log_prints=True, timeout_seconds=60, on_failure=FAILURE_HOOKS, on_crashed=CRASH_HOOKS)
def close_report(incident_id: int, owner: str, prevention: list[str], due: str | None = None,
                 settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill the post-incident report's Owner and Prevention fields and republish its artifact."""
    items = [prevention_item(p) for p in prevention if str(p).strip()]
    if not owner.strip() or not items:
        raise InputError("close-report needs an owner and at least one prevention item",
                         hint="e.g. owner=alice prevention=['auto-restart', 'alert on WAL size']")
    cfg = run_settings(settings)
    if not incidents.incidents_db_path(cfg).exists():
        raise incidents.IncidentError(f"no incident #{incident_id} (no incident log yet)",
                                      hint="list them with `crypto-agent incidents`")
    with incidents.open_incident_store(cfg) as store:
        inc = incidents.close_report(store, incident_id, owner=owner, prevention=items, due=due,
                                     link=incident_link(incidents.get(store, incident_id)))
        publish_report(store, inc)
    return {"incident_id": incident_id, "owner": owner, "prevention": items}

