"""The runbook's maintenance jobs: backup (+ dry restore + retention), compact, backup-restore-test,
integrity-check, and storage-watch (hourly: free disk, the store's size, the age of the newest good backup).
Thin flows over crypto_agent.backup, crypto_agent.retention (through flows.retention) and the integrity check."""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from crypto_agent import backup, drill, replica
from crypto_agent.errors import CryptoAgentError
from crypto_agent.settings import Settings
from crypto_agent.store import IntegrityResult, check_integrity
from crypto_agent.storelock import is_locked, lock_path
from flows.common import retry_if_transient, run_settings
from flows.events import STORE_CORRUPT, STORE_OK, STORE_RESOURCE, emit
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, page_episode
from flows.offhost import OffhostResult, offhost_message, upload_backup
from flows.retention import answer_storage, measure_storage

# Problems an event or a message names at most; the integrity output can be thousands of lines.
MAX_PROBLEMS = 20
BACKUP_AGE_KEY = "storage:backup-too-old"  # the alert episode of a store with no recent good backup


class StorageOverLimit(CryptoAgentError):
    """The database uses more space than storage_max_gb even after VACUUM."""


class BackupTestFailed(CryptoAgentError):
    """The monthly restore test (the runbook's backup_test.sh) failed."""


class StoreCorrupt(CryptoAgentError):
    """PRAGMA quick_check / integrity_check found problems in the live database."""


def _backups_table(backup_dir: Path) -> list[dict[str, Any]]:
    return [
        {
            "backup": b.name,
            "status": b.status,
            "size MB": round(b.size / 1e6, 2),
            "ohlcv_h4 rows": b.tables.get("ohlcv_h4"),
            "created_at": b.created_at.isoformat() if b.created_at else None,
            "problems": "; ".join(b.problems[:3]),
        }
        for b in backup.list_backups(backup_dir)
    ]


# --- backup ---


@task(
    name="create-backup",
    retries=2,
    retry_delay_seconds=[60, 300],
    retry_condition_fn=retry_if_transient,
    timeout_seconds=3600,
)
def create_backup(settings: dict[str, Any] | None, now: datetime | None) -> backup.BackupInfo:
    """An online, consistent, checked backup of the live database: db_backup_YYYYMMDD.db and its manifest."""
    cfg = run_settings(settings)
    return backup.create(cfg.db_path, cfg.backup_dir, now=now, verify=True)


@task(name="dry-restore", timeout_seconds=3600)
def dry_restore(backup_path: Path) -> backup.DryRestoreResult:
    """Restore the backup to a scratch file, check it, compare it with its manifest; marks it good or bad."""
    return backup.dry_restore(backup_path)


@task(name="apply-retention", timeout_seconds=600)
def apply_retention(settings: dict[str, Any] | None, now: datetime | None) -> list[Path]:
    """Delete the backups the retention policy does not keep; the files removed."""
    cfg = run_settings(settings)
    return backup.retention(cfg.backup_dir, backup.RetentionPolicy.from_settings(cfg), now=now)


@flow(
    name="backup",
    description="Online verified backup of the live store, then retention (daily, after the data jobs).",
    timeout_seconds=2 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def backup_flow(settings: dict[str, Any] | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Back up and check it (a failing backup leaves nothing and the run fails), apply retention.

    The full check (dry_restore) is the restore drill's, not the daily backup's: see backup.create().
    """
    logger = get_run_logger()
    cfg = run_settings(settings)
    info = create_backup(settings, now)
    offhost = copy_offhost(cfg, info)
    removed = apply_retention(settings, now)
    create_table_artifact(
        table=_backups_table(cfg.backup_dir), key="backups",
        description=f"{info.name}: good ({info.verified}); off-host: {offhost.message}; {len(removed)} old "
        "backup(s) removed",
    )
    logger.info("backup %s good: %d tables, %d bytes; off-host: %s; removed %s", info.name, len(info.tables),
                info.size, offhost.message, ", ".join(p.name for p in removed) or "nothing")
    return {
        "backup": str(info.path),
        "sha256": info.sha256,
        "size": info.size,
        "tables": dict(info.tables),
        "offhost": {"ok": offhost.ok, "skipped": offhost.skipped, "key": offhost.key, "error": offhost.error},
        "removed": [str(p) for p in removed],
    }


OFFHOST_ALERT_KEY = "backup:offhost-failed"


def copy_offhost(cfg: Settings, info: backup.BackupInfo) -> OffhostResult:
    """Issue 12: the good local backup also goes to the off-host bucket (offhost_block). A bucket that fails
    leaves the local copy as it is and tells L2, once per episode (page_episode); a copy that lands ends it."""
    result = upload_backup(cfg, info)
    if result.skipped:
        return result
    if result.ok:
        page_episode(cfg, OFFHOST_ALERT_KEY, False, "l2")
        return result
    subject, body = offhost_message(result, info)
    try:
        page_episode(cfg, OFFHOST_ALERT_KEY, True, "l2", subject, body)
    except CryptoAgentError as exc:  # the local backup stands: a page that cannot be delivered fails nothing here
        get_run_logger().error("L2 could not be told that the off-host copy failed: %s", exc.message)
    return result


# --- compact ---


@task(name="vacuum", retries=2, retry_delay_seconds=[60, 300], retry_condition_fn=retry_if_transient,
      timeout_seconds=3600)
def vacuum(settings: dict[str, Any] | None, max_gb: float | None) -> backup.CompactResult:
    """VACUUM under the recovery lock, then the storage check; Litestream paused meanwhile (its read transaction
    would hold back the checkpoints that fold the rewritten store back into its file, 30 s each, for nothing)."""
    return replica.compact_store(run_settings(settings), "prefect compact", max_gb)


@flow(
    name="compact",
    description="VACUUM under the recovery lock and the storage check (< 1.2 GB) (runbook: Sunday 03:00 UTC).",
    timeout_seconds=2 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def compact_flow(settings: dict[str, Any] | None = None, max_gb: float | None = None) -> dict[str, Any]:
    """Compact, then the storage check (storage-high, low disk -> L2 and retention); over the limit, fail (L1)."""
    result = vacuum(settings, max_gb)
    report = measure_storage(settings, max_gb)
    summary: dict[str, Any] = {
        "size_before": result.size_before,
        "size_after": result.size_after,
        "limit_bytes": result.storage.limit_bytes,
        "over_limit": result.over_limit,
        "seconds": round(result.duration_s, 3),
    }
    create_markdown_artifact(
        markdown=(
            "## Compact\n\n"
            f"- before: {result.size_before / 1e6:.1f} MB, after: {result.size_after / 1e6:.1f} MB\n"
            f"- {result.storage.message}\n"
            f"- {report.message}\n"
        ),
        key="compact",
        description=result.storage.message,
    )
    answered = answer_storage(report, settings, summary, "compact")
    summary["storage"] = {**report.to_dict(), "told": answered["told"], "retention": answered["retention"]}
    if result.over_limit:
        raise StorageOverLimit(
            result.storage.message,
            hint="the database outgrew its limit even after VACUUM: archive old candles or raise storage_max_gb",
        )
    return summary


# --- backup-restore-test ---


@task(name="restore-test", cache_policy=NO_CACHE, timeout_seconds=3600)
def restore_test(settings: dict[str, Any] | None, now: datetime | None) -> drill.DrillResult:
    """The restore drill: yesterday's backup (else the newest good) restored into staging and the system run on it."""
    cfg = run_settings(settings)
    return drill.run_drill(cfg, now=now)


@flow(
    name="backup-restore-test",
    description="The monthly restore drill (first Sunday of the month): the backup restored into a staging home, "
    "the daemon and the trader run on it, data checks and one backtest; a failed drill pages L2.",
    timeout_seconds=2 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def backup_restore_test(settings: dict[str, Any] | None = None, now: datetime | None = None) -> str:
    """Drill yesterday's backup on staging; publish the figures; on failure page L2 and fail the run."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    try:
        result = restore_test(settings, now)
    except drill.DrillRefused as exc:
        page_episode(cfg, drill.ALERT_KEY, True, "l2", "[crypto-agent] restore drill refused to run", str(exc))
        raise
    create_markdown_artifact(markdown=drill.report_markdown(result), key="backup-restore-test",
                             description=result.summary)
    try:
        paged = page_episode(cfg, drill.ALERT_KEY, not result.ok, "l2", *drill.page_message(result))
        told = "L2 was paged" if paged else "L2 was not paged again (paged already this episode, or silenced)"
    except Exception as exc:  # noqa: BLE001 (the drill's problems stay the run's message; the failure hook tells L1)
        logger.error("the L2 page about the restore drill did not go out: %s", exc)
        told = f"the L2 page did not go out ({exc})"
    logger.info("%s (recorded in %s)", result.summary, drill.drill_record_path(cfg))
    if not result.ok:
        raise BackupTestFailed(
            "ERROR: " + "; ".join(result.problems[:5]),
            hint=f"{told}; read the staging logs in {result.staging}/logs, take a fresh backup (deployment "
            "backup/daily) and rerun this drill",
        )
    healthy = ", ".join(f"{name} HEALTHY in {s:.1f} s" for name, s in result.healthy_s.items())
    return (f"✅ Backup test passed: {result.backup} (rows={result.tables.get('ohlcv_h4', 0)}); restore drill on "
            f"staging: restored in {result.restore_s or 0:.1f} s, {healthy}, data checks ok, one backtest ran, "
            f"{result.total_s:.1f} s in all")


# --- integrity-check ---


@task(name="check-integrity", timeout_seconds=3600)
def check_store_integrity(settings: dict[str, Any] | None, full: bool) -> IntegrityResult:
    """PRAGMA quick_check (or integrity_check when full) of the live database, read-only."""
    cfg = run_settings(settings)
    return check_integrity(cfg.db_path, full=full)


def integrity_event_payload(result: IntegrityResult, db_path: Path) -> dict[str, Any]:
    """What crypto-agent.store.corrupt carries: the check's mode, the database, its first problems and their count."""
    return {"mode": result.mode, "db_path": str(db_path), "problems": result.problems[:MAX_PROBLEMS],
            "problems_total": len(result.problems)}


@flow(
    name="integrity-check",
    description="PRAGMA quick_check hourly, full integrity_check weekly; a failure emits crypto-agent.store.corrupt.",
    timeout_seconds=2 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def integrity_check(settings: dict[str, Any] | None = None, full: bool = False) -> dict[str, Any]:
    """Check the live database; on problems emit crypto-agent.store.corrupt with the first ones and fail."""
    cfg = run_settings(settings)
    result = check_store_integrity(settings, full)
    payload = integrity_event_payload(result, cfg.db_path)
    if result.ok:
        emit(STORE_OK, STORE_RESOURCE, {"check": result.mode})
        return payload
    emit(STORE_CORRUPT, STORE_RESOURCE, payload)
    raise StoreCorrupt(
        f"{result.mode} of {cfg.db_path} found {len(result.problems)} problem(s): "
        + "; ".join(result.problems[:5]),
        hint="the database-corruption recovery restores yesterday's good backup; "
        "do not copy files over the database by hand",
    )


# --- storage-watch: free disk, the store's size, the age of the newest good backup ---


@task(name="newest-good-backup", cache_policy=NO_CACHE, timeout_seconds=300)
def newest_good_backup(settings: dict[str, Any] | None) -> backup.BackupInfo | None:
    """The newest good backup (the one a restore would choose), None when there is none."""
    try:
        return backup.choose_backup(run_settings(settings).backup_dir)
    except backup.NoGoodBackup:
        return None


def backup_age_hours(info: backup.BackupInfo, now: datetime) -> float:
    """Hours since a backup was taken (its manifest's created_at; else the start of its day, UTC)."""
    taken = info.created_at or datetime.combine(info.day, time(0, 0), tzinfo=UTC)
    return (now - taken.astimezone(UTC)).total_seconds() / 3600


def stale_backup_message(info: backup.BackupInfo | None, age_h: float | None, limit_h: float,
                         action: str) -> tuple[str, str]:
    """Subject and body telling L2 the newest good backup is too old (or missing), and what is done."""
    if info is None or age_h is None:
        subject = "[crypto-agent] no good backup of the store"
        what = "no good backup of the store exists: a corruption could not be restored from one"
    else:
        subject = f"[crypto-agent] newest good backup is {age_h:.1f} h old (limit {limit_h:g} h)"
        what = (f"the newest good backup, {info.name}, was taken {age_h:.1f} h ago, over the "
                f"{limit_h:g} h limit (backup_max_age_hours): the daily backup (02:30 UTC) did not run or failed")
    body = "\n".join([
        f"what happened: {what}",
        f"done: {action}",
        ("to do: look at the backup flow's last runs in the Prefect UI (is the worker up? is the disk full?); "
         "`crypto-agent backups` lists them"),
    ])
    return subject, body


def watch_backup_age(settings: dict[str, Any] | None) -> dict[str, Any]:
    """The newest good backup older than backup_max_age_hours (or none): tell L2 and take a backup."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    if not cfg.db_path.exists():
        return {"skipped": f"no database at {cfg.db_path} yet: nothing to back up"}
    info = newest_good_backup(settings)
    age_h = None if info is None else backup_age_hours(info, datetime.now(UTC))
    out: dict[str, Any] = {"newest": info.name if info else None,
                           "age_hours": None if age_h is None else round(age_h, 2),
                           "limit_hours": cfg.backup_max_age_hours, "told": None, "backup": None}
    if age_h is not None and age_h <= cfg.backup_max_age_hours:
        logger.info("newest good backup %s is %.1f h old: fine", out["newest"], age_h)
        page_episode(cfg, BACKUP_AGE_KEY, False, "l2")
        return out
    locked = is_locked(cfg.db_path)
    action = (f"no backup now: {lock_path(cfg.db_path)} exists (a recovery holds the store); the next watch retries"
              if locked else "a backup (the backup flow: online copy, dry restore, retention) starts now")
    # a backup is tried at every watch; L2 hears of the problem once, then every page_repeat_after_s
    if page_episode(cfg, BACKUP_AGE_KEY, True, "l2", *stale_backup_message(info, age_h, cfg.backup_max_age_hours,
                                                                            action)):
        out["told"] = "l2"
    if locked:
        out["backup"] = "skipped: the store is locked by a recovery"
        return out
    state = backup_flow(settings=settings, return_state=True)
    out["backup"] = state.result()["backup"] if state.is_completed() else f"failed: {state.message}"
    return out


@flow(
    name="storage-watch",
    description="Hourly: the storage check (database + WAL, backups, free disk: low -> L2 and retention) and the "
    "age of the newest good backup (older than backup_max_age_hours -> L2 and a backup).",
    timeout_seconds=2 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def storage_watch(settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Watch what the store takes on disk and how old its newest good backup is; act on what is wrong."""
    report = measure_storage(settings)
    storage = answer_storage(report, settings, {}, "storage-watch")
    backups = watch_backup_age(settings)
    create_table_artifact(
        table=[{"check": "storage", "ok": report.ok, "detail": report.message,
                "done": "L2 told, retention run" if storage["told"] else ""},
               {"check": "newest good backup", "ok": backups.get("told") is None,
                "detail": backups.get("skipped") or f"{backups['newest'] or 'none'}, {backups['age_hours']} h old "
                f"(limit {backups['limit_hours']:g} h)",
                "done": f"L2 told; backup: {backups['backup']}" if backups.get("told") else ""}],
        key="storage-watch",
        description=f"{report.message}; newest good backup: {backups.get('newest') or 'none'}",
    )
    return {"storage": {**report.to_dict(), **storage}, "backup": backups}
