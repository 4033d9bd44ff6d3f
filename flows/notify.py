"""Telling people: the state hooks every runbook flow carries, and a task to tell one escalation level."""

from __future__ import annotations

from typing import Any

from prefect import get_client, get_run_logger, task
from prefect.client.schemas.objects import FlowRun, State
from prefect.exceptions import ObjectNotFound
from prefect.flows import FlowStateHook
from prefect.utilities.urls import url_for
from sqlalchemy.exc import SQLAlchemyError

from blocks import load_block
from blocks.escalation import DEFAULT_ESCALATION, Escalation, NotificationUndelivered
from crypto_agent import alerts, incidents
from crypto_agent.alerts import watched_tags
from crypto_agent.errors import CryptoAgentError
from crypto_agent.settings import Settings


def load_escalation(name: str = DEFAULT_ESCALATION) -> Escalation:
    """The escalation block document `name`; NotificationUndelivered when it was never registered."""
    try:
        return load_block(Escalation, name)
    except (ValueError, ObjectNotFound) as exc:
        raise NotificationUndelivered(
            f"no escalation block {name!r} to notify through: {exc}",
            hint="run `crypto-agent blocks-register` to create the default one (local receiver), "
            "or save an Escalation block with Slack webhooks under that name",
        ) from None
    except Exception as exc:  # the Prefect API is down or refuses us: nobody can be told either
        raise NotificationUndelivered(
            f"cannot load the escalation block {name!r} from the Prefect API: {exc}",
            hint="check that the Prefect server is up (PREFECT_API_URL), then rerun",
        ) from exc


def flow_run_link(flow_run: FlowRun) -> str:
    """The flow run's page in the Prefect UI, or its id when no UI URL is configured."""
    return url_for(flow_run) or f"flow run id {flow_run.id} (no PREFECT_UI_URL configured)"


def state_message(flow: Any, flow_run: FlowRun, state: State, what: str) -> tuple[str, str]:
    """Subject and body telling that a flow run ended badly: which flow, which run, why, and where to look."""
    subject = f"[crypto-agent] {flow.name} {what}"
    body = "\n".join(
        [
            f"flow {flow.name}, run {flow_run.name} ({flow_run.id})",
            f"state: {state.name}: {state.message or 'no message'}",
            f"deployment: {flow_run.deployment_id or 'none (run directly)'}",
            f"details: {flow_run_link(flow_run)}",
        ]
    )
    return subject, body


JOB_WATCH_DEPLOYMENT = "job-watch/auto"


def job_watch_pages(flow_run: FlowRun) -> bool:
    """Whether job-watch (flows/job_watch.py) pages for this run's failure, so its hook stays quiet: a runbook
    job's deployment run, not a recovery, and job-watch deployed on this server (else the hook pages)."""
    if not watched_tags(flow_run.deployment_id is not None, tuple(flow_run.tags or ())):
        return False
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(JOB_WATCH_DEPLOYMENT)
    except Exception:  # noqa: BLE001 (not deployed, or the API cannot say: the hook pages, never silence)
        return False
    return True


def _tell_l1(flow: Any, flow_run: FlowRun, state: State, what: str) -> None:
    if job_watch_pages(flow_run):
        get_run_logger().info("job-watch pages for this %s run (L1, or L2 when it repeats)", what)
        return
    subject, body = state_message(flow, flow_run, state, what)
    load_escalation().notify("l1", subject, body)


def notify_failure(flow: Any, flow_run: FlowRun, state: State) -> None:
    """on_failure hook: tell L1 (on-call) that the flow run failed, with the reason and its UI link.

    An undeliverable message raises; Prefect then logs it as an error of the flow run.
    """
    _tell_l1(flow, flow_run, state, "failed")


def notify_crashed(flow: Any, flow_run: FlowRun, state: State) -> None:
    """on_crashed hook: tell L1 (on-call) that the flow run crashed (its process died or was killed)."""
    _tell_l1(flow, flow_run, state, "crashed")


# Every runbook flow carries these.
FAILURE_HOOKS: list[FlowStateHook[..., Any]] = [notify_failure]
CRASH_HOOKS: list[FlowStateHook[..., Any]] = [notify_crashed]


def retry_unless_delivered(task: Any, task_run: Any, state: State) -> bool:
    """retry_condition_fn of notify-level: a message a higher level took instead (the fallback) is not sent again."""
    from flows.common import failure_of

    failure = failure_of(state)
    return not (isinstance(failure, NotificationUndelivered) and failure.fell_back_to is not None)


@task(name="notify-level", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_delivered)
def notify_level(level: str, subject: str, body: str, escalation: str = DEFAULT_ESCALATION) -> None:
    """Tell one escalation level (l1, l2, l3); the task fails when the level's blocks could not deliver it (a
    higher level may have taken it instead: NotificationUndelivered.fell_back_to), and is not retried then."""
    delivery = load_escalation(escalation).notify(level, subject, body)
    logger = get_run_logger()
    for failed in delivery.failed:  # told, but not by every block of the level
        logger.error("%s: one block of %s did not deliver %r: %s", level.upper(), level.upper(), subject, failed)
    logger.info("told %s: %s", level.upper(), subject)


def silenced(cfg: Settings, resource: str, level: str, subject: str, *, incident_id: int | None = None,
             store: Any = None) -> bool:
    """Whether a silence in force holds this page about `resource` (a resource id or an alert key): then it is
    recorded in the silence (told once after it ends) and not sent. No incident log, no silence: False."""
    own = store is None
    try:
        if own:
            if not incidents.incidents_db_path(cfg).exists():
                return False
            store = incidents.open_incident_store(cfg)
        found = incidents.silences.silencing(store, resource)
        if found is None:
            return False
        incidents.silences.hold(store, found.id, resource=resource, level=level, subject=subject,
                                incident_id=incident_id)
        if incident_id is not None:
            incidents.add_action(store, incident_id, f"page-held-{level}",
                                 f"held by silence #{found.id} ({found.pattern}: {found.reason}) until "
                                 f"{incidents.iso(found.ends_at)}: {subject}")
    except (CryptoAgentError, SQLAlchemyError) as exc:  # the log is unreadable: page (never silence by accident)
        get_run_logger().warning("silences not checked (%s): paging", exc)
        return False
    finally:
        if own and store is not None:
            store.close()
    get_run_logger().info("held by silence #%d: %s %s", found.id, level.upper(), subject)
    return True


def page_episode(cfg: Settings, key: str, active: bool, level: str, subject: str = "", body: str = "") -> bool:
    """Page `level` about the condition `key` when it is new or its last page is page_repeat_after_s old, once
    for all the watchers (crypto_agent.alerts episodes in the incident log); not active ends the episode, so
    the next occurrence pages at once. True when paged. Without an incident log it pages (never silence)."""
    try:
        store = incidents.open_incident_store(cfg)
    except (CryptoAgentError, SQLAlchemyError):
        if active:
            notify_level(level, subject, body)
        return active
    try:
        alerts.ensure_episodes_table(store)
        step = alerts.episode_step(store, key, active, repeat_after_s=cfg.page_repeat_after_s, detail=subject)
        if active and step.page and silenced(cfg, key, level, subject, store=store):
            return False
        if not (active and step.page):
            if active:
                get_run_logger().info("not paged again: %s (paged %s time(s) this episode)", subject,
                                      step.episode.pages if step.episode else "?")
            return False
        try:
            notify_level(level, subject, body)
        except BaseException:
            alerts.unclaim_page(store, key, None)  # given back: the next watch pages
            raise
        return True
    finally:
        store.close()
