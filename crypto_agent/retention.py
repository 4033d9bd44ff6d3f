"""Bounded growth: old rows pruned from the tables that gain rows forever, and where the disk stands.

`prune(store)` keeps the newest `keep_runs` backtest runs of every strategy, symbol and timeframe,
and drops probe samples and service events older than their days (the newest event of each kind
of each service always stays: `recovery.last_start` reads it). Deletes go in small batches, so a
live trader or daemon waits at most one batch. `storage(...)` sums what the store takes on disk (the
database, its WAL, the backups and quarantine folders) and the free space, against the limits.
`flow_runs_to_delete()` picks the Prefect flow runs to drop (the flow deletes them: no prefect here).
Nothing here runs on its own schedule: the maintenance flow calls it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import text

from crypto_agent.errors import InputError
from crypto_agent.store import Store, store_locked
from crypto_agent.storelock import locked_error

GB = 1_000_000_000  # decimal gigabytes, like the runbook's "1.2 GB" (backup.GB)
DAY_MS = 86_400_000
KEEP_RUNS = 30
PROBE_SAMPLE_DAYS = 7.0
SERVICE_EVENT_DAYS = 30.0
MIN_FREE_GB = 1.0
BATCH = 5000


@dataclass(frozen=True)
class Pruned:
    """Rows deleted per table by one retention pass, and how long it took."""

    backtest_results: int
    probe_samples: int
    service_events: int
    seconds: float

    @property
    def total(self) -> int:
        """Rows deleted, all tables."""
        return self.backtest_results + self.probe_samples + self.service_events

    @property
    def message(self) -> str:
        """One line for an operator."""
        if not self.total:
            return "retention: nothing to delete"
        return (f"retention deleted {self.total} rows: {self.backtest_results} backtest results, "
                f"{self.probe_samples} probe samples, {self.service_events} service events")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"backtest_results": self.backtest_results, "probe_samples": self.probe_samples,
                "service_events": self.service_events, "total": self.total, "seconds": round(self.seconds, 3)}


def _check_store(store: Store) -> None:
    """StoreLocked while a recovery holds the store: retention is a writer like any other."""
    if store_locked(store):
        raise locked_error(store.path, "retention deleted nothing", "run the retention again")


def _delete_ids(store: Store, table: str, select_ids_sql: str, params: dict[str, Any]) -> int:
    """Delete the rows of table whose ids the query selects, BATCH at a time in their own transactions; rows deleted."""
    deleted = 0
    while True:
        with store.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(text(f"{select_ids_sql} LIMIT {BATCH}"), params)]
            if not ids:
                return deleted
            marks = ", ".join(str(int(i)) for i in ids)
            deleted += conn.execute(text(f"DELETE FROM {table} WHERE id IN ({marks})")).rowcount
        if len(ids) < BATCH:
            return deleted


def prune_backtest_results(store: Store, keep_runs: int = KEEP_RUNS) -> int:
    """Delete all backtest results but the newest keep_runs runs per strategy, symbol and timeframe; rows deleted.

    A run's age is its newest row (created_at); a run that wrote several rows of one unit counts once.
    """
    if keep_runs < 1:
        raise InputError(f"keep_runs={keep_runs} would delete every backtest result",
                         hint="keep at least 1 run per strategy, symbol and timeframe")
    _check_store(store)
    sql = (
        "SELECT id FROM backtest_results WHERE id IN (SELECT id FROM ("
        " SELECT id, DENSE_RANK() OVER (PARTITION BY strategy, symbol, timeframe"
        "   ORDER BY run_newest DESC, run_id DESC) AS rnk FROM ("
        "  SELECT id, strategy, symbol, timeframe, run_id,"
        "   MAX(created_at) OVER (PARTITION BY strategy, symbol, timeframe, run_id) AS run_newest"
        "  FROM backtest_results)) WHERE rnk > :keep)"
    )
    return _delete_ids(store, "backtest_results", sql, {"keep": keep_runs})


def _cutoff_ms(days: float, now: float | None) -> int:
    """The epoch ms `days` before now; InputError for less than a day (the 24 h crash window needs it)."""
    if days < 1:
        raise InputError(f"a retention of {days:g} days would delete rows the 24 h checks still read",
                         hint="keep at least 1 day")
    now = time.time() if now is None else now
    return int((now - days * 86_400) * 1000)


def prune_probe_samples(store: Store, days: float = PROBE_SAMPLE_DAYS, now: float | None = None) -> int:
    """Delete probe samples older than `days`; rows deleted."""
    _check_store(store)
    return _delete_ids(store, "probe_samples", "SELECT id FROM probe_samples WHERE checked_at < :cutoff",
                       {"cutoff": _cutoff_ms(days, now)})


def prune_service_events(store: Store, days: float = SERVICE_EVENT_DAYS, now: float | None = None) -> int:
    """Delete service events older than `days`, but never the newest of each kind of each service; rows deleted."""
    _check_store(store)
    sql = ("SELECT id FROM service_events WHERE at < :cutoff AND id NOT IN ("
           "SELECT MAX(id) FROM service_events GROUP BY service, kind)")
    cutoff = _cutoff_ms(days, now)
    deleted = _delete_ids(store, "service_events", sql, {"cutoff": cutoff})
    # the claims of crashes already reported as events (crypto_agent.monitor) go with them: one row per crash
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM reported_service_events WHERE reported_at < :cutoff"), {"cutoff": cutoff})
    return deleted


def prune(
    store: Store,
    *,
    keep_runs: int = KEEP_RUNS,
    probe_sample_days: float = PROBE_SAMPLE_DAYS,
    service_event_days: float = SERVICE_EVENT_DAYS,
    now: float | None = None,
) -> Pruned:
    """One retention pass over the three growing tables; the rows deleted from each."""
    started = time.perf_counter()
    for days in (probe_sample_days, service_event_days):  # validate before any delete
        _cutoff_ms(days, now)
    results = prune_backtest_results(store, keep_runs)
    samples = prune_probe_samples(store, probe_sample_days, now)
    events = prune_service_events(store, service_event_days, now)
    return Pruned(results, samples, events, time.perf_counter() - started)


# --- Prefect's flow runs (about 430 a day): the decision here, the deletion in the flow ---

FLOW_RUN_DAYS = 14.0
FAILED_FLOW_RUN_DAYS = 30.0  # failed and crashed runs stay longer: post-incident reviews read them
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
FAILED_STATES = frozenset({"FAILED", "CRASHED"})


def flow_runs_to_delete(
    runs: Iterable[tuple[str, str, float | None]],
    now: float | None = None,
    *,
    days: float = FLOW_RUN_DAYS,
    failed_days: float = FAILED_FLOW_RUN_DAYS,
) -> list[str]:
    """The ids of the flow runs to delete, from (id, state type, end time in epoch s) of each run.

    Only finished runs go: completed and cancelled ones older than `days`, failed and crashed ones
    older than `failed_days`; a run still scheduled, pending or running (or without an end) stays.
    """
    if days < 1 or failed_days < days:
        raise InputError(f"flow-run retention of {days:g} days ({failed_days:g} for failed runs) is too short",
                         hint="keep at least 1 day, and failed runs at least as long as the others")
    now = time.time() if now is None else now
    out = []
    for run_id, state, ended in runs:
        kind = str(state).upper()
        if kind not in TERMINAL_STATES or ended is None:
            continue
        keep_s = (failed_days if kind in FAILED_STATES else days) * 86_400
        if now - ended > keep_s:
            out.append(run_id)
    return out


# --- the storage check ---


def folder_bytes(folder: Path | str) -> int:
    """Bytes of the regular files under a folder (symlinks not followed); 0 when it does not exist."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # deleted meanwhile
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def _size(path: Path) -> int:
    """A file's size, 0 when it does not exist."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _existing(path: Path) -> Path:
    """The path, or its nearest existing ancestor (for the free space of a disk where nothing is yet)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path("/")


@dataclass(frozen=True)
class StorageReport:
    """What the store takes on disk, the free space, and the limits they are held against (bytes)."""

    db_bytes: int
    wal_bytes: int
    backups_bytes: int
    quarantine_bytes: int
    free_bytes: int
    disk_bytes: int
    db_limit_bytes: int
    min_free_bytes: int
    total_limit_bytes: int | None = None

    @property
    def database_bytes(self) -> int:
        """The database as the runbook's limit counts it: the file and its WAL."""
        return self.db_bytes + self.wal_bytes

    @property
    def total_bytes(self) -> int:
        """Everything the store takes: database, WAL, backups and quarantine."""
        return self.database_bytes + self.backups_bytes + self.quarantine_bytes

    @property
    def problems(self) -> list[str]:
        """Each limit passed, as a sentence with what to do (empty when all is well)."""
        out = []
        if self.database_bytes > self.db_limit_bytes:
            out.append(f"the database uses {self.database_bytes / GB:.2f} GB (file and WAL), over the "
                       f"{self.db_limit_bytes / GB:.2f} GB limit: run the retention, then compact")
        if self.total_limit_bytes is not None and self.total_bytes > self.total_limit_bytes:
            out.append(f"database, backups and quarantine take {self.total_bytes / GB:.2f} GB, over the "
                       f"{self.total_limit_bytes / GB:.2f} GB limit: prune old backups and quarantined files")
        if self.free_bytes < self.min_free_bytes:
            out.append(f"only {self.free_bytes / GB:.2f} GB free on the disk, under the "
                       f"{self.min_free_bytes / GB:.2f} GB minimum: free space before the next backup")
        return out

    @property
    def ok(self) -> bool:
        """Whether every limit holds."""
        return not self.problems

    @property
    def message(self) -> str:
        """One line for an operator: the figures, then each problem."""
        head = (f"database {self.db_bytes / GB:.3f} GB + WAL {self.wal_bytes / GB:.3f} GB "
                f"(limit {self.db_limit_bytes / GB:.2f} GB), backups {self.backups_bytes / GB:.3f} GB, "
                f"quarantine {self.quarantine_bytes / GB:.3f} GB, {self.free_bytes / GB:.2f} GB free")
        return f"storage ok: {head}" if self.ok else f"ALERT: {'; '.join(self.problems)} ({head})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"db_bytes": self.db_bytes, "wal_bytes": self.wal_bytes, "backups_bytes": self.backups_bytes,
                "quarantine_bytes": self.quarantine_bytes, "free_bytes": self.free_bytes,
                "disk_bytes": self.disk_bytes, "db_limit_bytes": self.db_limit_bytes,
                "min_free_bytes": self.min_free_bytes, "total_limit_bytes": self.total_limit_bytes,
                "ok": self.ok, "problems": self.problems}


def storage(
    db_path: Path | str,
    backup_dir: Path | str,
    *,
    max_gb: float = 1.2,
    min_free_gb: float = MIN_FREE_GB,
    quarantine_dir: Path | str | None = None,
    max_total_gb: float | None = None,
) -> StorageReport:
    """The storage check: database + WAL against max_gb, free disk against min_free_gb, and the folders' sizes."""
    db = Path(db_path)
    usage = shutil.disk_usage(_existing(db.parent))
    return StorageReport(
        db_bytes=_size(db),
        wal_bytes=_size(db.with_name(db.name + "-wal")),
        backups_bytes=folder_bytes(backup_dir),
        quarantine_bytes=folder_bytes(quarantine_dir) if quarantine_dir is not None else 0,
        free_bytes=usage.free,
        disk_bytes=usage.total,
        db_limit_bytes=int(max_gb * GB),
        min_free_bytes=int(min_free_gb * GB),
        total_limit_bytes=None if max_total_gb is None else int(max_total_gb * GB),
    )
