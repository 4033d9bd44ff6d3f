"""The steps several recoveries share: probe, stop, clean, start and confirm a service; restore a good
backup, resync the candles since it and salvage the newer rows; without one, rebuild a fresh store from
every readable row and re-fetch the candle history; with the store's lock held.

Tasks return crypto_agent's values (health.ProbeReport, recovery.ServiceStop, recovery.Restoration ...);
the helpers below them run a sequence of tasks and record each in the incident (`run.act`).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from crypto_agent import backup, health, holds, incidents, priority, process, rebuild, recovery, replica, storelock
from crypto_agent.collector import Window, backfill
from crypto_agent.errors import CryptoAgentError
from crypto_agent.exchange import BinanceClient
from crypto_agent.incidents import RECOVERED, RESOLVED, SKIPPED
from crypto_agent.settings import Settings
from crypto_agent.store import IntegrityResult, Store, open_store
from flows.common import failure_of, retry_if_transient, run_settings
from flows.maintenance import check_store_integrity
from flows.recovery.skeleton import LOCK_WAIT_S, Recovery, check_hold, lock_blocker

SERVICES_STOP_ORDER = ("backtest", "trader")  # the backtest first: live trading keeps going longest
BACKUP_SINCE_MARGIN_MS = 10 * 60_000  # rows written while a backup was being taken may be missing from it


class ServiceUnhealthy(CryptoAgentError):
    """A service that a recovery started is not HEALTHY (yet)."""


class RecoveryFailed(CryptoAgentError):
    """A verification step of a recovery failed; the incident is closed as failed and L2 is told."""


class RestoreUnsound(RecoveryFailed):
    """The restored backup fails its integrity check; `quarantined` is the database it replaced (None: none)."""

    quarantined: Path | None = None


def sound_store(cfg: Settings) -> Store | None:
    """The store for bookkeeping (service events) when it exists and opens; None otherwise."""
    if not Path(cfg.db_path).exists():
        return None
    try:
        return open_store(cfg)
    except CryptoAgentError:
        return None


def integrity_detail(result: IntegrityResult) -> str:
    """integrity_check's answer for the incident: ok, or its problems (the first 50)."""
    if result.ok:
        return f"{result.mode}: ok"
    return f"{result.mode}: {len(result.problems)} problem(s)\n" + "\n".join(result.problems[:50])


# --- a service: probe, stop, clean, start, confirm ---


@task(name="probe-service", timeout_seconds=120, cache_policy=NO_CACHE)
def probe_service(settings: dict[str, Any] | None, service: str) -> health.ProbeReport:
    """The health probe of a service: HEALTHY, DEGRADED or DEAD with the reasons; signals nothing."""
    cfg = run_settings(settings)
    return health.probe(process.service_spec(service, cfg), cfg)


@task(name="stop-service", timeout_seconds=300, cache_policy=NO_CACHE)
def stop_service(settings: dict[str, Any] | None, service: str, grace_s: float | None = None) -> recovery.ServiceStop:
    """SIGTERM our service, SIGKILL after grace_s (stop_grace_s by default); a pidfile naming another process is
    refused, not signalled."""
    cfg = run_settings(settings)
    try:
        result = process.stop(process.service_spec(service, cfg),
                              grace_s=cfg.stop_grace_s if grace_s is None else grace_s)
    except process.NotOurProcess as exc:
        return recovery.ServiceStop(service, None, refused=exc.message)
    return recovery.ServiceStop(service, result)


@task(name="clean-state-files", timeout_seconds=60, cache_policy=NO_CACHE)
def clean_service_state(settings: dict[str, Any] | None, service: str) -> list[str]:
    """Remove the pidfile, ownership record and heartbeat of a service that is gone (a dead one's crash recorded)."""
    cfg = run_settings(settings)
    store = sound_store(cfg)
    try:
        return [p.name for p in process.clean_state(process.service_spec(service, cfg), store=store)]
    finally:
        if store is not None:
            store.close()


@task(name="start-service", retries=1, retry_delay_seconds=5, timeout_seconds=300, cache_policy=NO_CACHE,
      retry_condition_fn=lambda task, run, state: not isinstance(failure_of(state), holds.ServicePaused))
def start_service(settings: dict[str, Any] | None, service: str) -> process.StartResult:
    """Start the service detached, without any injected fault of its previous instance; wait for its first heartbeat."""
    cfg = run_settings(settings)
    store = sound_store(cfg)
    try:
        return process.start(process.service_spec(service, cfg), cfg, env=recovery.CLEAN_START_ENV, store=store)
    finally:
        if store is not None:
            store.close()


@task(name="confirm-healthy", retries=5, retry_delay_seconds=[1, 2, 4, 8, 15], timeout_seconds=120,
      cache_policy=NO_CACHE,
      # a new instance that is already gone will not become healthy: no 30 s of retries, the caller decides
      retry_condition_fn=lambda task, run, state: ": DEAD:" not in str(failure_of(state) or ""))
def confirm_healthy(settings: dict[str, Any] | None, service: str) -> health.ProbeReport:
    """Probe the service until it is HEALTHY (retried with backoff); ServiceUnhealthy with the reasons otherwise."""
    cfg = run_settings(settings)
    report = health.probe(process.service_spec(service, cfg), cfg)
    if not report.healthy:
        raise ServiceUnhealthy(f"{service} is not healthy after the restart: {report.summary}",
                               hint=f"read its log {process.service_spec(service, cfg).log}")
    return report


@task(name="read-log-errors", timeout_seconds=60, cache_policy=NO_CACHE)
def read_log_errors(settings: dict[str, Any] | None, service: str) -> list[str]:
    """The runbook's `tail -100 <log> | grep -i error` of the service's log."""
    cfg = run_settings(settings)
    return recovery.log_errors(process.service_spec(service, cfg).log)


def stop_reported(run: Recovery, settings: dict[str, Any] | None, service: str,
                  report: health.ProbeReport | None = None) -> recovery.ServiceStop:
    """Stop a service (our PID only) and record how: refused (a stranger's pidfile), gracefully, by force, or idle.
    With the probe's `report` of a service silent past the heartbeat limit, the grace is the shorter
    hung_stop_grace_s (crypto_agent.recovery.stop_grace_s)."""
    grace_s = recovery.stop_grace_s(run.cfg, report.heartbeat_age_s if report is not None else None)
    stopped = stop_service(settings, service, grace_s)
    if stopped.refused:
        run.act("stop-refused", f"{service}: {stopped.refused}; that process was left alone", ok=False)
    elif stopped.result is not None and stopped.result.was_running:
        how = "gracefully (SIGTERM)" if stopped.result.signal == "SIGTERM" else \
            f"by force (SIGKILL after {grace_s:g} s of SIGTERM)"
        run.act("stop", f"stopped {service} (PID {stopped.result.pid}) {how} in {round(stopped.result.elapsed_s, 2)} s")
    else:
        run.act("stop", f"{service} was not running")
    return stopped


def stop_all(run: Recovery, settings: dict[str, Any] | None) -> dict[str, recovery.ServiceStop]:
    """Stop every service, the backtest first (our PIDs only); what each stop did."""
    return {name: stop_reported(run, settings, name) for name in SERVICES_STOP_ORDER}


def start_verified(run: Recovery, settings: dict[str, Any] | None, service: str) -> health.ProbeReport | None:
    """Start a service and confirm it HEALTHY; None (nothing started) when it is paused or held."""
    kept = check_hold(service, run.cfg)
    if kept.pause is not None:
        run.act("not-started", f"{service} stays paused ({kept.pause.get('reason', 'no reason given')}, by "
                f"{kept.pause.get('by', 'unknown')}): `crypto-agent service resume {service}` resumes it")
        return None
    if kept.hold is not None:
        run.act("not-started", f"{service} is held {kept.hold}: its holder starts it again")
        return None
    started = start_service(settings, service)
    cleaned = [p.name for p in started.cleaned]
    run.act("start", f"started {service}: PID {started.pid} in {round(started.elapsed_s, 2)} s"
            + (f"; cleaned {', '.join(cleaned)}" if cleaned else ""))
    report = confirm_healthy(settings, service)
    run.act("confirm-healthy", f"{service}: {report.summary}")
    return report


def clean_and_restart(run: Recovery, settings: dict[str, Any] | None, service: str) -> health.ProbeReport | None:
    """The tail of a service recovery: clean the state files, start it, confirm it HEALTHY (None: kept stopped)."""
    cleaned = clean_service_state(settings, service)
    run.act("clean-state", f"removed {', '.join(cleaned)}" if cleaned else "no state files left")
    return start_verified(run, settings, service)


def restart_and_close(run: Recovery, settings: dict[str, Any] | None, service: str, *, impact: str, root_cause: str,
                      held: str) -> dict[str, Any]:
    """The tail of the service recoveries: clean, restart, confirm HEALTHY (the backtest resumes once the trader is
    back), close the incident; `held` is the summary when the service is kept stopped meanwhile."""
    healthy = clean_and_restart(run, settings, service)
    if healthy is None:
        return run.finish(RESOLVED, SKIPPED, summary=held, impact=impact, root_cause=root_cause, data_lost_hours=0)
    resume_backtest(run, run.cfg, service, healthy)
    return run.finish(RESOLVED, RECOVERED, summary=f"{service} restarted and HEALTHY (PID {healthy.pid})",
                      impact=impact, root_cause=root_cause, data_lost_hours=0, pid=healthy.pid)


# --- live trading first: the backtest pauses itself while the trader is recovered ---


def yield_to_trader(run: Recovery, cfg: Settings, service: str) -> None:
    """Live trading first: while the trader is recovered, the backtest pauses (run/backtest.yield)."""
    if service != priority.FIRST_SERVICE:
        return
    asked = priority.yield_request(cfg)
    if asked is not None and asked.incident_id == run.id:
        return  # asked already in this incident (a handover)
    priority.request_yield(cfg, f"recover-{run.scenario} #{run.id}", "the trader is being recovered",
                           incident_id=run.id)
    run.act("pause-backtest",
            f"live trading first: the backtest pauses until the trader is HEALTHY (incident #{run.id})")


def resume_backtest(run: Recovery, cfg: Settings, service: str, report: health.ProbeReport | None) -> None:
    """The trader confirmed HEALTHY: withdraw the yield request, the backtest resumes (a failed recovery keeps it)."""
    if service != priority.FIRST_SERVICE or report is None or not report.healthy:
        return
    released = priority.release_yield(cfg)
    if released is not None:
        run.act("resume-backtest", f"the trader is HEALTHY ({report.summary}): the backtest resumes (request "
                f"{released.description})")


# --- the store: restore, resync, salvage ---


@task(name="restore-good-backup", retries=2, retry_delay_seconds=[10, 30], timeout_seconds=3600,
      cache_policy=NO_CACHE,
      retry_condition_fn=lambda task, run, state: "still open" in str(failure_of(state) or ""))
def restore_good_backup(
    settings: dict[str, Any] | None, owner: str, reason: str, hours_ago: float | None = None,
    prepared: PreparedReplica | None = None,
) -> recovery.Restoration:
    """Restore the newest good backup (of `hours_ago` or before, when given); a backup failing its check is
    marked bad and the next one tried. Its `backup` is None (with the message) when none qualifies.
    The replica comes first (`prepared`: its copy made ahead, see prepare_replica_copy)."""
    cfg = run_settings(settings)
    refused: list[str] = []
    from_replica = restore_from_replica(cfg, reason, hours_ago, refused, prepared)
    if from_replica is not None:
        return recovery.Restoration(from_replica, refused=tuple(refused))
    fetched_offhost = False
    while True:
        try:
            if hours_ago is None:
                info = backup.choose_backup(cfg.backup_dir)
            else:
                info = backup.backup_for_hours_ago(cfg.backup_dir, hours_ago)
        except backup.NoGoodBackup as exc:
            if not fetched_offhost:  # the off-host copies are the next source (issue 12)
                fetched_offhost = True
                if fetch_offhost_backups(cfg, refused):
                    continue
            return recovery.Restoration(None, message=exc.message, refused=tuple(refused))
        try:
            result = backup.restore(info.path, cfg.db_path, cfg.quarantine_dir, owner=owner, reason=reason)
        except backup.RestoreRefused as exc:
            if backup.backup_info(info.path).status != backup.BAD:
                raise  # refused for another reason (the database is still open): not the backup's fault
            refused.append(f"{info.name}: {exc.message}")
            continue
        created = info.created_at.timestamp() if info.created_at else time.mktime(info.day.timetuple())
        quarantined = result.quarantined / Path(cfg.db_path).name if result.quarantined else None
        restored = recovery.RestoredBackup(info.path, int(created * 1000), quarantined, dict(result.tables),
                                           round(result.duration_s, 2))
        return recovery.Restoration(restored, refused=tuple(refused))


OFFHOST_REFUSAL = "the off-host copies"  # how a refusal of the bucket's copies begins (nothing is marked bad)
OFFHOST_FETCH_MAX = 3


def fetch_offhost_backups(cfg: Settings, refused: list[str]) -> list[Path]:
    """No good local backup: download the newest off-host copies the backup folder lacks (at most
    OFFHOST_FETCH_MAX, each checked against its manifest) into it; what came. Why not, in `refused`."""
    from flows.offhost import download_backup, list_offhost

    if not cfg.offhost_block:
        return []
    try:
        local = {b.name for b in backup.list_backups(cfg.backup_dir)}
        wanted = [b.name for b in list_offhost(cfg) if b.has_manifest and b.name not in local][:OFFHOST_FETCH_MAX]
    except CryptoAgentError as exc:
        refused.append(f"{OFFHOST_REFUSAL}: {exc.message}")
        return []
    got: list[Path] = []
    for name in wanted:
        try:
            got.append(download_backup(cfg, name, Path(cfg.backup_dir)))
        except CryptoAgentError as exc:
            refused.append(f"{OFFHOST_REFUSAL}: {name}: {exc.message}")
    if not wanted:
        refused.append(f"{OFFHOST_REFUSAL}: none the backup folder lacks")
    return got


@contextmanager
def replication_paused(run: Recovery) -> Iterator[None]:
    """Litestream stopped while a recovery replaces the store's file (it holds the old one open), started again
    after on the new one (issue 12); both recorded in the incident."""
    with replica.paused(run.cfg) as pause:
        if pause.was_running:
            run.act("pause-replication", "Litestream stopped while the store's file is replaced")
        yield
    if pause.was_running:
        run.act("resume-replication", pause.error or f"Litestream replicates the new store (PID {pause.restarted_pid})",
                ok=not pause.error)


REPLICA_REACH_SLACK_S = 3600.0  # a point-in-time restore may land this far after the point asked (hourly snapshots)
REPLICA_REFUSAL = "the Litestream replica"  # how a refusal of the replica begins (it is never marked bad)


@dataclass(frozen=True)
class PreparedReplica:
    """The replica's newest point restored and checked beside the store ahead of its use (prepare_replica_copy):
    the copy, or why there is none."""

    copy: replica.ReplicaRestore | None
    refusal: str = ""


REPLICA_SCRATCH = ".replica-restore"  # beside the store (same file system): the checked copy is renamed into place


@task(name="prepare-replica-copy", timeout_seconds=3600, cache_policy=NO_CACHE)
def prepare_replica_copy(settings: dict[str, Any] | None) -> PreparedReplica | None:
    """The replica's newest point restored beside the store and checked fully, while REINDEX is tried on a scratch
    copy (both only read the corrupt file): when REINDEX cannot repair it, the restore is ready and costs no
    second wait. None when replication is off; a refusal when the replica cannot be used."""
    cfg = run_settings(settings)
    if not replica.available(cfg):
        return None
    try:
        return PreparedReplica(replica.restore(cfg, Path(cfg.db_path).parent / REPLICA_SCRATCH))
    except CryptoAgentError as exc:
        return PreparedReplica(None, exc.message)


def discard_prepared(prepared: PreparedReplica | None) -> None:
    """Remove a prepared replica copy that was not used (REINDEX repaired the store)."""
    if prepared is not None and prepared.copy is not None:
        replica.discard(prepared.copy.path)


def restore_from_replica(cfg: Settings, reason: str, hours_ago: float | None,
                         refused: list[str], prepared: PreparedReplica | None = None) -> recovery.RestoredBackup | None:
    """Issue 12: the Litestream replica first: its newest consistent point (a corruption), or the state `hours_ago`
    (a rollback), restored beside the store (same file system), checked fully once (integrity_check and counts),
    then renamed into place with the old file quarantined: no second copy of the whole store. None (why in
    `refused`) when replication is off, the replica is missing, foreign or corrupt, or does not reach back that
    far: the daily backups are tried next. The caller holds the store's lock; the services are stopped.
    `prepared`: the newest point already restored and checked (prepare_replica_copy), used instead."""
    if not replica.available(cfg):
        return None
    asked = None if hours_ago is None else datetime.now(UTC) - timedelta(hours=hours_ago)
    db = Path(cfg.db_path)
    # a retry of the task finds the prepared copy used (gone): it restores the replica again
    if prepared is not None and asked is None and (prepared.copy is None or prepared.copy.path.is_file()):
        if prepared.copy is None:
            refused.append(f"{REPLICA_REFUSAL}: {prepared.refusal}")
            return None
        got = prepared.copy
    else:
        try:
            got = replica.restore(cfg, db.parent / REPLICA_SCRATCH, timestamp=asked)
        except CryptoAgentError as exc:
            refused.append(f"{REPLICA_REFUSAL}: {exc.message}")
            return None
    try:
        if asked is not None and (got.point_in_time is None
                                  or (got.point_in_time - asked).total_seconds() > REPLICA_REACH_SLACK_S):
            refused.append(f"{REPLICA_REFUSAL}: it reaches back only to {got.point_iso}, not to "
                           f"{asked.isoformat(timespec='seconds')}")
            return None
        started = time.perf_counter()
        with open(got.path, "rb+") as f:
            os.fsync(f.fileno())
        if any(Path(f"{db}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
            # as a REINDEXed copy is: the corrupt file quarantined, the checked copy renamed into its place
            folder: Path | None = recovery.put_repaired_in_place(db, got.path, cfg.quarantine_dir, reason)
        else:  # no database left to keep: the copy simply takes its place
            folder = None
            os.replace(got.path, db)
        installed_s = time.perf_counter() - started
    finally:
        replica.discard(got.path)
    point = got.point_in_time or asked or datetime.now(UTC)
    quarantined = folder / db.name if folder else None
    # the "backup" restored is named by the replica's transaction: the incident says source and point in time
    where = Path(cfg.replica_dir) / f"litestream-replica-txid-{got.txid or 'unknown'}"
    return recovery.RestoredBackup(where, int(point.timestamp() * 1000), quarantined, dict(got.tables),
                                   round(got.seconds + installed_s, 2))


@task(name="resync-candles", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def resync_candles(settings: dict[str, Any] | None, since_ms: int, lock_held: bool) -> recovery.ResyncSummary:
    """Fetch every candle the restored store lacks since the backup (and in the continuity window) from the exchange."""
    cfg = run_settings(settings)
    with open_store(cfg) as store, BinanceClient.from_settings(cfg) as client:
        now_ms = client.server_time()
        windows = recovery.resync_windows(store, cfg, since_ms, now_ms)
        summary = backfill(store, client, windows, now_ms=now_ms, lock_held=lock_held)
    return recovery.ResyncSummary(len(windows), summary.total, dict(summary.failures), now_ms)


@task(name="salvage-rows", timeout_seconds=3600, cache_policy=NO_CACHE)
def salvage_rows(settings: dict[str, Any] | None, quarantined_db: str, since_ms: int) -> recovery.SalvageSummary:
    """Copy the readable rows newer than the backup of every non-candle table from the quarantined database."""
    cfg = run_settings(settings)
    return recovery.salvage_since(quarantined_db, cfg.db_path, since_ms)


@contextmanager
def store_lock(run: Recovery) -> Iterator[None]:
    """Hold the store's recovery lock (db/LOCKED), waiting for a live holder (a compaction) up to LOCK_WAIT_S."""
    owner = run.lock_owner
    deadline = time.monotonic() + LOCK_WAIT_S
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(storelock.recovery_lock(run.cfg.db_path, owner))
                break
            except storelock.RecoveryLocked as exc:
                if lock_blocker(run.cfg) is not None or time.monotonic() > deadline:
                    raise
                get_run_logger().info("waiting for the store's lock: %s", exc.message)
                time.sleep(2.0)
        run.act("lock", f"took {storelock.lock_path(run.cfg.db_path)} as {owner!r}: writers pause until it goes")
        yield


def restore_and_resync(
    run: Recovery, settings: dict[str, Any] | None, reason: str, hours_ago: float | None, salvage: bool,
    prepared: PreparedReplica | None = None,
) -> recovery.Restoration:
    """Restore a good backup, verify it, resync the candles since it, salvage newer rows (or, for a rollback,
    leave them in quarantine); what happened, its `backup` None when none qualifies. Runs under the store's lock.
    `prepared`: the replica's copy made while REINDEX was tried (the corruption recovery)."""
    restored = restore_good_backup(settings, run.lock_owner, reason, hours_ago, prepared)
    for refusal in restored.refused:
        if refusal.startswith(REPLICA_REFUSAL):  # the replica is not marked anything: it is tried again next time
            run.act("replica-skipped", f"{refusal}: the daily backups are tried next", ok=False)
        elif refusal.startswith(OFFHOST_REFUSAL):
            run.act("offhost-skipped", refusal, ok=False)
        else:
            run.act("backup-refused", f"{refusal} (now marked bad; never chosen again)", ok=False)
    good = restored.backup
    if good is None:
        return restored
    run.act("restore", f"restored {good.name} (taken {incidents.iso(good.created_at_ms)}) in "
            f"{good.seconds} s; the replaced database is in {good.quarantined or '(there was none)'}")
    verified = check_store_integrity(settings, True)
    run.act("verify-restore", integrity_detail(verified), ok=verified.ok)
    if not verified.ok:
        unsound = RestoreUnsound(
            f"the restored database fails its integrity check: {'; '.join(verified.problems[:3])}",
            hint="restore another backup by hand: `crypto-agent restore --backup FILE`")
        unsound.quarantined = good.quarantined
        raise unsound
    since = good.created_at_ms - BACKUP_SINCE_MARGIN_MS
    lost_hours = 0.0
    try:
        resync = resync_candles(settings, since, True)
    except CryptoAgentError as exc:
        resync = recovery.ResyncSummary(None, 0, {"*": exc.message}, int(time.time() * 1000))
    run.act("resync-candles", f"{resync.written} candles in {resync.windows} window(s) since "
            f"{incidents.iso(since)}" + (f"; failed: {resync.failures}" if resync.failures else ""), ok=resync.ok)
    if not resync.ok:
        lost_hours = max(lost_hours, recovery.hours_between(since, resync.now_ms))
    salvaged = None
    if salvage and good.quarantined:
        salvaged = salvage_rows(settings, str(good.quarantined), since)
        copied = ", ".join(f"{t} {n}" for t, n in salvaged.copied.items() if n) or "no newer rows"
        run.act("salvage", f"from {good.quarantined}: {copied}"
                + (f"; unreadable: {salvaged.unreadable}" if salvaged.unreadable else ""),
                ok=not salvaged.unreadable)
        if salvaged.unreadable:
            lost_hours = max(lost_hours, recovery.hours_between(since, int(time.time() * 1000)))
    elif not salvage:
        # a rollback drops everything newer than the backup on purpose; it stays in quarantine
        lost_hours = max(lost_hours, recovery.hours_between(since, int(time.time() * 1000)))
    lost = recovery.minutes_lost(good.tables, good.created_at_ms, int(time.time() * 1000), resync_ok=resync.ok,
                                 salvage=salvaged, salvaged=salvage and good.quarantined is not None)
    shown = ", ".join(f"{table} {minutes:g} min" for table, minutes in lost.items() if minutes) or "nothing"
    run.act("data-lost", f"restored the state of {incidents.iso(good.created_at_ms)} ({good.name}); lost per table: "
            f"{shown}" + ("" if salvage else "; the newer rows stay in the quarantined file"), ok=not any(lost.values())
            or not salvage)
    return replace(restored, resync=resync, salvage=salvaged, data_lost_hours=round(lost_hours, 3))


# --- no good backup: rebuild a fresh store from the readable rows, re-fetch the candles ---


@dataclass(frozen=True)
class Rebuilt:
    """A store rebuilt without a backup: the rebuild (None: it failed, `error` says why), the quarantined corrupt
    file it read, and the candle history re-fetched from the exchange (None: not tried)."""

    result: rebuild.RebuildResult | None
    quarantined: Path | None
    refetch: recovery.ResyncSummary | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether a sound store is in place with its candle history fetched again."""
        return self.result is not None and self.refetch is not None and self.refetch.ok and not self.error

    @property
    def lost(self) -> str:
        """What the rebuild could not give back and the exchange cannot refill, for an operator (and L2)."""
        if self.result is None:
            return "not known: the rebuild did not finish"
        candles = set(rebuild.candle_tables())
        gone = [f"{name} ({len(self.result.tables[name].unreadable)} unreadable range(s), "
                f"{self.result.tables[name].recovered} rows kept)"
                for name in self.result.damaged_tables if name not in candles]
        if self.refetch is None or not self.refetch.ok:
            gone += [f"{name} (not re-fetched)" for name in self.result.damaged_tables if name in candles]
        return "nothing" if not gone else "rows of " + ", ".join(gone)


@task(name="quarantine-corrupt", timeout_seconds=600, cache_policy=NO_CACHE)
def quarantine_corrupt(settings: dict[str, Any] | None, reason: str) -> Path:
    """Move the database in place (with -wal/-shm; never overwritten) into a new quarantine folder; the moved file."""
    cfg = run_settings(settings)
    return backup.quarantine(cfg.db_path, cfg.quarantine_dir, reason) / Path(cfg.db_path).name


@task(name="rebuild-store", timeout_seconds=3600, cache_policy=NO_CACHE)
def rebuild_store(settings: dict[str, Any] | None, corrupt_db: str) -> rebuild.RebuildResult:
    """Build a fresh store at db_path from every readable row of the (quarantined) corrupt file."""
    cfg = run_settings(settings)
    return rebuild.rebuild(corrupt_db, cfg.db_path, symbols=cfg.symbols)


@task(name="plan-refetch", timeout_seconds=600, retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def plan_refetch(settings: dict[str, Any] | None) -> tuple[list[Window], int]:
    """The candle windows a rebuilt store lacks over the initial history, and the exchange's time (ms)."""
    cfg = run_settings(settings)
    with open_store(cfg) as store, BinanceClient.from_settings(cfg) as client:
        now_ms = client.server_time()
        windows = rebuild.refetch_windows(store, cfg.symbols, cfg.timeframes,
                                          initial_history_days=cfg.initial_history_days, now_ms=now_ms)
    return windows, now_ms


@task(name="refetch-candles", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=retry_if_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def refetch_candles(settings: dict[str, Any] | None, windows: list[Window], now_ms: int) -> recovery.ResyncSummary:
    """Fetch the windows into the rebuilt store (the collector's backfill, within the exchange's weight budget)."""
    cfg = run_settings(settings)
    with open_store(cfg) as store, BinanceClient.from_settings(cfg) as client:
        summary = backfill(store, client, windows, now_ms=now_ms, lock_held=True)
    return recovery.ResyncSummary(len(windows), summary.total, dict(summary.failures), now_ms)


def rebuild_and_refetch(run: Recovery, settings: dict[str, Any] | None, reason: str,
                        corrupt: Path | None = None) -> Rebuilt:
    """No good backup: quarantine the corrupt database (unless `corrupt` is already its quarantined copy), rebuild a
    fresh store from every readable row, check it, re-fetch the candle history from the exchange; what was done.
    Runs under the store's lock, the services stopped."""
    try:
        if corrupt is None:
            corrupt = quarantine_corrupt(settings, reason)
            run.act("quarantine", f"the corrupt database (with -wal/-shm) is in {corrupt.parent}, never overwritten")
        result = rebuild_store(settings, str(corrupt))
    except (CryptoAgentError, OSError, sqlite3.Error) as exc:
        why = exc.message if isinstance(exc, CryptoAgentError) else f"{type(exc).__name__}: {exc}"
        run.act("rebuild", f"the rebuild from {corrupt or 'the corrupt database'} failed: {why}", ok=False)
        return Rebuilt(None, corrupt, error=why)
    counts = ", ".join(f"{t} {v.recovered}" for t, v in sorted(result.tables.items()) if v.recovered) or "no rows"
    notes = "".join(f"\n{n}" for n in result.notes)
    run.act("rebuild", f"{result.summary} in {result.seconds:.1f} s\nrows per table: {counts}{notes}")
    verified = check_store_integrity(settings, True)
    run.act("verify-rebuild", integrity_detail(verified), ok=verified.ok)
    if not verified.ok:
        return Rebuilt(result, corrupt, error=f"the rebuilt store fails its integrity check: "
                       f"{'; '.join(verified.problems[:3])}")
    try:
        windows, now_ms = plan_refetch(settings)
        cost = rebuild.fetch_cost(windows)
        run.act("refetch-plan", f"{len(windows)} window(s) to fetch again: {cost.candles} candles in "
                f"{cost.requests} request(s), weight {cost.weight} (at least "
                f"{cost.minutes_at(run.cfg.weight_limit_per_minute * run.cfg.weight_safety_margin):.1f} min "
                "within the weight budget)")
        refetch = refetch_candles(settings, windows, now_ms)
    except CryptoAgentError as exc:
        refetch = recovery.ResyncSummary(None, 0, {"*": exc.message}, int(time.time() * 1000))
    run.act("refetch-candles", f"{refetch.written} candles in {refetch.windows} window(s) from the exchange"
            + (f"; failed: {refetch.failures}" if refetch.failures else ""), ok=refetch.ok)
    return Rebuilt(result, corrupt, refetch)
