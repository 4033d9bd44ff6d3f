"""Runbook scenario 5, persistent failures (3+ crashes in 24 h): the backtest paused, then a person approves the last
resort in the Prefect UI (rollback_on_timeout says what no decision does), then stop everything, restore the 48 h
backup (the current database quarantined), full validation, resume live trading only, the backtest paused until a
person resumes it, L3."""

from __future__ import annotations

import time

from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput, keyset_from_base_key
from prefect.input.actions import read_flow_run_input
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Running
from pydantic import Field

from crypto_agent import approval, health, holds, incidents
from crypto_agent.incidents import ESCALATED, RECOVERED, RESOLVED
from flows.common import run_settings
from flows.daily import check_data_quality
from flows.events import STORE_RESOURCE
from flows.maintenance import check_store_integrity
from flows.recovery.contract import Handover, Overrides, Summary, Trigger, recovery_flow
from flows.recovery.skeleton import (
    Absorbed,
    Recovery,
    flow_run_link,
    recovery_incident,
    resource_of,
)
from flows.recovery.steps import (
    integrity_detail,
    replication_paused,
    restore_and_resync,
    sound_store,
    start_verified,
    stop_all,
    stop_reported,
    store_lock,
)

FLOW_TIMEOUT_S = 3 * 3600
APPROVAL_BUDGET_S = 2 * 3600  # the longest wait for a decision, all asks together: the rest is the rollback's


def failure_count(run: Recovery) -> str:
    """How often the daemon failed in the window, from the store's service events and the incident log."""
    hours = run.cfg.persistent_window_hours
    crash_incidents = incidents.recent_count(run.log_store, "daemon-crash", hours)
    store = sound_store(run.cfg)
    try:
        failures = health.failures_within(store, "backtest", hours) if store is not None else None
    except Exception:  # noqa: BLE001 (a damaged store only costs this detail of the report)
        failures = None
    finally:
        if store is not None:
            store.close()
    counted = f"{failures} crashes, kills or failed starts and " if failures is not None else ""
    return f"{counted}{crash_incidents} daemon-crash incident(s) in {hours:g} h"


# --- the gate: a person approves the last resort in the Prefect UI ---


class RollbackApproval(RunInput):
    """The form of a rollback waiting in the Prefect UI: approve it or not, who decides, why."""

    approve: bool = Field(description="true: restore the backup now; false: keep the current database")
    by: str = Field(description="who decides (name or handle), recorded in the incident")
    note: str = Field("", description="why, recorded in the incident and sent to L3")


def wait_for_answer(description: str, pauses: approval.PausePlan, key: str) -> approval.Answer | None:
    """Pause this flow run for a RollbackApproval (the UI shows `description` above the form); the answer, or None
    when nobody answered within the pause's timeout (the run is then Running again, to go on or pause again)."""
    form = RollbackApproval.with_initial_data(description=description)
    try:
        got = pause_flow_run(wait_for_input=form, timeout=pauses.timeout_s, poll_interval=pauses.poll_s, key=key)
    except FlowPauseTimeout:
        return _after_pause_timeout(key)
    return approval.Answer(got.approve, got.by, got.note)


def _after_pause_timeout(key: str) -> approval.Answer | None:
    """A pause that timed out leaves the run Paused past its deadline, and the server turns whatever comes next
    into Failed: take it back to Running. An answer the server accepted at the very deadline is still followed."""
    run_id = current_flow_run.id
    late = read_flow_run_input(keyset_from_base_key(f"paused-{key}")["response"], flow_run_id=run_id)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
        if state is None or not state.is_running():
            client.set_flow_run_state(run_id, Running(message="rollback approval timed out"), force=True)
    if isinstance(late, dict):
        answer = RollbackApproval(**late)
        return approval.Answer(answer.approve, answer.by, answer.note)
    return None


def ask_approval(run: Recovery, plan: approval.RollbackPlan, root_cause: str) -> Summary | None:
    """Before the trader or the store is touched: record in the incident and tell L3 what the rollback would
    restore and lose, and wait for a person's decision in the Prefect UI; None to go on with the rollback, or the
    summary of the incident closed ESCALATED (nothing restored) when it was rejected or, waiting, never decided."""
    cfg = run.cfg
    pauses = approval.pause_plan(cfg.rollback_approval_timeout_s, cfg.rollback_on_timeout, APPROVAL_BUDGET_S)
    link = flow_run_link()
    asked = 0
    while True:
        asked += 1
        request = approval.request_text(plan, pauses, asked, link)
        run.act("approval-requested", f"{plan.describe()}; approve or reject at {link}"
                + (f" (ask {asked} of {pauses.asks})" if pauses.asks > 1 else ""))
        headline = "needs approval" if asked == 1 else "still needs approval"
        run.tell("l3", *run.message(f"{headline}: rollback to {plan.name}", extra=request))
        answer = wait_for_answer(request, pauses, key=f"rollback-approval-{asked}")
        decision = approval.decide(answer, pauses, asked)
        run.act(decision.step, decision.detail, ok=decision.ok)
        if decision.action == approval.PROCEED:
            return None
        if decision.action == approval.ASK_AGAIN:
            continue
        # rejected, or never decided: trader and store untouched, nothing restored; a person takes it from here
        summary = (f"{decision.detail}; nothing restored (the database is as it was), live trading left as it was, "
                   "the backtest stays paused (`crypto-agent service resume backtest`); run the rollback again to "
                   "ask again")
        run.act("escalate", summary, ok=False)
        return run.finish(ESCALATED, "escalated", summary=summary,
                          impact="Backtest paused until a person resumes it; live trading not interrupted",
                          root_cause=root_cause)


@recovery_flow("rollback-persistent-failures", __doc__, timeout_seconds=FLOW_TIMEOUT_S)
def rollback_persistent_failures(service: str = "backtest", event: Trigger = None, settings: Overrides = None,
                                 handover: Handover = None) -> Summary:
    """Roll the store back to the 48 h backup once a person approved it (or, per rollback_on_timeout, nobody
    decided in time), with live trading resumed and the backtest paused; the summary."""
    cfg = run_settings(settings)
    # Only the backtest's slot while a person decides: a trader crash or a store recovery meanwhile is not held up
    # behind the gate; the store's and the trader's slots are taken once it is approved.
    guard = [resource_of("backtest")]
    with recovery_incident("persistent-failures", resource_of(service), event, cfg, handover, guard=guard) as run:
        if isinstance(run, Absorbed):
            return run.result
        root_cause = f"Other: persistent failures of the backtest daemon ({failure_count(run)})"

        # 1. pause the backtest: nothing restarts it until a person has investigated
        marker = holds.keep_stopped("backtest", cfg, by=run.lock_owner,
                                       reason=f"rollback incident #{run.id}: persistent failures, under investigation")
        run.act("pause-backtest",
                f"{marker}: nothing restarts the backtest until `crypto-agent service resume backtest`")
        # the marker only keeps it from starting: stop the crash-looping instance too (our PID only), so the backtest
        # is paused while a person decides, and stays so if the rollback is rejected; the rest waits for the gate
        stop_reported(run, settings, "backtest")

        # the gate: a person approves the last resort before anything else is stopped (no backup: nothing to approve)
        plan = approval.plan_rollback(cfg.backup_dir, cfg.rollback_hours, cfg.quarantine_dir, int(time.time() * 1000))
        if plan is None:
            run.act("approval-not-asked", f"no good backup from {cfg.rollback_hours:g} h ago or older: nothing to "
                    "restore, nothing to approve", ok=False)
        else:
            closed = ask_approval(run, plan, root_cause)
            if closed is not None:
                return closed
        impact = "Backtest paused until a person resumes it; live trading interrupted during the rollback"
        run.live_trading_affected = True
        with run.guard([STORE_RESOURCE, resource_of("trader")]):
            return roll_back(run, settings, plan, root_cause, impact)


def roll_back(run: Recovery, settings: Overrides, plan: approval.RollbackPlan | None, root_cause: str,
              impact: str) -> Summary:
    """The approved rollback: stop everything, restore the 48 h backup, validate, resume live trading only."""
    cfg = run.cfg
    # 2. stop everything, 3. restore the 48 h backup, 4. full validation
    with store_lock(run), replication_paused(run):
        stop_all(run, settings)
        restored = restore_and_resync(run, settings, f"rollback incident #{run.id}", cfg.rollback_hours,
                                      salvage=False)
        if plan is not None and restored.backup is not None and restored.backup.path != plan.backup.path:
            run.act("approval-differs", f"restored {restored.backup.name}, not {plan.name} as asked: that one "
                    "failed its check while restoring", ok=False)
        if restored.backup is not None:
            full = check_store_integrity(settings, True)
            validation = check_data_quality(settings)
            run.act("validate", f"{integrity_detail(full)}; data checks "
                    + ("pass" if validation.ok else "FAIL: " + "; ".join(validation.reasons[:3])),
                    ok=full.ok and validation.ok)
            if not validation.ok:
                run.extra_levels["l2"] = ("the rolled-back store fails validation: "
                                          + "; ".join(validation.reasons[:3]))
    run.act("unlock", "released the store's lock")

    # 5. resume live trading only (the backtest stays paused); L3 is told either way
    trader = start_verified(run, settings, "trader")
    if restored.backup is None:
        run.rollback_failed = True
        why = (f"rollback FAILED: no good backup from {cfg.rollback_hours:g} h ago or older ({restored.message}); "
               "the database was not touched, live trading "
               + ("resumed" if trader else "NOT resumed") + ", the backtest stays paused")
        run.act("escalate", why, ok=False)
        return run.finish(ESCALATED, "escalated", summary=why, impact=impact, root_cause=root_cause)
    quarantined = str(restored.backup.quarantined) if restored.backup.quarantined else None
    summary = (f"rolled back to {restored.backup.name}; live trading "
               + ("resumed (HEALTHY)" if trader else "paused") + "; backtest paused for investigation "
               "(`crypto-agent service resume backtest`); rows newer than the backup are kept in "
               f"{quarantined}")
    return run.finish(RESOLVED, RECOVERED, summary=summary, impact=impact, root_cause=root_cause,
                      data_lost_hours=restored.data_lost_hours, backup=str(restored.backup.path),
                      quarantined=quarantined)
