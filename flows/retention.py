"""Bounded growth as runbook jobs: prune-history (daily) and the storage check the other jobs share.

Thin over crypto_agent.retention, which decides what goes: this module runs its pruning of the store,
deletes the Prefect flow runs it picks (retention.flow_runs_to_delete), measures the disk
(retention.storage) and answers a passed limit: crypto-agent.store.storage-high with the report, and
when free disk runs low, L2 is told and a retention run starts at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound

from crypto_agent import retention
from crypto_agent.errors import InputError, StoreLocked
from crypto_agent.retention import GB, StorageReport
from crypto_agent.store import open_store
from crypto_agent.storelock import is_locked, lock_path
from flows.common import run_settings
from flows.events import STORE_RESOURCE, STORE_STORAGE_HIGH, emit
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, page_episode

# Flow runs one prune-history run deletes at most (about 430 are made a day), and the page it reads them in
# (the Prefect server's default API limit is 200).
MAX_FLOW_RUNS = 2000
LOW_DISK_KEY = "storage:free-disk-low"  # the alert episode of a disk short of room (crypto_agent.alerts)
PAGE = 200
# Which finished runs are kept for how long: (state types, the setting of their days).
FLOW_RUN_CLASSES: tuple[tuple[tuple[StateType, ...], str], ...] = (
    ((StateType.COMPLETED, StateType.CANCELLED), "retention_flow_run_days"),
    ((StateType.FAILED, StateType.CRASHED), "retention_failed_flow_run_days"),
)


# --- prune-history ---


def _epoch_s(now: datetime | None) -> float | None:
    """A flow's `now` parameter as retention's epoch seconds (None: the real now)."""
    return None if now is None else now.timestamp()


@task(name="prune-store", cache_policy=NO_CACHE, timeout_seconds=1800)
def prune_store(settings: dict[str, Any] | None, now: datetime | None) -> dict[str, Any]:
    """retention.prune on the store with the configured limits; skipped while a recovery holds db/LOCKED."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    if not cfg.db_path.exists():
        return {"skipped": f"no database at {cfg.db_path} yet"}
    if is_locked(cfg.db_path):
        skipped = f"{lock_path(cfg.db_path)} exists: a recovery holds the store; the next run prunes it"
        logger.warning("retention skipped: %s", skipped)
        return {"skipped": skipped}
    try:
        with open_store(cfg) as store:
            pruned = retention.prune(
                store,
                keep_runs=cfg.retention_keep_runs,
                probe_sample_days=cfg.retention_probe_sample_days,
                service_event_days=cfg.retention_service_event_days,
                now=_epoch_s(now),
            )
    except StoreLocked as exc:  # a recovery took the lock meanwhile: what was deleted stays deleted
        logger.warning("retention stopped: %s", exc.message)
        return {"skipped": exc.message}
    logger.info("%s (%.1f s)", pruned.message, pruned.seconds)
    return pruned.to_dict()


@task(name="prune-flow-runs", cache_policy=NO_CACHE, timeout_seconds=1800)
def prune_flow_runs(settings: dict[str, Any] | None, max_runs: int, now: datetime | None) -> dict[str, Any]:
    """Delete finished Prefect flow runs past their retention, oldest first, at most max_runs."""
    cfg = run_settings(settings)
    at = (now or datetime.now(UTC)).astimezone(UTC)
    days, failed_days = cfg.retention_flow_run_days, cfg.retention_failed_flow_run_days
    deleted: list[str] = []
    with get_client(sync_client=True) as client:
        for states, setting in FLOW_RUN_CLASSES:
            before = at - timedelta(days=float(getattr(cfg, setting)))
            offset = 0  # runs read and kept: deleted ones leave the listing
            while len(deleted) < max_runs:
                limit = min(PAGE, max_runs - len(deleted))
                page = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states))),
                        end_time=FlowRunFilterEndTime(before_=before),
                    ),
                    sort=FlowRunSort.START_TIME_ASC, limit=limit, offset=offset,
                )
                found = [(str(r.id), r.state_type.value if r.state_type else "",
                          r.end_time.timestamp() if r.end_time else None) for r in page]
                chosen = retention.flow_runs_to_delete(found, at.timestamp(), days=days, failed_days=failed_days)
                for run_id in chosen:
                    try:
                        client.delete_flow_run(UUID(run_id))
                    except ObjectNotFound:
                        pass  # deleted meanwhile: gone all the same
                    deleted.append(run_id)
                offset += len(page) - len(chosen)
                if len(page) < limit:
                    break
    get_run_logger().info("deleted %d finished flow run(s) older than %g days (%g for failed ones)",
                          len(deleted), days, failed_days)
    return {"deleted": len(deleted), "ids": deleted, "limit_reached": len(deleted) >= max_runs,
            "days": days, "failed_days": failed_days}


def pruned_table(store: dict[str, Any], runs: dict[str, Any], cfg_keep: dict[str, Any]) -> list[dict[str, Any]]:
    """The artifact of a prune-history run: one row per thing pruned, what was deleted and what is kept."""
    skipped = store.get("skipped")
    rows = [
        {"what": "backtest_results", "deleted": store.get("backtest_results", 0),
         "kept": f"newest {cfg_keep['keep_runs']} runs per strategy, symbol and timeframe"},
        {"what": "probe_samples", "deleted": store.get("probe_samples", 0),
         "kept": f"the last {cfg_keep['probe_sample_days']:g} days"},
        {"what": "service_events", "deleted": store.get("service_events", 0),
         "kept": f"the last {cfg_keep['service_event_days']:g} days, and the newest of each kind of each service"},
    ]
    if skipped:
        for row in rows:
            row["kept"] = f"skipped: {skipped}"
    rows.append({"what": "prefect flow runs", "deleted": runs["deleted"],
                 "kept": f"finished runs of the last {runs['days']:g} days ({runs['failed_days']:g} for failed "
                 "and crashed ones), every unfinished run"
                 + ("; the per-run limit was reached, the next run deletes more" if runs["limit_reached"] else "")})
    return rows


@flow(
    name="prune-history",
    description="Retention: backtest results (newest runs per strategy, symbol and timeframe), probe samples, "
    "service events and finished Prefect flow runs; skipped for the store while db/LOCKED exists.",
    timeout_seconds=3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def prune_history(
    settings: dict[str, Any] | None = None, max_flow_runs: int = MAX_FLOW_RUNS, now: datetime | None = None
) -> dict[str, Any]:
    """One retention pass over the store and Prefect's flow runs, with a table artifact of what went."""
    if max_flow_runs < 0:
        raise InputError(f"max_flow_runs={max_flow_runs} is negative", hint="use 0 to keep every flow run")
    cfg = run_settings(settings)
    store = prune_store(settings, now)
    runs = prune_flow_runs(settings, max_flow_runs, now)
    keep = {"keep_runs": cfg.retention_keep_runs, "probe_sample_days": cfg.retention_probe_sample_days,
            "service_event_days": cfg.retention_service_event_days}
    rows_deleted = int(store.get("total", 0))
    create_table_artifact(
        table=pruned_table(store, runs, keep), key="prune-history",
        description=(f"store skipped ({store['skipped']})" if "skipped" in store else f"{rows_deleted} row(s) deleted")
        + f"; {runs['deleted']} flow run(s) deleted",
    )
    return {"store": store, "flow_runs": {k: v for k, v in runs.items() if k != "ids"} | {"ids": runs["ids"][:50]}}


# --- the storage check (compact, storage-watch) ---


@task(name="measure-storage", cache_policy=NO_CACHE, timeout_seconds=300)
def measure_storage(settings: dict[str, Any] | None, max_gb: float | None = None) -> StorageReport:
    """What the store takes (database, WAL, backups, quarantine) and the free disk, against the limits."""
    cfg = run_settings(settings)
    return retention.storage(
        cfg.db_path, cfg.backup_dir, max_gb=cfg.storage_max_gb if max_gb is None else max_gb,
        min_free_gb=cfg.disk_free_min_gb, quarantine_dir=cfg.quarantine_dir,
    )


def free_disk_low(report: StorageReport) -> bool:
    """Whether the free disk is under the minimum (disk_free_min_gb)."""
    return report.free_bytes < report.min_free_bytes


def low_disk_message(report: StorageReport, source: str) -> tuple[str, str]:
    """Subject and body telling L2 the disk runs out, with the figures and what is done."""
    free, minimum = report.free_bytes / GB, report.min_free_bytes / GB
    subject = f"[crypto-agent] free disk low: {free:.2f} GB, under {minimum:.2f} GB"
    body = "\n".join([
        (f"what happened: {source}'s storage check found only {free:.2f} GB free on the disk "
         f"of the store (minimum: disk_free_min_gb = {minimum:.2f} GB)"),
        f"figures: {report.message}",
        ("done: a retention run (prune-history) starts now: old backtest results, probe samples, service events "
         "and finished flow runs"),
        ("to do: free space on the disk (old files beside the store, the quarantine folder) or move the store; "
         "the next backup needs about the database's size"),
    ])
    return subject, body


def answer_storage(
    report: StorageReport, settings: dict[str, Any] | None, payload: dict[str, Any], source: str
) -> dict[str, Any]:
    """A passed limit emits storage-high with the report; free disk low tells L2 and runs the retention."""
    out: dict[str, Any] = {"ok": report.ok, "problems": report.problems, "told": None, "retention": None}
    low = not report.ok and free_disk_low(report)
    cfg = run_settings(settings)
    if not low:
        page_episode(cfg, LOW_DISK_KEY, False, "l2")  # the disk has room again: the next shortage pages at once
    if report.ok:
        return out
    emit(STORE_STORAGE_HIGH, STORE_RESOURCE,
         {**payload, "source": source, "storage": report.to_dict(), "problems": report.problems})
    if low:
        # the retention runs at every watch; L2 hears of the shortage once, then every page_repeat_after_s
        if page_episode(cfg, LOW_DISK_KEY, True, "l2", *low_disk_message(report, source)):
            out["told"] = "l2"
        state = prune_history(settings=settings, return_state=True)
        out["retention"] = state.result() if state.is_completed() else f"failed: {state.message}"
    return out
