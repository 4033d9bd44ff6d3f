"""The runbook's monitoring as flows: health-monitor (every 5 minutes, down to 1) and backtest-window-guard
(every minute, 23:30-01:30 UTC). Thin flows over crypto_agent.monitor and crypto_agent.guard, which decide;
the flows probe, record, emit the events the automations listen for, act and tell people."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent import alerts, health, incidents, priority
from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.guard import (
    BACKTEST,
    GUARD_NAME,
    GuardAction,
    GuardDecision,
    Stage,
    WindowBudget,
    WindowUsage,
    backtest_stage,
    current_window,
    decide,
    hold_until,
    pause_backtest,
    renice_backtest,
    resume_backtest,
    stop_backtest,
)
from crypto_agent.holds import HOLD_STOPPED, read_hold, release_hold
from crypto_agent.monitor import Assessment, Condition, assess, claim_crashes
from crypto_agent.process import inspect as inspect_process
from crypto_agent.process import service_spec, start
from crypto_agent.service import SERVICE_NAMES
from crypto_agent.settings import Settings
from crypto_agent.store import Store, open_store
from crypto_agent.storelock import is_locked, lock_path
from flows.common import run_settings
from flows.daily import check_data_quality, stale_event_payload
from flows.events import (
    MONITOR_RESOURCE,
    MONITOR_TICK,
    SERVICE_CPU_HIGH,
    SERVICE_CRASHED,
    SERVICE_DEAD,
    SERVICE_HEALTHY,
    SERVICE_HUNG,
    SERVICE_LOG_ERRORS,
    SERVICE_MEMORY_HIGH,
    SERVICE_RESULTS_STALE,
    STORE_CORRUPT,
    STORE_OK,
    STORE_RESOURCE,
    STORE_STALE,
    emit,
    resource_of_service,
)
from flows.maintenance import check_store_integrity, integrity_event_payload
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, notify_level

# Tasks that look at or act on live processes never reuse a result (NO_CACHE): the world moves.

# The event each condition of a service is reported with; HELD and DEGRADED have none.
CONDITION_EVENTS: dict[Condition, str] = {
    Condition.HEALTHY: SERVICE_HEALTHY,
    Condition.DEAD: SERVICE_DEAD,
    Condition.HUNG: SERVICE_HUNG,
    Condition.CPU_HIGH: SERVICE_CPU_HIGH,
    Condition.MEMORY_HIGH: SERVICE_MEMORY_HIGH,
}


def validate_services(services: list[str] | None) -> list[str]:
    """The services to watch (default: all); InputError naming an unknown one."""
    names = list(services) if services else list(SERVICE_NAMES)
    unknown = [s for s in names if s not in SERVICE_NAMES]
    if unknown:
        raise InputError(f"unknown service(s) {', '.join(unknown)}", hint=f"use: {', '.join(SERVICE_NAMES)}")
    return names


@contextlib.contextmanager
def existing_store(cfg: Settings) -> Iterator[Store | None]:
    """The store when its database exists and no recovery holds it (db/LOCKED), else None; never creates one."""
    if not cfg.db_path.exists() or is_locked(cfg.db_path):
        yield None
        return
    try:
        store = open_store(cfg)
    except (CryptoAgentError, SQLAlchemyError) as exc:
        get_run_logger().warning("the store %s cannot be opened: %s", cfg.db_path, exc)
        yield None
        return
    try:
        yield store
    finally:
        store.close()


# --- health-monitor ---


def end_guard_hold(cfg: Settings) -> str:
    """Undo the window guard's throttle: SIGCONT what it paused, start again what it stopped; what was done."""
    hold = read_hold(BACKTEST, cfg, include_ended=True)
    if hold is None or hold.by != GUARD_NAME:
        return "no hold of the window guard"
    if hold.kind == HOLD_STOPPED:
        release_hold(BACKTEST, cfg, by=GUARD_NAME)
        with existing_store(cfg) as store:
            started = start(service_spec(BACKTEST, cfg), cfg, store=store)
        return f"backtest started again after the window (PID {started.pid})"
    resumed = resume_backtest(cfg)
    return "backtest resumed (SIGCONT)" if resumed else "the guard's hold released (no paused process left)"


@task(name="end-expired-guard-hold", cache_policy=NO_CACHE, timeout_seconds=120)
def end_expired_guard_hold(settings: dict[str, Any] | None) -> str | None:
    """End a window-guard throttle whose hold is past its end (the guard's last run of the window was missed)."""
    cfg = run_settings(settings)
    hold = read_hold(BACKTEST, cfg, include_ended=True)
    if hold is None or hold.by != GUARD_NAME or hold.in_force():
        return None
    done = end_guard_hold(cfg)
    get_run_logger().warning("the window guard's hold on the backtest ended at %s: %s", hold.until, done)
    return done


@task(name="probe-service", cache_policy=NO_CACHE, timeout_seconds=300)
def probe_service(service: str, settings: dict[str, Any] | None) -> Assessment:
    """Probe a service, keep the sample in the store, and assess it (with its CPU history and hold)."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    report = health.probe(service, cfg)
    cpu_high = False
    with existing_store(cfg) as store:
        if store is not None:
            try:
                if not health.record(store, report):
                    logger.warning("the store is locked: the %s sample was not kept", service)
                cpu_high = health.cpu_high_for(
                    store, service, minutes=cfg.cpu_spike_minutes, limit=cfg.cpu_max_pct, now=report.checked_at
                )
            except SQLAlchemyError as exc:  # a damaged or busy store must not blind the probe
                logger.warning("the %s sample was not kept: %s", service, exc)
    assessment = assess(report, cfg, cpu_high=cpu_high, hold=read_hold(service, cfg))
    logger.info("%s: %s (%s)", service, ", ".join(c.value for c in assessment.conditions),
                "; ".join(assessment.reasons) or report.summary)
    return assessment


@task(name="release-stale-yield", cache_policy=NO_CACHE, timeout_seconds=120)
def release_stale_yield(settings: dict[str, Any] | None, trader_healthy: bool) -> str | None:
    """Withdraw a live-trading-first request left behind (its recovery failed or ended without releasing it)
    once the trader is HEALTHY and the incident that asked is closed; what was released, None when nothing."""
    cfg = run_settings(settings)
    request = priority.yield_request(cfg)
    if request is None or not trader_healthy:
        return None
    incident_open = False
    if request.incident_id is not None:
        try:
            log_store = incidents.open_incident_store(cfg)
            try:
                incident_open = incidents.get(log_store, request.incident_id).is_open
            finally:
                log_store.close()
        except CryptoAgentError:  # no such incident: nobody works on it
            incident_open = False
        except SQLAlchemyError as exc:  # cannot tell: keep the request (live trading first)
            get_run_logger().warning("the yield request stays: incident #%s cannot be read: %s",
                                     request.incident_id, exc)
            return None
    if not priority.should_release(request, trader_healthy, incident_open):
        return None
    priority.release_yield(cfg)
    done = f"the trader is HEALTHY and its incident is closed: the backtest resumes (request {request.description})"
    get_run_logger().info("%s", done)
    return done


@task(name="alert-service", cache_policy=NO_CACHE, timeout_seconds=120)
def alert_service(assessment: Assessment, settings: dict[str, Any] | None) -> list[str]:
    """What no recovery acts on still reaches someone: log errors over the limit -> L1 with the lines; the
    daemon's results stale -> its event (the hang recovery's triage). Once per episode (crypto_agent.alerts),
    repeated at most every page_repeat_after_s; the event names emitted."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    report = assessment.report
    service = assessment.service
    spec = service_spec(service, cfg)
    emitted: list[str] = []
    try:
        log_store = incidents.open_incident_store(cfg)
    except (CryptoAgentError, SQLAlchemyError) as exc:
        logger.warning("alerts of %s not checked: the incident log cannot be opened: %s", service, exc)
        return emitted
    try:
        alerts.ensure_episodes_table(log_store)
        lines = health.recent_error_lines(spec.log, max_lines=cfg.log_error_lines_max) \
            if report.log_errors_per_min else []
        alert = alerts.log_errors_alert(service, report.log_errors_per_min, cfg.log_errors_per_min_max, lines,
                                        log_path=str(spec.log), pid=report.pid)
        step = alerts.episode_step(log_store, alerts.log_errors_key(service), alert is not None,
                                   repeat_after_s=cfg.page_repeat_after_s, detail=alert.subject if alert else "")
        if alert is not None and step.page:
            emit(SERVICE_LOG_ERRORS, resource_of_service(service), alert.payload)
            emitted.append(SERVICE_LOG_ERRORS)
            try:
                notify_level(alert.level, alert.subject, alert.body)
            except CryptoAgentError as exc:  # undelivered: given back, so the next round pages again
                alerts.unclaim_page(log_store, alert.key, None)
                logger.error("L1 could not be told of the %s log errors (told again next round): %s", service, exc)
        if service == BACKTEST:
            stale = None
            with existing_store(cfg) as store:
                if store is not None:
                    try:
                        newest = health.newest_backtest_result_at(store)
                    except SQLAlchemyError as exc:
                        logger.warning("the age of the backtest results is unknown: %s", exc)
                    else:
                        record = inspect_process(spec).record
                        stale = alerts.results_stale(
                            alive=report.alive, started_at=record.started_at if record else None,
                            newest_result_at=newest, heartbeat_state=report.heartbeat_state,
                            hold=read_hold(service, cfg), max_age_s=cfg.backtest_results_max_age_s)
            step = alerts.episode_step(log_store, alerts.results_stale_key(service), stale is not None,
                                       repeat_after_s=cfg.page_repeat_after_s,
                                       detail=stale.reason if stale else "")
            if stale is not None and step.page:
                emit(SERVICE_RESULTS_STALE, resource_of_service(service),
                     {**assessment.payload(), **stale.payload()})
                emitted.append(SERVICE_RESULTS_STALE)
                logger.warning("%s: %s", service, stale.reason)
    finally:
        log_store.close()
    return emitted


def emit_assessment(assessment: Assessment) -> list[str]:
    """Emit the events of a service's conditions on its resource; the event names emitted."""
    resource = resource_of_service(assessment.service)
    payload = assessment.payload()
    emitted = []
    for condition in assessment.conditions:
        name = CONDITION_EVENTS.get(condition)
        if name is not None:
            emit(name, resource, payload)
            emitted.append(name)
    return emitted


@task(name="report-crashes", cache_policy=NO_CACHE, timeout_seconds=120)
def report_crashes(services: list[str], settings: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Emit crypto-agent.service.crashed once for each crash recorded and not yet reported."""
    cfg = run_settings(settings)
    with existing_store(cfg) as store:
        if store is None:
            return []
        try:
            claimed = claim_crashes(store, services, window_hours=cfg.persistent_window_hours)
        except SQLAlchemyError as exc:
            get_run_logger().warning("crashes not reported this time: %s", exc)
            return []
    reported = []
    for row in claimed:
        payload = {
            "service": row["service"],
            "pid": row["pid"],
            "instance": row["instance"],
            "crashed_at": datetime.fromtimestamp(row["at"] / 1000, UTC).isoformat(),
            "recorded_by": row["source"],
            "detail": row["detail"],
        }
        emit(SERVICE_CRASHED, resource_of_service(row["service"]), payload)
        reported.append(payload)
    return reported


def check_store(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The cheap store checks of the scheduled jobs (staleness, coverage, continuity; quick_check) and their events."""
    cfg = run_settings(settings)
    if not cfg.db_path.exists():
        return {"skipped": f"no database at {cfg.db_path} yet"}
    if is_locked(cfg.db_path):
        return {"skipped": f"{lock_path(cfg.db_path)} exists: a recovery holds the store"}
    integrity = check_store_integrity(settings, False)
    if not integrity.ok:
        emit(STORE_CORRUPT, STORE_RESOURCE, integrity_event_payload(integrity, cfg.db_path))
        # a damaged database cannot be judged for staleness; the corruption recovery comes first
        return {"integrity": integrity.mode, "ok": False, "events": [STORE_CORRUPT]}
    quality = check_data_quality(settings)
    if not quality.ok:
        emit(STORE_STALE, STORE_RESOURCE, stale_event_payload(quality))
        return {"integrity": integrity.mode, "ok": False, "reasons": quality.reasons[:10], "events": [STORE_STALE]}
    emit(STORE_OK, STORE_RESOURCE, {"check": "health-monitor", "coverage": round(quality.coverage, 6)})
    return {"integrity": integrity.mode, "ok": True, "events": [STORE_OK]}


def clear_what_cleared(summary: dict[str, Any], settings: dict[str, Any] | None) -> list[int]:
    """The incidents waiting for a person whose condition this round saw gone: no longer needing one, and the
    levels that were paged told once that it cleared; their ids."""
    cfg = run_settings(settings)
    healthy = {resource_of_service(n) for n, s in summary["services"].items() if "healthy" in s["conditions"]}
    store = summary.get("store") or {}
    sound = bool(store.get("integrity")) and (store.get("ok") is True or store.get("events") == [STORE_STALE])
    fresh = store.get("ok") is True
    try:
        log_store = incidents.open_incident_store(cfg)
    except (CryptoAgentError, SQLAlchemyError):
        return []
    cleared: list[int] = []
    try:
        for inc in incidents.needing_person(log_store):
            why = incidents.condition_cleared(inc, healthy_resources=healthy, store_sound=sound, store_fresh=fresh)
            if why is None:
                continue
            done = incidents.clear_needs_person(log_store, inc.id, by="the health monitor", note=why)
            cleared.append(done.id)
            sc = incidents.scenario(done.scenario)
            for level in done.levels_told or ["l1"]:
                try:
                    notify_level(level, f"[crypto-agent] incident #{done.id} cleared: {sc.title} ({done.resource})",
                                 f"{why}: it no longer needs a person (seen by the health monitor). It was: "
                                 f"{done.summary or done.root_cause or 'no summary'}")
                except CryptoAgentError as exc:
                    get_run_logger().warning("%s not told that incident #%d cleared: %s", level.upper(), done.id, exc)
    finally:
        log_store.close()
    return cleared


@flow(
    name="health-monitor",
    description="Probe every service, keep the samples, emit dead / hung / cpu-high / memory-high / healthy / "
    "crashed and the store's stale / corrupt events, then the monitor's tick (runbook: every 5 minutes).",
    timeout_seconds=240,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def health_monitor(
    services: list[str] | None = None,
    store_checks: bool = True,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One round of monitoring; the events it emits run the recoveries (it never fails for what it finds)."""
    names = validate_services(services)
    summary: dict[str, Any] = {"services": {}, "crashes": [], "store": None, "events": []}
    try:
        end_expired_guard_hold(settings)
        for name in names:
            assessment = probe_service(name, settings)
            emitted = emit_assessment(assessment)
            emitted += alert_service(assessment, settings)
            summary["services"][name] = {
                "conditions": [c.value for c in assessment.conditions],
                "summary": assessment.report.summary,
                "reasons": list(assessment.reasons),
            }
            summary["events"].extend(emitted)
            if name == "trader":
                summary["yield_released"] = release_stale_yield(settings, Condition.HEALTHY in assessment.conditions)
        summary["crashes"] = report_crashes(names, settings)
        summary["events"].extend(SERVICE_CRASHED for _ in summary["crashes"])
        if store_checks:
            summary["store"] = check_store(settings)
            summary["events"].extend(summary["store"].get("events", []))
        summary["cleared"] = clear_what_cleared(summary, settings)
    finally:
        # The dead man's switch listens for this; a failed round still says the monitor runs
        # (its failure hook tells L1 what broke).
        emit(MONITOR_TICK, MONITOR_RESOURCE, {"monitor": "health-monitor", "services": names})
    create_table_artifact(
        table=[{"service": n, **{k: "; ".join(v) if isinstance(v, list) else v for k, v in s.items()}}
               for n, s in summary["services"].items()],
        key="health-monitor",
        description=f"{len(summary['events'])} event(s): {', '.join(sorted(set(summary['events']))) or 'none'}",
    )
    return summary


# --- backtest-window-guard ---


@task(name="measure-window-usage", cache_policy=NO_CACHE, timeout_seconds=120)
def measure_window_usage(settings: dict[str, Any] | None) -> WindowUsage:
    """Probe the trader and the backtest daemon: CPU, memory, log errors, health."""
    cfg = run_settings(settings)
    return WindowUsage(trader=health.probe("trader", cfg), backtest=health.probe(BACKTEST, cfg))


@task(name="throttle-backtest", cache_policy=NO_CACHE, timeout_seconds=120)
def throttle_backtest(
    decision: GuardDecision, until: float | None, settings: dict[str, Any] | None
) -> str:
    """Carry out the guard's decision on the backtest daemon (never the trader); what was done, in words."""
    cfg = run_settings(settings)
    reason = "; ".join(decision.breaches) or decision.reason
    if decision.action is GuardAction.RENICE:
        pid, nice = renice_backtest(cfg, cfg.window_throttle_niceness)
        return f"backtest PID {pid} reniced to {nice}"
    if decision.action is GuardAction.PAUSE:
        hold = pause_backtest(cfg, reason, until)
        return f"backtest paused (SIGSTOP), {hold.description}"
    if decision.action is GuardAction.STOP:
        with existing_store(cfg) as store:
            stopped, hold = stop_backtest(cfg, decision.reason if decision.live_affected else reason, until, store)
        return f"backtest PID {stopped.pid} stopped ({stopped.signal or 'not running'}), {hold.description}"
    if decision.action is GuardAction.RESUME:
        return end_guard_hold(cfg)
    return "nothing to do"


def _message(decision: GuardDecision, usage: WindowUsage, done: str) -> tuple[str, str]:
    subject = (
        "[crypto-agent] live trading affected in the backtest window: backtest stopped"
        if decision.live_affected
        else f"[crypto-agent] backtest window over budget: {decision.action.value}"
    )
    trader_problems = f" ({'; '.join(decision.trader_problems)})" if decision.trader_problems else ""
    rss = usage.backtest.rss_mb or 0
    body = "\n".join([
        f"what happened: {decision.reason}",
        f"breaches: {'; '.join(decision.breaches) or 'none'}",
        f"live trading: {usage.trader.summary}{trader_problems}",
        f"backtest: {usage.backtest.summary}, CPU {usage.backtest_cpu_pct:.0f}%, RSS {rss:.0f} MB",
        f"done: {done}",
        ("live trading was not touched; the backtest resumes when the window ends "
         "(or by hand: crypto-agent service resume backtest)"),
    ])
    return subject, body


@flow(
    name="backtest-window-guard",
    description="Every minute 23:30-01:30 UTC: hold the backtest to the runbook's budget; throttle it first, "
    "stop it and page L3 if live trading is affected; never touch live trading.",
    timeout_seconds=240,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def backtest_window_guard(now: datetime | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure, decide one step (crypto_agent.guard.decide), act on the backtest, tell people."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    at = (now or datetime.now(UTC)).astimezone(UTC)
    window = current_window(at, cfg.window_start, cfg.window_end)
    usage = measure_window_usage(settings)
    hold = read_hold(BACKTEST, cfg, include_ended=True)
    guard_hold = hold if hold is not None and hold.by == GUARD_NAME else None
    stage = backtest_stage(usage.backtest, guard_hold, cfg.window_throttle_niceness)
    decision = decide(
        usage, WindowBudget.from_settings(cfg), stage, window is not None,
        guard_stopped=guard_hold is not None and guard_hold.kind == HOLD_STOPPED and stage is Stage.STOPPED,
    )
    done = throttle_backtest(decision, hold_until(window), settings) if decision.action is not GuardAction.NONE \
        else "nothing to do"
    logger.info("%s -> %s: %s (%s)", stage.value, decision.action.value, done, decision.reason)
    if decision.page is not None:
        subject, body = _message(decision, usage, done)
        notify_level(decision.page, subject, body)
    return {
        "in_window": window is not None,
        "stage": stage.value,
        "action": decision.action.value,
        "breaches": list(decision.breaches),
        "live_affected": decision.live_affected,
        "paged": decision.page,
        "done": done,
        "usage": {
            "main_cpu_pct": usage.main_cpu_pct, "backtest_cpu_pct": usage.backtest_cpu_pct,
            "memory_mb": round(usage.memory_mb, 1), "log_errors_per_min": usage.log_errors_per_min,
        },
    }
