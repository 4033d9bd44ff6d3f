"""The automations prefect.yaml cannot say alone: they depend on settings, or act on something else than their
own deployment. Created or updated by name by `crypto-agent deploy` (`apply_automations`), never duplicated.

Where each automation of DESIGN.md's table lives (one place each):

| automation | where (its name) | action |
| --- | --- | --- |
| service dead | prefect.yaml, recover-daemon-crash/auto `triggers:` | run it |
| service hung / cpu-high | prefect.yaml, recover-process-hang/auto | run it |
| store stale | prefect.yaml, recover-stale-data/auto | run it |
| store corrupt | prefect.yaml, recover-db-corruption/auto | run it |
| heartbeat missing (proactive, `heartbeat_missing_s`) | `crypto-agent/heartbeat-missing` | recover-daemon-crash |
| heartbeat over the limit (the relay's service.hung) | prefect.yaml, recover-process-hang/auto | run it |
| limit + `heartbeat_stale_fallback_s` (proactive) | `crypto-agent/heartbeat-stale` | recover-daemon-crash |
| 3 daemon crashes within 24 h (threshold) | `crypto-agent/persistent-failures` | rollback-persistent-failures |
| health-monitor's switch (interval + `monitor_switch_grace_s`) | `crypto-agent/dead-mans-switch/health-monitor` | L2 |
| dead man's switch of the relay (3 x `relay_tick_s`, 30 s) | `crypto-agent/dead-mans-switch/heartbeat-relay` | L2 |
| serving process's switch (3 x `serve_tick_s`) | `crypto-agent/dead-mans-switch/serving-process` | L2 |

The names in `code` are declared here; the others come with the serving process (or `crypto-agent deploy`).

Flapping: an automation cannot deduplicate its runs. Each recovery flow serialises itself per
resource (a Prefect global concurrency limit) and joins the incident already open for its resource
(`incidents.open_or_join`), so an event arriving during a recovery ends as an "absorbed" run.
The proactive triggers fire once per outage, not once per missing beat. A deployment concurrency
limit in prefect.yaml (`concurrency_limit: {limit: 1, collision_strategy: ENQUEUE | CANCEL_NEW}`,
both supported by prefect 3.9.1) is deliberately not used: it is per deployment, not per resource
(the trader's recovery would queue behind the daemon's), and CANCEL_NEW drops the late event
instead of counting it in the open incident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect import get_client
from prefect.automations import (
    AutomationCore,
    EventTrigger,
    Posture,
    RunDeployment,
    SendNotification,
)
from prefect.events.schemas.automations import Automation
from prefect.exceptions import ObjectNotFound

from blocks.escalation import DEFAULT_ESCALATION, Escalation
from crypto_agent.errors import ConfigError, CryptoAgentError
from crypto_agent.settings import Settings, load_settings
from flows.events import (
    BACKTEST_DAEMON_RESOURCE,
    HEARTBEAT_MISSING,
    HEARTBEAT_STALE,
    MONITOR_RESOURCE,
    MONITOR_TICK,
    PERSISTENT_FAILURES_AUTOMATION,
    RELAY_RESOURCE,
    SERVE_RESOURCE,
    SERVICE_CRASHED,
    SERVICE_HEARTBEAT,
    SERVICE_RESOURCE_PREFIX,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
# Automations this module manages are named with this prefix; it deletes its own stale ones only.
PREFIX = "crypto-agent/"
# Prefect evaluates proactive triggers no finer than this.
MIN_PROACTIVE_WITHIN_S = 10.0

DAEMON_CRASH_DEPLOYMENT = "recover-daemon-crash/auto"
ROLLBACK_DEPLOYMENT = "rollback-persistent-failures/auto"
MONITOR_FLOW = "health-monitor"

# The triggering event as the recovery flows' `event` parameter (prefect.yaml's triggers pass the
# same; a test keeps them equal). A value that is one `{{ expr }}` keeps its type, so the payload
# arrives as a dict; ids and times go through `string` because UUIDs and datetimes are not JSON.
EVENT_PARAMETER: dict[str, str] = {
    "id": "{{ event.id | string }}",
    "event": "{{ event.event }}",
    "occurred": "{{ event.occurred | string }}",
    "resource": "{{ event.resource.id }}",
    "payload": "{{ event.payload }}",
}


# The `event` parameter of the proactive heartbeat automations: a proactive trigger fires on the
# absence of events, so it names that detection (HEARTBEAT_MISSING, HEARTBEAT_STALE of flows/events.py),
# dated by the firing; id, resource and payload are of the last heartbeat seen (payload.pid and
# payload.epoch say which instance fell silent, and when).


def silence_parameter(name: str) -> dict[str, str]:
    """The `event` parameter of a proactive heartbeat automation: the detection `name`, dated by the firing."""
    return {**EVENT_PARAMETER, "event": name, "occurred": "{{ firing.triggered | string }}"}


HEARTBEAT_MISSING_PARAMETER = silence_parameter(HEARTBEAT_MISSING)


class AutomationsFailed(CryptoAgentError):
    """An automation could not be created: a deployment or block it needs is missing."""


@dataclass
class AppliedAutomations:
    """What `apply_automations` did, by automation name."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<name>: why"


# --- the automations ---


def silence(name: str, description: str, within_s: float, detection: str, deployment_id: UUID) -> AutomationCore:
    """Proactive: a service with no heartbeat event for `within_s` runs the deployment, its `event` the `detection`.

    `after` and `expect` are the same event and the trigger is per resource, so it fires once per
    outage and service, never before a service's first heartbeat.
    """
    return AutomationCore(
        name=name,
        description=description,
        trigger=EventTrigger(
            posture=Posture.Proactive,
            match={"prefect.resource.id": f"{SERVICE_RESOURCE_PREFIX}*"},
            after={SERVICE_HEARTBEAT},
            expect={SERVICE_HEARTBEAT},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=max(MIN_PROACTIVE_WITHIN_S, within_s)),
        ),
        actions=[RunDeployment(
            source="selected", deployment_id=deployment_id,
            parameters={"service": "{{ event.payload.service }}", "event": silence_parameter(detection)},
        )],
    )


def heartbeat_missing(settings: Settings, deployment_id: UUID) -> AutomationCore:
    """Proactive: a service whose heartbeat events stop for heartbeat_missing_s runs recover-daemon-crash.

    It fires once per outage and service; the recovery triages dead from hung.
    """
    return silence(
        f"{PREFIX}heartbeat-missing",
        f"No heartbeat event of a service for {settings.heartbeat_missing_s:g} s: run the daemon-crash "
        "recovery, which tells a dead service from a hung one (runbook scenarios 1 and 4).",
        settings.heartbeat_missing_s, HEARTBEAT_MISSING, deployment_id,
    )


def heartbeat_stale(settings: Settings, deployment_id: UUID) -> AutomationCore:
    """Proactive: no heartbeat event for heartbeat_max_age_s (the runbook's 2 min) plus heartbeat_stale_fallback_s
    runs recover-daemon-crash again.

    The first automation fires after heartbeat_missing_s: a dead service is restarted then, but a
    live one is not yet over the runbook's heartbeat limit, so its triage says "running". At the limit
    the relay emits service.hung and recover-process-hang runs at once; this one is the fallback for a
    relay that is away: it fires heartbeat_stale_fallback_s later, when the same triage finds a live
    process hung and hands it to recover-process-hang (not at the next monitor round). Firing at the
    limit itself would start a second flow run beside the relay's, which only slows the recovery down.
    """
    within = settings.heartbeat_max_age_s + settings.heartbeat_stale_fallback_s
    return silence(
        f"{PREFIX}heartbeat-stale",
        f"No heartbeat event of a service for {within:g} s (the heartbeat limit, {settings.heartbeat_max_age_s:g} "
        f"s, plus {settings.heartbeat_stale_fallback_s:g} s for the relay's own service.hung): run the "
        "daemon-crash recovery, which finds a live one hung and recovers it (runbook scenario 4).",
        within, HEARTBEAT_STALE, deployment_id,
    )


def persistent_failures(settings: Settings, deployment_id: UUID) -> AutomationCore:
    """Threshold: persistent_failures crash events of the daemon within persistent_window_hours run the rollback."""
    return AutomationCore(
        name=PERSISTENT_FAILURES_AUTOMATION,
        description=f"{settings.persistent_failures} or more crashes of the backtest daemon within "
        f"{settings.persistent_window_hours:g} h: roll back to the {settings.rollback_hours:g} h backup "
        "(runbook scenario 5).",
        trigger=EventTrigger(
            posture=Posture.Reactive,
            match={"prefect.resource.id": BACKTEST_DAEMON_RESOURCE},
            expect={SERVICE_CRASHED},
            threshold=settings.persistent_failures,
            within=timedelta(hours=settings.persistent_window_hours),
        ),
        actions=[RunDeployment(
            source="selected", deployment_id=deployment_id,
            parameters={"service": "backtest", "event": dict(EVENT_PARAMETER)},
        )],
    )


def dead_mans_switch(name: str, resource_id: str, within: timedelta, l2_block_id: UUID) -> AutomationCore:
    """Proactive: no tick from `resource_id` for `within` pages L2 through the escalation's L2 block."""
    minutes = within.total_seconds() / 60
    silent = f"{minutes:g} min" if minutes >= 1 else f"{within.total_seconds():g} s"
    return AutomationCore(
        name=f"{PREFIX}dead-mans-switch/{name}",
        description=f"The {name} has not ticked for {silent}: monitoring itself is down; page L2.",
        trigger=EventTrigger(
            posture=Posture.Proactive,
            match={"prefect.resource.id": resource_id},
            after={MONITOR_TICK},
            expect={MONITOR_TICK},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=within,
        ),
        actions=[SendNotification(
            block_document_id=l2_block_id,
            subject=f"[crypto-agent] the {name} is silent: monitoring is blind",
            body=(
                f"what happened: the {name} has sent no tick for {silent} (last one at "
                "{{ event.occurred }}), so failures may go undetected.\n"
                f"what was done: nothing automatic; this is the dead man's switch.\n"
                f"what to do: check the process that runs the {name} (the serving process or worker, "
                "or `python -m deployments.relay`) and the Prefect server; "
                "the automation resets by itself at the next tick."
            ),
        )],
    )


# --- what they refer to ---


def monitor_interval(project_dir: Path = PROJECT_DIR) -> timedelta:
    """The interval of the health-monitor deployment's schedule in prefect.yaml (its one source of truth)."""
    from prefect.server.schemas.schedules import CronSchedule
    from prefect.utilities.asyncutils import run_coro_as_sync

    config = yaml.safe_load((project_dir / "prefect.yaml").read_text(encoding="utf-8"))
    for dep in config.get("deployments") or []:
        if dep.get("entrypoint", "").endswith(":health_monitor") and dep.get("schedules"):
            sched = dep["schedules"][0]
            cron = CronSchedule(cron=sched["cron"], timezone=sched.get("timezone", "UTC"))
            dates: list[datetime] = run_coro_as_sync(cron.get_dates(n=3, start=datetime(2026, 1, 1, tzinfo=UTC)))
            # plain seconds: Prefect's DateTime subtracts into its own Interval type
            return timedelta(seconds=max(b.timestamp() - a.timestamp() for a, b in pairwise(dates)))
    raise ConfigError(
        f"prefect.yaml in {project_dir} has no scheduled health-monitor deployment",
        hint="add the health-monitor deployment with its cron schedule (e.g. '*/5 * * * *')",
    )


def deployment_ids(names: list[str]) -> dict[str, UUID]:
    """The ids of deployments named '<flow>/<deployment>'; AutomationsFailed naming those missing."""
    found: dict[str, UUID] = {}
    missing = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                found[name] = client.read_deployment_by_name(name).id
            except ObjectNotFound:
                missing.append(name)
    if missing:
        raise AutomationsFailed(
            f"deployment(s) {', '.join(missing)} not found on the Prefect server",
            hint="deploy prefect.yaml first (`crypto-agent deploy` does both, in that order)",
        )
    return found


def escalation_block_id(level: str, escalation: str = DEFAULT_ESCALATION) -> UUID:
    """The block document id of one level's notification block inside the escalation block `escalation`."""
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(escalation, Escalation.get_block_type_slug())
        except ObjectNotFound:
            raise AutomationsFailed(
                f"no escalation block {escalation!r} to page {level.upper()} through",
                hint="run `crypto-agent blocks-register` first (it creates the default one)",
            ) from None
    reference = (document.block_document_references or {}).get(level) or {}
    block_id = (reference.get("block_document") or {}).get("id")
    if block_id is None:
        raise AutomationsFailed(
            f"the escalation block {escalation!r} has no saved {level} block",
            hint="save each level as a block document of its own (blocks-register does), then rerun",
        )
    return UUID(str(block_id))


DEAD_MANS_SWITCHES = (f"{PREFIX}dead-mans-switch/{MONITOR_FLOW}", f"{PREFIX}dead-mans-switch/heartbeat-relay",
                      f"{PREFIX}dead-mans-switch/serving-process")


def desired_automations(
    settings: Settings, project_dir: Path = PROJECT_DIR
) -> tuple[list[AutomationCore], dict[str, str]]:
    """Every automation this module manages, built against the deployments and blocks on the server.

    Returns them, and those that cannot be built yet with the reason: the dead man's switches need
    the escalation block (`crypto-agent blocks-register`). A missing deployment is an error.
    """
    ids = deployment_ids([DAEMON_CRASH_DEPLOYMENT, ROLLBACK_DEPLOYMENT])
    wanted = [
        heartbeat_missing(settings, ids[DAEMON_CRASH_DEPLOYMENT]),
        persistent_failures(settings, ids[ROLLBACK_DEPLOYMENT]),
    ]
    if settings.heartbeat_max_age_s > settings.heartbeat_missing_s:  # else the first one covers it
        wanted.append(heartbeat_stale(settings, ids[DAEMON_CRASH_DEPLOYMENT]))
    try:
        l2 = escalation_block_id("l2")
    except AutomationsFailed as exc:
        why = exc.message + "; run `crypto-agent blocks-register`, then deploy again"
        return wanted, dict.fromkeys(DEAD_MANS_SWITCHES, why)
    n = settings.dead_mans_switch_intervals
    relay_within = timedelta(seconds=max(MIN_PROACTIVE_WITHIN_S, n * settings.relay_tick_s))
    serve_within = timedelta(seconds=max(MIN_PROACTIVE_WITHIN_S, n * settings.serve_tick_s))
    # issue 10: the monitor's switch fires a grace after the round that did not come, not n intervals later
    monitor_within = monitor_interval(project_dir) + timedelta(seconds=settings.monitor_switch_grace_s)
    wanted += [
        dead_mans_switch(MONITOR_FLOW, MONITOR_RESOURCE, monitor_within, l2),
        dead_mans_switch("heartbeat-relay", RELAY_RESOURCE, relay_within, l2),
        dead_mans_switch("serving-process", SERVE_RESOURCE, serve_within, l2),
    ]
    return wanted, {}


def apply_automations(settings: Settings | None = None, project_dir: Path = PROJECT_DIR) -> AppliedAutomations:
    """Create or update (by name) every automation of this module; delete duplicates and our stale ones.

    One that cannot be built yet (see desired_automations) is left as it is and reported as skipped.
    """
    settings = settings or load_settings()
    wanted, skipped = desired_automations(settings, project_dir)
    done = AppliedAutomations(skipped=[f"{name}: {why}" for name, why in skipped.items()])
    with get_client(sync_client=True) as client:
        ours: dict[str, list[Automation]] = {}
        for automation in client.read_automations():
            if automation.name.startswith(PREFIX):
                ours.setdefault(automation.name, []).append(automation)
        for desired in wanted:
            existing = ours.pop(desired.name, [])
            if existing:
                keep, *duplicates = existing
                client.update_automation(keep.id, desired)
                if not keep.enabled and desired.name in DEAD_MANS_SWITCHES:  # paused for a planned stop: re-armed
                    client.resume_automation(keep.id)  # (an automation paused by hand stays paused)
                done.updated.append(desired.name)
                for extra in duplicates:
                    client.delete_automation(extra.id)
                    done.deleted.append(extra.name)
            else:
                client.create_automation(desired)
                done.created.append(desired.name)
        for stale in (a for name, group in ours.items() if name not in skipped for a in group):
            client.delete_automation(stale.id)
            done.deleted.append(stale.name)
    return done


def pause_dead_mans_switches() -> list[str]:
    """Before a deliberate stop of the stack (`down`, Ctrl-C): pause the dead man's switches, so a planned
    outage pages nobody (the silence they wait for would otherwise page L2 as soon as the server is back);
    `up` applies them again, enabled, once the relay and the serving process tick. The names paused."""
    paused = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if automation.name in DEAD_MANS_SWITCHES and automation.enabled:
                client.pause_automation(automation.id)
                paused.append(automation.name)
    return paused


def automation_summary(automation: AutomationCore | Automation) -> dict[str, Any]:
    """Name, trigger kind and window, and actions of an automation, for people and tests."""
    trigger = automation.trigger
    return {
        "name": automation.name,
        "posture": getattr(trigger, "posture", None),
        "within_s": getattr(getattr(trigger, "within", None), "total_seconds", lambda: None)(),
        "threshold": getattr(trigger, "threshold", None),
        "actions": [a.type for a in automation.actions],
        "enabled": automation.enabled,
    }
