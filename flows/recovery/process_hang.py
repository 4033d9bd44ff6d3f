"""Runbook scenario 4, CPU spike / process hang: capture the stacks, stop (SIGTERM, then SIGKILL), clean,
restart without the fault, confirm HEALTHY. Also run by recover-daemon-crash for a service alive but hung."""

from __future__ import annotations

import signal
from typing import Any

import psutil
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from crypto_agent import incidents, process, recovery
from crypto_agent.incidents import RESOLVED, SKIPPED
from flows.common import run_settings
from flows.events import SERVICE_CPU_HIGH, SERVICE_MEMORY_HIGH, SERVICE_RESULTS_STALE
from flows.recovery.contract import Handover, Overrides, Summary, Trigger, recovery_flow
from flows.recovery.skeleton import (
    Absorbed,
    recovery_incident,
    resource_of,
    skip_if_held,
)
from flows.recovery.steps import probe_service, restart_and_close, resume_backtest, stop_reported, yield_to_trader

STACK_DUMP_TIMEOUT_S = 10.0


@task(name="capture-stacks", timeout_seconds=60, cache_policy=NO_CACHE)
def capture_stacks(settings: dict[str, Any] | None, service: str) -> recovery.StackDump:
    """Have our service write every thread's stack (SIGUSR1; a stopped one gets SIGCONT first); the dump.

    A service that does not answer in time is recorded, not fatal: the dump's `timeout` says why.
    """
    cfg = run_settings(settings)
    spec = process.service_spec(service, cfg)
    continued = False
    try:
        proc = process.owned_process(spec)
        if proc.status() == psutil.STATUS_STOPPED:
            proc.send_signal(signal.SIGCONT)  # psutil re-checks that it is still our instance
            continued = True
        path = process.dump_stacks(spec, timeout_s=STACK_DUMP_TIMEOUT_S)
    except (process.StackDumpTimeout, process.ServiceNotRunning, process.NotOurProcess) as exc:
        return recovery.StackDump(None, "", continued, timeout=exc.message)
    except psutil.NoSuchProcess:
        return recovery.StackDump(None, "", continued, timeout="the process ended before its dump")
    return recovery.StackDump(path, path.read_text(encoding="utf-8", errors="replace"), continued)


@recovery_flow("recover-process-hang", __doc__, timeout_seconds=1800)
def recover_process_hang(service: str = "backtest", event: Trigger = None, settings: Overrides = None,
                         handover: Handover = None) -> Summary:
    """Recover a hung or CPU-burning service; the summary {incident_id, outcome, ...}."""
    cfg = run_settings(settings)
    resource = resource_of(service)
    spec = process.service_spec(service, cfg)
    with recovery_incident("process-hang", resource, event, cfg, handover, guard=[resource],
                           lock="none" if handover else "wait", fault_at_s=recovery.last_heartbeat_at(spec)) as run:
        if isinstance(run, Absorbed):
            return run.result
        run.live_trading_affected = service == "trader"
        impact = "Live trading stalled" if service == "trader" else "Backtest stalled, live trading OK"
        skipped = None if run.handed_over else skip_if_held(run, service, only_covering=True)
        if skipped is not None:
            return skipped
        yield_to_trader(run, cfg, service)

        # 1. look: the probe (one healthy sample does not refute cpu-high and memory-high, judged over minutes)
        report = probe_service(settings, service)
        also = f"; also {'; '.join(report.reasons[1:])}" if report.reasons[1:] else ""
        run.act("probe", f"{report.summary}{also}", ok=report.healthy)
        # judged over minutes or hours: one healthy sample does not refute them
        judged = (event or {}).get("event") in (SERVICE_CPU_HIGH, SERVICE_MEMORY_HIGH, SERVICE_RESULTS_STALE)
        if report.healthy and not run.handed_over and not judged:
            resume_backtest(run, cfg, service, report)
            return run.finish(RESOLVED, SKIPPED, summary=f"{service} is healthy again: nothing done",
                              impact="none", root_cause="Other: transient (healthy when the recovery looked)",
                              data_lost_hours=0)
        root_cause = incidents.root_cause.hang_root_cause(report.reasons, (event or {}).get("event"), report.summary)

        # 2. capture the stacks (py-spy dump), for the post-incident report
        if report.alive:
            stacks = capture_stacks(settings, service)
            if stacks.continued:
                run.act("continue", f"PID {report.pid} was stopped (SIGSTOP): sent SIGCONT so it can dump its stacks")
            if stacks.timeout:
                run.act("capture-stacks", f"no stack dump: {stacks.timeout}", ok=False)
            else:
                run.act("capture-stacks", f"{stacks.path}\n{stacks.text}")
                create_markdown_artifact(
                    markdown=f"# Stacks of {service} (incident #{run.id})\n\n`{stacks.path}`\n\n```\n"
                    f"{stacks.text[:50_000]}\n```\n",
                    key=f"incident-{run.id}-stacks", description=f"stack dump of {service} PID {report.pid}",
                )

        # 3. stop (SIGTERM, SIGKILL after the grace: hung_stop_grace_s when silent past the heartbeat limit),
        # 4. clean, restart, confirm HEALTHY
        stop_reported(run, settings, service, report)
        return restart_and_close(run, settings, service, impact=impact, root_cause=root_cause,
                                 held=f"{service} stopped; not restarted: it is paused")
