"""Runbook scenario 3, database corruption: stop the services, lock the store, REINDEX a scratch copy or restore
the newest good backup (the corrupt file quarantined), resync, salvage; without a good backup (or when the restore
fails) rebuild a fresh store from every readable row and re-fetch the candles; validate, the trader first then the
daemon. Also run by recover-daemon-crash when the quick integrity check fails or the service died of the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent import incidents, recovery, storelock
from crypto_agent.errors import CryptoAgentError
from crypto_agent.incidents import ESCALATED, RECOVERED, RESOLVED, SKIPPED
from crypto_agent.store import check_integrity
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
from flows.recovery.steps import (
    Rebuilt,
    RestoreUnsound,
    discard_prepared,
    integrity_detail,
    prepare_replica_copy,
    quarantine_corrupt,
    rebuild_and_refetch,
    replication_paused,
    restore_and_resync,
    start_verified,
    stop_all,
    store_lock,
)


@task(name="reindex-scratch-copy", timeout_seconds=3600, cache_policy=NO_CACHE)
def reindex_scratch_copy(settings: dict[str, Any] | None, incident_id: int) -> recovery.ReindexResult:
    """REINDEX a scratch copy of the database and check it fully; the live (corrupt) file is not touched."""
    cfg = run_settings(settings)
    work = Path(cfg.db_path).parent / f".repair-incident-{incident_id}"
    return recovery.reindex_copy(cfg.db_path, work)


@task(name="install-repaired-copy", timeout_seconds=600, cache_policy=NO_CACHE)
def install_repaired_copy(settings: dict[str, Any] | None, repaired: str, reason: str) -> Path:
    """Quarantine the corrupt database (with -wal/-shm), put the repaired copy in its place; the quarantine folder."""
    cfg = run_settings(settings)
    return recovery.put_repaired_in_place(cfg.db_path, repaired, cfg.quarantine_dir, reason)


def escalate_unrebuilt(run: Recovery, no_backup: str, rebuilt: Rebuilt, impact: str, root_cause: str) -> dict[
        str, Any]:
    """Even the rebuild failed: keep the lock for a person, the services stopped, and page L2 and L3."""
    cfg = run.cfg
    recovery.hand_lock_to_person(
        cfg.db_path, f"{run.lock_owner}: escalated, no good backup and the rebuild failed; delete this file once "
        "a person has restored the store")
    where = f"the corrupt database is in {rebuilt.quarantined.parent} (nothing overwritten)" \
        if rebuilt.quarantined is not None else f"the corrupt database stays at {cfg.db_path}"
    in_place = (f"a rebuilt store with the readable rows is at {cfg.db_path} ({rebuilt.result.summary})"
                if rebuilt.result is not None else f"nothing was put at {cfg.db_path}")
    why = (f"no good backup to restore: {no_backup}. The rebuild without a backup failed too: {rebuilt.error or ''}"
           f"{'; ' if rebuilt.error else ''}candles: {rebuilt.refetch.failures if rebuilt.refetch else 'not fetched'}"
           f". {where}; {in_place}; the services stay stopped and {storelock.lock_path(cfg.db_path)} stays so nothing "
           "writes or starts on it. Next: delete LOCKED, then `crypto-agent restore --backup FILE` (or rebuild "
           "with `crypto-agent collect`), then start the services")
    run.extra_levels["l3"] = "the store is down with no good backup and the rebuild failed"
    run.act("escalate", why, ok=False)
    return run.finish(ESCALATED, "escalated", summary=why, impact=impact, root_cause=root_cause)


def late_report(cfg: Any, event: Trigger, handover: Handover) -> Summary | None:
    """A corruption reported before the store was repaired by a recovery that has since closed, on a store that
    checks sound now: a late report of the damage already repaired (a service's store-corrupt heartbeat
    relayed after the repair); no incident, no page. None: recover as usual."""
    if event is None or handover:
        return None
    try:
        with incidents.open_incident_store(cfg) as log:
            fixed = recovery.repaired_since(incidents.list_incidents(log, limit=20), incidents.detected_at(event))
    except (CryptoAgentError, SQLAlchemyError):
        return None
    if fixed is None or not Path(cfg.db_path).exists() or not check_integrity(cfg.db_path).ok:
        return None
    why = (f"a late report of the damage incident #{fixed.id} repaired at {incidents.iso(fixed.resolved_at)}: "
           "quick_check ok now")
    get_run_logger().info("%s (%s); nothing to do", why, event.get("event"))
    return {"incident_id": None, "scenario": "db-corruption", "outcome": "absorbed", "absorbed_by": why}


@recovery_flow("recover-db-corruption", __doc__, timeout_seconds=2 * 3600)
def recover_db_corruption(service: str = "backtest", event: Trigger = None, settings: Overrides = None,
                          handover: Handover = None) -> Summary:
    """Repair or restore a corrupt store and bring the services back; the summary {incident_id, outcome, ...}."""
    cfg = run_settings(settings)
    late = late_report(cfg, event, handover)
    if late is not None:
        return late
    guard = [STORE_RESOURCE, resource_of("backtest"), resource_of("trader")]
    with recovery_incident("db-corruption", STORE_RESOURCE, event, cfg, handover, guard=guard) as run:
        if isinstance(run, Absorbed):
            return run.result

        # 1. confirm: PRAGMA integrity_check
        reported = incidents.event_payload(event).get("problems")
        if reported:
            run.act("event", "reported: " + "; ".join(str(p) for p in reported[:10]))
        check = check_store_integrity(settings, True)
        run.act("integrity-check", integrity_detail(check), ok=check.ok)
        if check.ok:
            return run.finish(RESOLVED, SKIPPED, summary="integrity_check says ok: nothing to repair, nothing stopped",
                              impact="none", root_cause="Other: not reproduced (integrity_check ok)",
                              data_lost_hours=0)
        root_cause = incidents.root_cause.corruption_root_cause(check.problems)
        run.describe(root_cause=root_cause)

        details: dict[str, Any] = {}
        with store_lock(run), replication_paused(run):
            # 2. stop everything that writes; running until we stopped it, or found dead: live trading was hit
            stopped = stop_all(run, settings)
            run.live_trading_affected = stopped["trader"].was_running or bool(stopped["trader"].cleaned)
            impact = ("Live trading and backtest stopped" if run.live_trading_affected
                      else "Backtest stopped, live trading was not running")

            # 3. REINDEX a scratch copy; 4. else restore the newest good backup, resync, salvage. The replica's
            # newest point is restored and checked meanwhile (both only read the corrupt file): a damaged table,
            # which REINDEX cannot repair, costs one wait, not two (issue 12)
            reindexing = reindex_scratch_copy.submit(settings, run.id)
            preparing = prepare_replica_copy.submit(settings)
            reindexed = reindexing.result()
            try:
                prepared = preparing.result()
            except Exception as exc:  # noqa: BLE001 (the restore then tries the replica itself)
                get_run_logger().warning("the replica's copy was not prepared: %s", exc)
                prepared = None
            if reindexed.ok:
                discard_prepared(prepared)
                run.act("reindex", f"REINDEX on a scratch copy repaired it in {reindexed.seconds:.1f} s")
                folder = install_repaired_copy(settings, str(reindexed.repaired),
                                               f"incident #{run.id}: corrupt; replaced by its REINDEXed copy")
                run.act("install-repaired", f"the corrupt database (with -wal/-shm) is in {folder}; "
                        "the repaired copy is in place")
                lost: float | None = 0.0
                how = "repaired by REINDEX"
            else:
                run.act("reindex", "REINDEX did not repair a scratch copy: " + "; ".join(reindexed.problems[:5]),
                        ok=False)
                try:
                    restored = restore_and_resync(run, settings, f"incident #{run.id}: corrupt database", None,
                                                  salvage=True, prepared=prepared)
                    unsound = None
                except RestoreUnsound as exc:  # the backup put in place is no better: rebuild from the original
                    restored, unsound = recovery.Restoration(None, message=exc.message), exc
                    quarantine_corrupt(settings, f"incident #{run.id}: the restored backup fails its check")
                if restored.backup is None:
                    # 4b. no good backup is not a dead end: rebuild from every readable row, re-fetch the candles
                    rebuilt = rebuild_and_refetch(run, settings, f"incident #{run.id}: corrupt database, no good "
                                                  "backup", unsound.quarantined if unsound is not None else None)
                    result = rebuilt.result
                    if not rebuilt.ok or result is None:
                        return escalate_unrebuilt(run, restored.message, rebuilt, impact, root_cause)
                    lost = 0.0 if rebuilt.lost == "nothing" else None
                    how = f"no good backup ({restored.message}): {result.summary}"
                    details["rebuild"] = result.to_dict()
                    run.act("rebuilt", f"rebuilt without a backup: {result.summary}; lost: {rebuilt.lost}")
                    run.extra_levels["l2"] = (
                        f"the store was rebuilt without a backup: {result.summary}; "
                        f"{rebuilt.refetch.written if rebuilt.refetch else 0} candles re-fetched from the exchange; "
                        f"lost: {rebuilt.lost}")
                else:
                    lost, how = restored.data_lost_hours, f"restored from {restored.backup.name}"

            # 5. validate the data
            validation = check_data_quality(settings)
            run.act("validate", "data checks pass" if validation.ok else "; ".join(validation.reasons[:5]),
                    ok=validation.ok)
            if not validation.ok:
                failing = "the store is sound again but its data fails validation: " + \
                    "; ".join(validation.reasons[:3])
                run.extra_levels["l2"] = "; ".join(filter(None, [run.extra_levels.get("l2"), failing]))
        run.act("unlock", "released the store's lock")

        # 6. the trader first, then the daemon once the trader is healthy
        trader = start_verified(run, settings, "trader")
        daemon = start_verified(run, settings, "backtest")
        state = f"trader {'HEALTHY' if trader else 'paused'}, daemon {'HEALTHY' if daemon else 'paused'}"
        return run.finish(RESOLVED, RECOVERED, summary=f"{how}; {state}", impact=impact, root_cause=root_cause,
                          data_lost_hours=lost, **details)
