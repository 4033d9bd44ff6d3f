"""Runbook scenario 1, daemon crashed: confirm it is dead, attach the log's errors, the restart policy (the first
crash at once, a crash loop backs off; died of the store: recover-db-corruption at once), triage (alive but hung
goes to recover-process-hang), a quick integrity check (corrupt: recover-db-corruption), clean the state files,
restart, confirm HEALTHY."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent import health, incidents, process, recovery, restart_policy
from crypto_agent.incidents import RECOVERED, RESOLVED, SKIPPED
from crypto_agent.settings import Settings
from flows.common import run_settings
from flows.events import HEARTBEAT_MISSING, HEARTBEAT_STALE
from flows.maintenance import check_store_integrity
from flows.recovery.contract import Handover, Overrides, Summary, Trigger, recovery_flow
from flows.recovery.db_corruption import recover_db_corruption
from flows.recovery.process_hang import recover_process_hang
from flows.recovery.skeleton import (
    Absorbed,
    Recovery,
    limit_name,
    recovery_incident,
    resource_of,
    skip_if_held,
)
from flows.recovery.steps import (
    ServiceUnhealthy,
    clean_service_state,
    integrity_detail,
    probe_service,
    read_log_errors,
    restart_and_close,
    resume_backtest,
    sound_store,
    yield_to_trader,
)


def restart_decision(cfg: Settings, spec: process.ServiceSpec, errors: list[str]) -> restart_policy.Decision:
    """The restart policy's answer for a dead service: its starts and crashes of the last 24 h (service events,
    and its ownership record's start), the log's errors (a store fault), the backoff settings."""
    starts: list[float] = []
    crashes: list[float] = []
    store = sound_store(cfg)
    try:
        if store is not None:
            try:
                starts, crashes = restart_policy.history(store, spec.name)
            except SQLAlchemyError:  # a damaged store: the ownership record alone says when it started
                starts, crashes = [], []
        started = recovery.last_start(spec, store)
        if started is not None:
            starts.append(started)
    finally:
        if store is not None:
            store.close()
    return restart_policy.decide(starts, crashes, log_lines=errors, base_s=cfg.restart_backoff_base_s,
                                 cap_s=cfg.restart_backoff_cap_s, reset_after_s=cfg.restart_backoff_reset_s)


def log_errors_reported(run: Recovery, settings: dict[str, Any] | None, service: str,
                        spec: process.ServiceSpec) -> list[str]:
    """The log's error lines (the runbook's tail | grep), recorded in the incident."""
    errors = read_log_errors(settings, service)
    run.act("log-errors", f"{len(errors)} error line(s) in the last 100 of {spec.log}:\n" + "\n".join(errors[-40:])
            if errors else f"no error in the last 100 lines of {spec.log}")
    return errors


def late_signal(cfg: Settings, spec: process.ServiceSpec, event: Trigger, handover: Handover) -> Summary | None:
    """The summary of a run whose event reports a crash another recovery has already fixed (no incident, no
    page: a heartbeat-missing automation firing after the relay's service.dead was recovered), else None."""
    if event is None or handover:
        return None
    report = health.probe(spec, cfg)
    check = process.inspect(spec)
    payload = event.get("payload")
    reported = payload.get("pid") if isinstance(payload, dict) and isinstance(payload.get("pid"), int) else None
    why = recovery.stale_signal(report.healthy, check.record.create_time if check.record else None,
                                incidents.detected_at(event), check.pid, reported_pid=reported,
                                heartbeat_signal=str(event.get("event", "")).startswith(HEARTBEAT_SIGNALS))
    if why is None:
        return None
    get_run_logger().info("%s: %s (%s); nothing to do", spec.name, why, event.get("event"))
    return {"incident_id": None, "scenario": "daemon-crash", "outcome": "absorbed", "absorbed_by": why}


HEARTBEAT_SIGNALS = (HEARTBEAT_MISSING, HEARTBEAT_STALE)
RESTARTS_PER_INCIDENT = 3  # a service dying again right after each restart: then the incident fails (L2)


@task(name="hold-restart", timeout_seconds=3700, cache_policy=NO_CACHE)
def hold_restart(seconds: float) -> float:
    """Wait out the restart backoff of a crash loop (at most restart_backoff_cap_s)."""
    time.sleep(max(0.0, seconds))
    return seconds


@recovery_flow("recover-daemon-crash", __doc__, timeout_seconds=3 * 3600)
def recover_daemon_crash(service: str = "backtest", event: Trigger = None, settings: Overrides = None,
                         handover: Handover = None) -> Summary:
    """Recover a dead service (or hand a hung one to recover-process-hang); the summary {incident_id, outcome, ...}."""
    cfg = run_settings(settings)
    resource = resource_of(service)
    spec = process.service_spec(service, cfg)
    late = late_signal(cfg, spec, event, handover)
    if late is not None:
        return late
    # a store recovery holding the lock restarts the services itself: wait for it
    with recovery_incident("daemon-crash", resource, event, cfg, handover, guard=[resource], lock="wait",
                           fault_at_s=recovery.last_heartbeat_at(spec)) as run:
        if isinstance(run, Absorbed):
            return run.result
        run.live_trading_affected = service == "trader"
        impact = "Live trading down" if service == "trader" else "Backtest paused (daemon down), live trading OK"
        skipped = skip_if_held(run, service)
        if skipped is not None:
            return skipped
        yield_to_trader(run, cfg, service)

        # 1. confirm it is dead; 2. the log's errors say why it died; the restart policy says when to restart
        report = probe_service(settings, service)
        verdict = recovery.triage(report, cfg.heartbeat_max_age_s)
        run.act("probe", f"{report.summary} -> {verdict.verdict.value}: {verdict.reason}")
        errors: list[str] | None = None
        if verdict.verdict is recovery.Verdict.DEAD:
            errors = log_errors_reported(run, settings, service, spec)
            decision = restart_decision(cfg, spec, errors)
            run.act("restart-policy", decision.reason)
            if decision.state is restart_policy.RestartState.STORE_CORRUPT:
                if Path(cfg.db_path).exists():
                    run.describe(root_cause=incidents.root_cause.crash_root_cause(service, errors), impact=impact)
                    sub = recover_db_corruption(service=service, event=event, settings=settings,
                                                handover=run.cause_handover())
                    if sub.get("outcome") != SKIPPED:
                        if sub.get("outcome") == RECOVERED:
                            resume_backtest(run, cfg, service, probe_service(settings, service))
                        return run.finish_from(sub)
                    run.act("store-sound", f"incident #{sub.get('incident_id')}: {sub.get('summary')}; restarting "
                            f"{service} as a crash")
                else:
                    run.act("store-sound", f"no database at {cfg.db_path}: nothing to repair; restarting {service} "
                            "as a crash")
                decision = restart_decision(cfg, spec, [])
                run.act("restart-policy", decision.reason)
            if not decision.at_once:
                hold_restart(decision.delay_s)
                report = probe_service(settings, service)
                verdict = recovery.triage(report, cfg.heartbeat_max_age_s)
                run.act("probe", f"after the backoff: {report.summary} -> {verdict.verdict.value}")
        if verdict.verdict is recovery.Verdict.HUNG:
            run.act("triage", f"alive but hung ({verdict.reason}): handing over to recover-process-hang")
            sub = recover_process_hang(service=service, event=event, settings=settings,
                                       handover=run.handover([limit_name(resource)]))
            return run.finish_from(sub)
        if verdict.verdict is recovery.Verdict.RUNNING:
            # nothing done by this run: "skipped", so MTTR counts real recoveries only
            resume_backtest(run, cfg, service, report)
            return run.finish(
                RESOLVED, SKIPPED, summary=f"{service} is running ({report.summary}): no restart needed",
                impact="none" if report.healthy else impact,
                root_cause="Other: not a crash (the service runs and beats)", data_lost_hours=0,
            )
        if verdict.foreign:
            run.act("refused", f"{verdict.foreign}: that process is not ours and is left alone; the stale "
                    "pidfile will be cleaned, nothing signalled", ok=False)
        if errors is None:
            errors = log_errors_reported(run, settings, service, spec)
        root_cause = incidents.root_cause.crash_root_cause(service, errors)
        run.describe(root_cause=root_cause, impact=impact)

        # 3. a quick integrity check: a corrupt store is recover-db-corruption's
        check = check_store_integrity(settings, False)
        if not check.ok and Path(cfg.db_path).exists():
            run.act("integrity-check", integrity_detail(check) + "\nhanding over to recover-db-corruption", ok=False)
            sub = recover_db_corruption(service=service, event=event, settings=settings,
                                        handover=run.cause_handover())
            if sub.get("outcome") == RECOVERED:
                resume_backtest(run, cfg, service, probe_service(settings, service))
            return run.finish_from(sub)
        run.act("integrity-check", integrity_detail(check) if check.ok else
                f"no database yet at {cfg.db_path}: the service creates it")

        # 4. clean the state files, restart, confirm HEALTHY; a new instance that dies right after its start is
        # another crash of this incident: recorded, backed off by the same policy, restarted again
        for attempt in range(1, RESTARTS_PER_INCIDENT + 1):
            try:
                return restart_and_close(run, settings, service, impact=impact, root_cause=root_cause,
                                         held=f"{service} was paused meanwhile: not restarted")
            except ServiceUnhealthy:
                report = probe_service(settings, service)
                verdict = recovery.triage(report, cfg.heartbeat_max_age_s)
                if verdict.verdict is not recovery.Verdict.DEAD or attempt == RESTARTS_PER_INCIDENT:
                    raise
                cleaned = clean_service_state(settings, service)  # records the new instance's crash first
                errors = log_errors_reported(run, settings, service, spec)
                decision = restart_decision(cfg, spec, errors)
                run.act("crashed-again", f"{service} died right after its restart ({report.summary}; cleaned "
                        f"{', '.join(cleaned) or 'nothing'}): restart {attempt + 1} of at most "
                        f"{RESTARTS_PER_INCIDENT} in this incident; {decision.reason}", ok=False)
                if decision.state is restart_policy.RestartState.STORE_CORRUPT and Path(cfg.db_path).exists():
                    sub = recover_db_corruption(service=service, event=event, settings=settings,
                                                handover=run.cause_handover())
                    if sub.get("outcome") == RECOVERED:
                        resume_backtest(run, cfg, service, probe_service(settings, service))
                    return run.finish_from(sub)
                if not decision.at_once:
                    hold_restart(decision.delay_s)
        raise AssertionError("unreachable: the last attempt returns or raises")
