"""The runbook's maintenance jobs: backup (+ dry restore + retention), compact, backup-restore-test,
integrity-check. Thin flows over crypto_agent.backup and the store's integrity check."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from crypto_agent import backup
from crypto_agent.errors import CryptoAgentError
from crypto_agent.store import IntegrityResult, check_integrity
from flows.common import retry_if_transient, run_settings
from flows.events import STORE_CORRUPT, STORE_OK, STORE_RESOURCE, STORE_STORAGE_HIGH, emit
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS

# Problems an event or a message names at most; the integrity output can be thousands of lines.
MAX_PROBLEMS = 20


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
    """An online, consistent backup of the live database: db_backup_YYYYMMDD.db and its manifest."""
    cfg = run_settings(settings)
    return backup.create(cfg.db_path, cfg.backup_dir, now=now, verify=False)


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
    description="Online backup of the live store, its dry restore, then retention (daily, after the data jobs).",
    timeout_seconds=2 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def backup_flow(settings: dict[str, Any] | None = None, now: datetime | None = None) -> dict[str, Any]:
    """Back up, verify by a dry restore (a failing backup is marked bad and the run fails), apply retention."""
    logger = get_run_logger()
    cfg = run_settings(settings)
    info = create_backup(settings, now)
    check = dry_restore(info.path)
    if not check.ok:
        create_table_artifact(table=_backups_table(cfg.backup_dir), key="backups",
                              description=f"{info.name} failed its dry restore and is marked bad")
        raise backup.BackupVerificationFailed(
            f"backup {info.path} failed its dry restore: {'; '.join(check.problems[:5])}; "
            "it is marked bad and will never be chosen by a restore",
            hint="check the live database with `crypto-agent check-integrity --full`, then run the backup again",
        )
    removed = apply_retention(settings, now)
    create_table_artifact(
        table=_backups_table(cfg.backup_dir), key="backups",
        description=f"{info.name}: good ({check.duration_s:.1f} s dry restore); {len(removed)} old backup(s) removed",
    )
    logger.info("backup %s good: %d tables, %d bytes; removed %s", info.name, len(check.tables), info.size,
                ", ".join(p.name for p in removed) or "nothing")
    return {
        "backup": str(info.path),
        "sha256": info.sha256,
        "size": info.size,
        "tables": dict(check.tables),
        "removed": [str(p) for p in removed],
    }


# --- compact ---


@task(name="vacuum", retries=2, retry_delay_seconds=[60, 300], retry_condition_fn=retry_if_transient,
      timeout_seconds=3600)
def vacuum(settings: dict[str, Any] | None, max_gb: float | None) -> backup.CompactResult:
    """VACUUM under the recovery lock, then the storage check."""
    cfg = run_settings(settings)
    return backup.compact(cfg.db_path, max_gb=max_gb if max_gb is not None else cfg.storage_max_gb,
                          owner="prefect compact")


@flow(
    name="compact",
    description="VACUUM under the recovery lock and the storage check (< 1.2 GB) (runbook: Sunday 03:00 UTC).",
    timeout_seconds=2 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def compact_flow(settings: dict[str, Any] | None = None, max_gb: float | None = None) -> dict[str, Any]:
    """Compact the store; over the storage limit, emit crypto-agent.store.storage-high and fail (alerting L1)."""
    result = vacuum(settings, max_gb)
    summary = {
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
        ),
        key="compact",
        description=result.storage.message,
    )
    if result.over_limit:
        emit(STORE_STORAGE_HIGH, STORE_RESOURCE, summary)
        raise StorageOverLimit(
            result.storage.message,
            hint="the database outgrew its limit even after VACUUM: archive old candles or raise storage_max_gb",
        )
    return summary


# --- backup-restore-test ---


@task(name="restore-test", timeout_seconds=3600)
def restore_test(settings: dict[str, Any] | None, now: datetime | None) -> tuple[bool, str]:
    """The runbook's backup_test.sh: yesterday's backup exists, integrity ok, ohlcv_h4 holds enough rows."""
    cfg = run_settings(settings)
    return backup.restore_test(cfg.backup_dir, now=now, min_rows=cfg.backup_test_min_rows)


@flow(
    name="backup-restore-test",
    description="The runbook's monthly backup_test.sh (first Sunday of the month).",
    timeout_seconds=2 * 3600,
    on_failure=FAILURE_HOOKS,
    on_crashed=CRASH_HOOKS,
)
def backup_restore_test(settings: dict[str, Any] | None = None, now: datetime | None = None) -> str:
    """Test yesterday's backup; a corrupted one is marked bad (never restored) and the run fails."""
    ok, message = restore_test(settings, now)
    create_markdown_artifact(markdown=f"## Backup restore test\n\n{message}\n", key="backup-restore-test",
                             description=message.splitlines()[0])
    if not ok:
        raise BackupTestFailed(
            message,
            hint="check the backup flow's last runs; take a fresh backup (deployment backup/daily) and rerun this test",
        )
    return message


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
