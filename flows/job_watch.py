"""job-watch: a runbook job's run that failed, crashed or is late reaches someone, once, with what to do.

Its automation (prefect.yaml, `job-watch/auto`) fires on Prefect's own flow-run events
(prefect.flow-run.Failed / Crashed / Late) of runs tagged `runbook`; the flow reads the run and the
previous run of the same deployment from the API and crypto_agent.alerts decides: L1 on a first bad
run, L2 when the previous run also went bad (the job fails twice in a row, or misses its slot again).
A Late run is paged only once it is `job_late_after_s` (5 min) past its slot and still not started.

One page per problem, not per run: the first bad run of a job pages L1 and the first repeat pages
L2; further bad runs of the same job are quiet until `page_repeat_after_s` (a job run every minute,
like the window guard, does not page every minute), and a completed run in between starts over. The
state hooks of flows/notify.py stay quiet for the runs this flow pages for.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from crypto_agent import alerts
from crypto_agent.alerts import JOB_KINDS, JobRun
from crypto_agent.errors import InputError
from flows.common import run_settings
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, page_episode

FLOW_RUN_PREFIX = "prefect.flow-run."
EVENT_PREFIX = "prefect.flow-run."
PREVIOUS_RUNS = 20  # how far back the previous outcome of the same deployment is looked for
REPEAT_SUFFIX = ":repeat"
TIMEOUT_S = 900  # a Late run is waited for up to job_late_after_s (5 min) before it is paged


def flow_run_id_of(value: str) -> str:
    """The flow run id from an event's resource id ("prefect.flow-run.<id>") or the id itself."""
    return value[len(FLOW_RUN_PREFIX):] if value.startswith(FLOW_RUN_PREFIX) else value


def kind_of(value: str) -> str:
    """"Failed", "Crashed" or "Late" from an event name ("prefect.flow-run.Failed") or the state name."""
    kind = value[len(EVENT_PREFIX):] if value.startswith(EVENT_PREFIX) else value
    if kind not in JOB_KINDS:
        raise InputError(f"job-watch: {value!r} is not a failed, crashed or late run event",
                         hint=f"pass one of {', '.join(JOB_KINDS)} (or prefect.flow-run.<that>)")
    return kind


def job_run(client: Any, flow_run: Any, names: dict[Any, str]) -> JobRun:
    """A JobRun of a Prefect flow run (names: flow id -> flow name, filled as flows are read)."""
    from prefect.utilities.urls import url_for

    if flow_run.flow_id not in names:
        names[flow_run.flow_id] = client.read_flow(flow_run.flow_id).name
    flow_name = names[flow_run.flow_id]
    deployment = None
    if flow_run.deployment_id is not None:
        deployment = f"{flow_name}/{client.read_deployment(flow_run.deployment_id).name}"
    state = flow_run.state
    start = flow_run.expected_start_time or flow_run.next_scheduled_start_time
    return JobRun(
        id=str(flow_run.id), name=flow_run.name, flow=flow_name, deployment=deployment, tags=tuple(flow_run.tags),
        state_type=getattr(getattr(state, "type", None), "value", "UNKNOWN"),
        state_name=getattr(state, "name", "") or "", state_message=getattr(state, "message", None),
        expected_start=start.timestamp() if start is not None else None, link=url_for(flow_run) or "",
    )


@task(name="read-job-run", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def read_job_runs(flow_run_id: str) -> tuple[JobRun, list[JobRun]]:
    """The run, and the newest runs of its deployment (for the previous outcome)."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    names: dict[Any, str] = {}
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(UUID(flow_run_id))
        current = job_run(client, run, names)
        others: list[JobRun] = []
        if run.deployment_id is not None:
            found = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[run.deployment_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=PREVIOUS_RUNS)
            others = [job_run(client, r, names) for r in found if str(r.id) != str(run.id)]
    return current, others


def staleness(cfg: Any) -> str | None:
    """How the store is past its staleness limit (H1 < 6 h, H4 < 24 h), or None (fresh, or it cannot be read:
    the data-validation and the recoveries deal with that)."""
    from crypto_agent.quality import check_data
    from crypto_agent.store import open_store

    try:
        with open_store(cfg) as store:
            report = check_data(store, cfg)
    except Exception as exc:  # noqa: BLE001 (a page without the L3 detail beats no page)
        get_run_logger().warning("staleness not checked: %s", exc)
        return None
    stale = report.stale_series
    if not stale:
        return None
    shown = ", ".join(f"{s.symbol} {s.timeframe} "
                      + ("no candle" if s.age_hours is None else f"{s.age_hours:.1f} h old") for s in stale[:5])
    return f"{len(stale)} stale series: {shown}" + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")


@flow(name="job-watch", log_prints=True, timeout_seconds=TIMEOUT_S, on_failure=FAILURE_HOOKS,
      on_crashed=CRASH_HOOKS)
def job_watch(flow_run_id: str = "", kind: str = "", settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Page for a runbook job's failed, crashed or late run (L1 first, L2 when it repeats), once per problem."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    if not flow_run_id:
        raise InputError("job-watch: no flow_run_id", hint="it runs from its automation (prefect.yaml, "
                         "job-watch/auto); by hand pass flow_run_id=<id> kind=Failed|Crashed|Late")
    run_id, kind = flow_run_id_of(flow_run_id), kind_of(kind)
    try:
        UUID(run_id)
    except ValueError:
        raise InputError(f"job-watch: {flow_run_id!r} is not a flow run id",
                         hint="pass the id of the run (or the event's resource, prefect.flow-run.<id>)") from None
    run, others = read_job_runs(run_id)
    if kind == alerts.JOB_LATE and alerts.watched(run):
        wait = min(alerts.late_wait_s(run, cfg.job_late_after_s), cfg.job_late_after_s)
        if wait > 0:  # Prefect calls a run late after seconds; the runbook after job_late_after_s
            logger.info("%s is late; paged if it has not started in %.0f s", run.name, wait)
            time.sleep(wait)
            run, others = read_job_runs(run_id)
    previous = alerts.previous_outcome(run, others)
    alert = alerts.job_alert(kind, run, previous, late_after_s=cfg.job_late_after_s,
                             stale=staleness(cfg) if run.flow in alerts.DATA_UPDATE_FLOWS else None)
    result: dict[str, Any] = {"flow_run_id": run.id, "deployment": run.deployment, "kind": kind,
                              "level": None, "paged": False, "reason": ""}
    if alert is None:
        result["reason"] = ("not a watched runbook job run" if not alerts.watched(run)
                            else f"{run.name} is no longer late ({run.state_name})")
        logger.info("nobody paged: %s", result["reason"])
        return result
    result["level"] = alert.level
    key = f"job:{run.deployment}"
    if not alert.payload["repeat"]:  # a first bad run after a good one: a new problem, paged at once
        for stale in (key, key + REPEAT_SUFFIX):
            page_episode(cfg, stale, False, alert.level)
    if not page_episode(cfg, key + REPEAT_SUFFIX if alert.payload["repeat"] else key, True, alert.level,
                        alert.subject, alert.body):
        result["reason"] = f"already paged for {run.deployment} this episode"
        logger.info("nobody paged: %s", result["reason"])
        return result
    result.update(paged=True, reason=alert.subject)
    return result
