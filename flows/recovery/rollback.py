"""Runbook scenario 5, persistent failures (3+ crashes in 24 h): stop everything, restore the 48 h backup (the
current database quarantined), full validation, resume live trading only, the backtest paused until a person
resumes it, L3."""

from __future__ import annotations

from crypto_agent import health, holds, incidents
from crypto_agent.incidents import ESCALATED, RECOVERED, RESOLVED
from flows.common import run_settings
from flows.daily import check_data_quality
from flows.events import STORE_RESOURCE
from flows.maintenance import check_store_integrity
from flows.recovery.contract import Handover, Overrides, Summary, Trigger, recovery_flow
from flows.recovery.skeleton import (
    Absorbed,
    Recovery,
    recovery_incident,
    resource_of,
)
from flows.recovery.steps import integrity_detail, restore_and_resync, sound_store, start_verified, stop_all, store_lock


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


@recovery_flow("rollback-persistent-failures", __doc__, timeout_seconds=3 * 3600)
def rollback_persistent_failures(service: str = "backtest", event: Trigger = None, settings: Overrides = None,
                                 handover: Handover = None) -> Summary:
    """Roll the store back to the 48 h backup with live trading resumed and the backtest paused; the summary."""
    cfg = run_settings(settings)
    guard = [STORE_RESOURCE, resource_of("backtest"), resource_of("trader")]
    with recovery_incident("persistent-failures", resource_of(service), event, cfg, handover, guard=guard) as run:
        if isinstance(run, Absorbed):
            return run.result
        root_cause = f"Other: persistent failures of the backtest daemon ({failure_count(run)})"

        # 1. pause the backtest: nothing restarts it until a person has investigated
        marker = holds.keep_stopped("backtest", cfg, by=run.lock_owner,
                                       reason=f"rollback incident #{run.id}: persistent failures, under investigation")
        run.act("pause-backtest",
                f"{marker}: nothing restarts the backtest until `crypto-agent service resume backtest`")
        impact = "Backtest paused until a person resumes it; live trading interrupted during the rollback"
        run.live_trading_affected = True

        # 2. stop everything, 3. restore the 48 h backup, 4. full validation
        with store_lock(run):
            stop_all(run, settings)
            restored = restore_and_resync(run, settings, f"rollback incident #{run.id}", cfg.rollback_hours,
                                          salvage=False)
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
