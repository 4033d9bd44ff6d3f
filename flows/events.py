"""The one place that names the Prefect resources and events of the runbook (DESIGN.md's contract).

Flows that emit and automations that listen both import these names; change them here only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect.events import emit_event
from prefect.events.schemas.events import Event

# --- services (issue 3's daemon and trader; the monitoring issue emits these) ---
SERVICE_RESOURCE_PREFIX = "crypto-agent.service."
BACKTEST_DAEMON_RESOURCE = "crypto-agent.service.backtest-daemon"
TRADER_RESOURCE = "crypto-agent.service.trader"
SERVICE_HEARTBEAT = "crypto-agent.service.heartbeat"
SERVICE_HEALTHY = "crypto-agent.service.healthy"
SERVICE_DEAD = "crypto-agent.service.dead"
SERVICE_HUNG = "crypto-agent.service.hung"
SERVICE_CPU_HIGH = "crypto-agent.service.cpu-high"
SERVICE_MEMORY_HIGH = "crypto-agent.service.memory-high"
SERVICE_CRASHED = "crypto-agent.service.crashed"
# Issue 5: what the proactive heartbeat automations (deployments/automations.py) name the detection they
# fire on, as the recovery's `event` parameter: no heartbeat event for heartbeat_missing_s, or for the
# runbook's heartbeat limit (heartbeat_max_age_s). No process emits them; the absence of heartbeats is the event.
HEARTBEAT_MISSING = "crypto-agent.service.heartbeat-missing"
HEARTBEAT_STALE = "crypto-agent.service.heartbeat-stale"
# issue 5: SERVICE_CRASHED is emitted by the health monitor only, once per crash recorded in the store
# (crypto_agent.monitor.claim_crashes), so the persistent-failures threshold counts each crash once.
# SERVICE_HEARTBEAT is emitted by the heartbeat relay (deployments/relay.py).

# --- the store ---
STORE_RESOURCE = "crypto-agent.store.main"
STORE_STALE = "crypto-agent.store.stale"
STORE_CORRUPT = "crypto-agent.store.corrupt"
STORE_OK = "crypto-agent.store.ok"
# Added by issue 4 (not in DESIGN.md's table yet): the daily update missed its deadline, and the
# database outgrew its storage limit.
STORE_UPDATE_LATE = "crypto-agent.store.update-late"
STORE_STORAGE_HIGH = "crypto-agent.store.storage-high"

# --- the monitor's dead man's switch ---
MONITOR_RESOURCE = "crypto-agent.monitor"
MONITOR_TICK = "crypto-agent.monitor.tick"
# Added by issue 5: the heartbeat relay ticks on its own resource, so each has its own dead man's switch.
RELAY_RESOURCE = "crypto-agent.monitor.heartbeat-relay"

# --- issue 10: detections that reach someone ---
# the backtest daemon wrote no result for backtest_results_max_age_s (the runbook's "results stale > 2 h")
SERVICE_RESULTS_STALE = "crypto-agent.service.results-stale"
# a service's log shows more than log_errors_per_min_max errors a minute (payload: the lines)
SERVICE_LOG_ERRORS = "crypto-agent.service.log-errors"
# the serving process ticks on its own resource, for its dead man's switch (deployments/serve.py)
SERVE_RESOURCE = "crypto-agent.monitor.serve"
# the stack's keeper (deployments/keeper.py): a part of the stack (server, serve, relay ...) died / was restarted
STACK_RESOURCE_PREFIX = "crypto-agent.stack."
STACK_PART_DEAD = "crypto-agent.stack.part-dead"
STACK_PART_RESTARTED = "crypto-agent.stack.part-restarted"
# a recovery still running past its budget (the scenario's ETA table)
RECOVERY_OVER_BUDGET = "crypto-agent.incident.over-budget"

# --- incidents ---
INCIDENT_RESOURCE_PREFIX = "crypto-agent.incident."
INCIDENT_OPENED = "crypto-agent.incident.opened"
INCIDENT_ESCALATED = "crypto-agent.incident.escalated"
INCIDENT_RESOLVED = "crypto-agent.incident.resolved"

# --- automations and deployments named outside prefect.yaml (issue 9: the chaos drills) ---
PERSISTENT_FAILURES_AUTOMATION = "crypto-agent/persistent-failures"  # deployments/automations.py creates it
# "<flow>/<deployment>" of prefect.yaml: the scheduled checks a drill runs now, as their schedule would.
MONITOR_DEPLOYMENT = "health-monitor/scheduled"
VALIDATION_DEPLOYMENT = "data-validation/daily"
INTEGRITY_DEPLOYMENT = "integrity-check/quick"


def service_resource(name: str) -> str:
    """The resource id of a service, e.g. 'backtest-daemon' -> crypto-agent.service.backtest-daemon."""
    return SERVICE_RESOURCE_PREFIX + name


# crypto_agent's service names and the names in their resource ids (issue 5).
SERVICE_RESOURCE_NAMES = {"backtest": "backtest-daemon", "trader": "trader"}


def resource_of_service(service: str) -> str:
    """The resource id of a crypto_agent service: 'backtest' -> crypto-agent.service.backtest-daemon."""
    return service_resource(SERVICE_RESOURCE_NAMES[service])


def service_of_resource(resource_id: str) -> str:
    """The crypto_agent service of a service resource id; ValueError for any other resource."""
    for service, name in SERVICE_RESOURCE_NAMES.items():
        if resource_id == service_resource(name):
            return service
    raise ValueError(f"{resource_id!r} is not the resource of a service ({', '.join(SERVICE_RESOURCE_NAMES)})")


def incident_resource(incident_id: int | str) -> str:
    """The resource id of an incident."""
    return f"{INCIDENT_RESOURCE_PREFIX}{incident_id}"


def utc_now_iso() -> str:
    """Now, UTC, ISO 8601: the `detected_at` of an event."""
    return datetime.now(UTC).isoformat()


def emit(
    event: str,
    resource_id: str,
    payload: dict[str, Any] | None = None,
    related: list[dict[str, str]] | None = None,
) -> Event | None:
    """Emit a runbook event on a resource, its payload stamped with `detected_at` (kept if given).

    Inside a flow or task run Prefect adds the run, flow and deployment as related resources.
    None when events are switched off in this process (no Prefect API configured).
    """
    body = dict(payload or {})
    body.setdefault("detected_at", utc_now_iso())
    resource = {"prefect.resource.id": resource_id, "prefect.resource.name": resource_id.rsplit(".", 1)[-1]}
    return emit_event(event=event, resource=resource, payload=body, related=related)
