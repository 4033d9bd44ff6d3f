"""Safe backups of the live store, their verification, retention, and the pieces of a recovery.

A backup is SQLite's online backup of the live database (one read transaction: a consistent
snapshot, and in WAL mode writers are never blocked) into a hidden temporary file, checked
cheaply while it is hot in the page cache (sha256, header, size, schema, row counts; see
create()), fsynced, then renamed atomically to ``db_backup_YYYYMMDD.db`` beside a JSON manifest.
The full check (a restore to scratch, integrity_check, sha256 and counts against the manifest)
is the restore drill's: dry_restore() records it as ``full_check_at``. A backup that fails any
check is marked bad and is never chosen by a restore, and every restore re-hashes and fully
checks what it puts back. A restore never overwrites: the current database (with its -wal and
-shm) is moved to a quarantine folder first, so rows newer than the backup can be salvaged.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from crypto_agent.errors import CryptoAgentError
from crypto_agent.keywalk import walk_int_key
from crypto_agent.storelock import (
    RecoveryLocked,
    describe_holder,
    lock_path,
    recovery_lock,
)
from crypto_agent.universe import UNIVERSE

if TYPE_CHECKING:
    from crypto_agent.settings import Settings

BACKUP_NAME_RE = re.compile(r"^db_backup_(\d{8})\.db$")
SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0
COPY_CHUNK = 4 * 1024 * 1024
GB = 1_000_000_000  # storage limits are decimal gigabytes, like the runbook's "1.2 GB"
# PRAGMA quick_check reads and parses every page (about 3x a copy): affordable only on small files.
QUICK_CHECK_MAX_BYTES = 64 * 1024 * 1024
# SQLite reads the source through mmap during the copy (no read syscall per page); its maximum.
SOURCE_MMAP_BYTES = 0x7FFF0000
FULL_CHECK = "restore-copy+sha256+integrity_check+counts"

GOOD, BAD, UNVERIFIED = "good", "bad", "unverified"


# --- errors ---


class BackupError(CryptoAgentError):
    """A backup, restore or compaction could not be done; nothing was left half-written."""


class NoGoodBackup(BackupError):
    """No backup qualifies for a restore."""


class BackupVerificationFailed(BackupError):
    """A backup failed its dry restore and is now marked bad."""

    def __init__(self, message: str, hint: str | None = None, info: BackupInfo | None = None) -> None:
        super().__init__(message, hint)
        self.info = info


class RestoreRefused(BackupError):
    """A restore would harm a running service or use a bad backup; nothing was changed."""


# --- values ---


@dataclass(frozen=True)
class BackupInfo:
    """One backup file and what its manifest says about it."""

    path: Path
    day: date
    status: str
    size: int
    sha256: str | None = None
    tables: dict[str, int] = field(default_factory=dict)
    created_at: datetime | None = None
    source: str | None = None
    verified_at: datetime | None = None
    problems: list[str] = field(default_factory=list)
    verified: str | None = None
    full_check_at: datetime | None = None

    @property
    def name(self) -> str:
        """The file name, db_backup_YYYYMMDD.db."""
        return self.path.name

    @property
    def manifest_path(self) -> Path:
        """The JSON manifest beside the backup."""
        return manifest_path(self.path)

    def to_dict(self) -> dict:
        """A JSON-ready dict of this backup."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["day"] = self.day.isoformat()
        for key in ("created_at", "verified_at", "full_check_at"):
            d[key] = d[key].isoformat() if d[key] else None
        return d


@dataclass(frozen=True)
class DryRestoreResult:
    """The outcome of restoring a backup to a scratch file and comparing it with its manifest."""

    backup: Path
    ok: bool
    problems: list[str]
    tables: dict[str, int]
    duration_s: float

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class RestoreResult:
    """A database put back from a backup, and where the database it replaced went."""

    backup: Path
    db_path: Path
    quarantined: Path | None
    tables: dict[str, int]
    duration_s: float


@dataclass(frozen=True)
class StorageCheck:
    """Space the database uses (file + WAL) against the limit."""

    used_bytes: int
    limit_bytes: int

    @property
    def over_limit(self) -> bool:
        """Whether the database uses more than the limit."""
        return self.used_bytes > self.limit_bytes

    @property
    def message(self) -> str:
        """One line for an operator: the use, the limit and the verdict."""
        used, limit = self.used_bytes / GB, self.limit_bytes / GB
        if self.over_limit:
            return f"ALERT: database uses {used:.2f} GB, over the {limit:.2f} GB limit"
        return f"storage ok: database uses {used:.2f} GB of {limit:.2f} GB"


@dataclass(frozen=True)
class CompactResult:
    """A VACUUM of the store and the storage check after it."""

    db_path: Path
    size_before: int
    size_after: int
    storage: StorageCheck
    duration_s: float

    @property
    def over_limit(self) -> bool:
        """Whether the database is still over the storage limit after compaction."""
        return self.storage.over_limit


@dataclass(frozen=True)
class RetentionPolicy:
    """How many backups to keep: the newest dailies, then one per ISO week and one per month."""

    keep_daily: int = 3
    keep_weekly: int = 4
    keep_monthly: int = 3

    def __post_init__(self) -> None:
        if self.keep_daily < 2 or self.keep_weekly < 0 or self.keep_monthly < 0:
            raise BackupError(
                f"retention policy {self} would not keep yesterday's and the 48 h backup",
                hint="keep_daily must be at least 2 (3 by default); weekly and monthly at least 0",
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        """The policy configured in Settings (backup_keep_daily/weekly/monthly)."""
        return cls(settings.backup_keep_daily, settings.backup_keep_weekly, settings.backup_keep_monthly)


class SalvageResult(dict):
    """Rows copied per table (a dict), plus `unreadable`: per table, the key ranges that could not be read."""

    def __init__(self) -> None:
        super().__init__()
        self.unreadable: dict[str, list[str]] = {}


# --- small helpers ---


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(now: datetime | None) -> datetime:
    if now is None:
        return _utcnow()
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def backup_name(day: date) -> str:
    """The file name of the backup of a day: db_backup_YYYYMMDD.db."""
    return f"db_backup_{day:%Y%m%d}.db"


def manifest_path(backup_path: Path) -> Path:
    """The manifest of a backup: db_backup_YYYYMMDD.json beside it."""
    return backup_path.with_suffix(".json")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)


def file_sha256(path: Path) -> tuple[str, int]:
    """The sha256 (hex) and size of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _copy_with_sha256(src: Path, dst: Path) -> tuple[str, int]:
    """Copy a file that nobody writes (a backup) and hash it in the same pass; the copy is fsynced."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(COPY_CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), size


def _is_sqlite_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def _connect_ro(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    return conn


def _check(conn: sqlite3.Connection, full: bool, max_errors: int = 50) -> list[str]:
    """Problems PRAGMA quick_check / integrity_check lists; empty when the file is sound."""
    mode = "integrity_check" if full else "quick_check"
    try:
        rows = [str(r[0]) for r in conn.execute(f"PRAGMA {mode}({int(max_errors)})")]
    except sqlite3.DatabaseError as exc:
        return [f"{type(exc).__name__}: {exc}"]
    return [] if rows == ["ok"] else rows


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return {n: int(conn.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0]) for n in names}


def check_and_count(path: Path, full: bool) -> tuple[list[str], dict[str, int]]:
    """Integrity problems and row counts of a database file that nobody writes."""
    try:
        conn = _connect_ro(path)
    except sqlite3.Error as exc:
        return [f"cannot open: {exc}"], {}
    try:
        problems = _check(conn, full)
        if problems:
            return problems, {}
        try:
            return [], _counts(conn)
        except sqlite3.DatabaseError as exc:
            return [f"counting rows failed: {exc}"], {}
    finally:
        conn.close()


def _compare_counts(expected: dict[str, int], found: dict[str, int]) -> list[str]:
    problems = []
    for table in sorted(set(expected) | set(found)):
        want, got = expected.get(table), found.get(table)
        if want != got:
            problems.append(f"table {table}: manifest says {want} rows, the restored copy has {got}")
    return problems


def _db_files(db_path: Path) -> list[Path]:
    """The database and the companions SQLite keeps beside it (-wal, -shm, -journal) that exist."""
    return [p for p in (db_path, *(db_path.with_name(db_path.name + s) for s in ("-wal", "-shm", "-journal")))
            if p.exists()]


@contextmanager
def _backup_dir_lock(backup_dir: Path) -> Iterator[None]:
    """One writer of the backup folder at a time (backups, retention), released even if we crash."""
    path = backup_dir / ".backup.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise BackupError(
                f"another backup or retention run is using {backup_dir} (pid {holder})",
                hint="wait for it to finish, then run again",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# --- manifests and listing ---


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), (None, None) when there is none, or (None, problem) when it is unreadable."""
    mp = manifest_path(path)
    if not mp.exists():
        return None, None
    try:
        data = json.loads(mp.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data, None
    except (OSError, ValueError) as exc:
        return None, f"manifest {mp.name} unreadable: {exc}"


def _parse_time(value: object) -> datetime | None:
    if not value:
        return None
    try:
        return _as_utc(datetime.fromisoformat(str(value)))
    except ValueError:
        return None


def backup_info(path: Path | str) -> BackupInfo:
    """What is known about one backup file, from its name and its manifest."""
    p = Path(path)
    m = BACKUP_NAME_RE.match(p.name)
    if not m:
        raise BackupError(
            f"{p.name} is not a backup file name (db_backup_YYYYMMDD.db)",
            hint="list the backups with `crypto-agent backups`",
        )
    day = datetime.strptime(m.group(1), "%Y%m%d").date()  # noqa: DTZ007 (only the calendar day is kept)
    if not p.is_file():
        raise BackupError(f"backup not found: {p}", hint="list the backups with `crypto-agent backups`")
    manifest, problem = _read_manifest(p)
    size = p.stat().st_size
    if manifest is None:
        problems = [problem] if problem else ["no manifest"]
        return BackupInfo(p, day, BAD if problem else UNVERIFIED, size, problems=problems)
    status = manifest.get("status")
    return BackupInfo(
        path=p,
        day=day,
        status=status if status in (GOOD, BAD, UNVERIFIED) else UNVERIFIED,
        size=size,
        sha256=manifest.get("sha256"),
        tables={str(k): int(v) for k, v in (manifest.get("tables") or {}).items()},
        created_at=_parse_time(manifest.get("created_at")),
        source=manifest.get("source"),
        verified_at=_parse_time(manifest.get("verified_at")),
        problems=list(manifest.get("problems") or []),
        verified=manifest.get("verified"),
        full_check_at=_parse_time(manifest.get("full_check_at")),
    )


def list_backups(backup_dir: Path | str) -> list[BackupInfo]:
    """Every backup in the folder with its status (good, bad, unverified), newest first."""
    d = Path(backup_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if BACKUP_NAME_RE.match(p.name) and p.is_file():
            try:
                out.append(backup_info(p))
            except BackupError:
                continue  # removed while we listed
    epoch = datetime.min.replace(tzinfo=UTC)
    out.sort(key=lambda b: (b.day, b.created_at or epoch), reverse=True)
    return out


def _set_status(backup_path: Path, status: str, problems: list[str], tables: dict[str, int] | None = None,
                sha256: str | None = None, *, full_check: bool = False) -> None:
    manifest, _ = _read_manifest(backup_path)
    if manifest is None:
        manifest = {"file": backup_path.name, "created_at": None, "source": None,
                    "size": backup_path.stat().st_size, "sha256": sha256, "tables": tables or {}}
    now = _utcnow().isoformat()
    manifest["status"] = status
    manifest["problems"] = problems
    manifest["verified_at"] = now
    if full_check:  # the full check passed now: the drill's mark, kept by later cheap updates
        manifest["full_check"] = FULL_CHECK
        manifest["full_check_at"] = now
    _write_json_atomic(manifest_path(backup_path), manifest)


# --- create, verify ---


def create(
    db_path: Path | str,
    backup_dir: Path | str,
    *,
    now: datetime | None = None,
    verify: bool = True,
    scratch_dir: Path | str | None = None,
    respect_lock: bool = True,
    full_check: bool = False,
    quick_check_max_bytes: int = QUICK_CHECK_MAX_BYTES,
) -> BackupInfo:
    """Back up the live database to backup_dir/db_backup_YYYYMMDD.db (UTC day of `now`) with a manifest.

    Online and consistent (SQLite's backup API, one read transaction), then checked while the copy
    is hot in the page cache, in parallel: sha256 of the bytes written, the header, page count x
    page size == file size, the schema readable, every table's row count (which walks each table's
    b-tree, or its smallest index), and PRAGMA quick_check when the file is at most
    quick_check_max_bytes. Then fsynced and renamed atomically; a failed check or write leaves no
    temporary file and no backup, and raises BackupError with a hint.

    With verify (the default) a backup whose checks pass is marked good. "Good" guarantees: a
    complete, consistent snapshot of the source, durable on disk, whose sha256 and row counts the
    manifest records and whose structure passed the checks above (listed in the manifest's
    "verified"). It does not guarantee that every index page is sound: that is the full check
    (dry_restore(): integrity_check, sha256 and counts against the manifest), which the restore
    drill runs and records as "full_check_at", which full_check=True runs here too (marking the
    backup bad and raising BackupVerificationFailed if it fails), and which every restore() runs
    before it puts a backup in place. Without verify the backup stays unverified.
    A backup of the same day is replaced only by one that passed its checks.
    """
    started = time.perf_counter()
    db = Path(db_path)
    bdir = Path(backup_dir)
    now_utc = _as_utc(now)
    if not db.is_file():
        raise BackupError(f"database not found: {db}",
                          hint="check db_path (`crypto-agent config`); nothing was written")
    if not _is_sqlite_file(db):
        raise BackupError(f"{db} is not a SQLite database (its header is wrong)",
                          hint="check db_path (`crypto-agent config`); nothing was written")
    if respect_lock and lock_path(db).exists():
        raise RecoveryLocked(
            f"not backing up {db}: a recovery holds {lock_path(db)} ({describe_holder(db)})",
            hint="back up after the recovery ends (the lock file goes away)",
        )
    try:
        bdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create the backup folder {bdir}: {exc.strerror}",
                          hint="set backup_dir to a writable place") from None

    final = bdir / backup_name(now_utc.date())
    tmp = bdir / f".{final.name}.tmp"
    with _backup_dir_lock(bdir):
        _unlink(tmp)  # a leftover of a crashed run; we hold the folder lock, so nobody is writing it
        try:
            copy_s = _online_copy(db, tmp)
            checks_started = time.perf_counter()
            # The copy is hot in the page cache: hash it, flush it to disk and check it at once
            # (hashlib, fsync and SQLite all release the GIL), instead of three passes in a row.
            with ThreadPoolExecutor(max_workers=2) as pool:
                hashed = pool.submit(file_sha256, tmp)
                synced = pool.submit(_fsync_file, tmp)
                problems, tables, verified = _cheap_checks(tmp, quick_check_max_bytes)
                sha, size = hashed.result()
                synced.result()
            checks_s = time.perf_counter() - checks_started
            if problems:
                raise BackupError(
                    f"the backup of {db} failed its integrity check: {'; '.join(problems[:5])}",
                    hint="the live database is probably damaged: run `crypto-agent check-integrity --full`",
                )
            # The old manifest of the day goes first, so it can never describe the new file.
            _unlink(manifest_path(final))
            os.replace(tmp, final)
            _fsync_dir(bdir)
        except BackupError:
            _unlink(tmp)
            raise
        except (OSError, sqlite3.Error) as exc:
            _unlink(tmp)
            raise BackupError(
                f"backing up {db} to {bdir} failed: {exc}",
                hint="check free space and permissions of the backup folder; no backup file was left",
            ) from None
        except BaseException:
            _unlink(tmp)
            raise
        manifest = {
            "file": final.name,
            "source": str(db.resolve()),
            "created_at": now_utc.isoformat(),
            "size": size,
            "sha256": sha,
            "tables": tables,
            "sqlite_version": sqlite3.sqlite_version,
            "copy_seconds": round(copy_s, 3),
            "check_seconds": round(checks_s, 3),
            "seconds": round(time.perf_counter() - started, 3),
            # With full_check it stays unverified until the dry restore below says good or bad.
            "status": GOOD if verify and not full_check else UNVERIFIED,
            "verified": verified if verify else None,
            "verified_at": _utcnow().isoformat() if verify else None,
            "full_check": None,
            "full_check_at": None,
            "problems": [],
        }
        try:
            _write_json_atomic(manifest_path(final), manifest)
        except OSError as exc:
            raise BackupError(
                f"backup {final} was written but its manifest could not be: {exc.strerror or exc}",
                hint="free space in the backup folder; the backup stays unverified until "
                "`crypto-agent backup` runs again",
            ) from None
    if verify and full_check:
        result = dry_restore(final, scratch_dir=scratch_dir)
        if not result.ok:
            info = backup_info(final)
            raise BackupVerificationFailed(
                f"backup {final} failed its dry restore: {'; '.join(result.problems[:5])}; "
                "it is marked bad and will never be chosen by a restore",
                hint="check the live database with `crypto-agent check-integrity --full`, then back up again",
                info=info,
            )
    return backup_info(final)


def _online_copy(db: Path, dest: Path) -> float:
    """SQLite online backup of db into dest in one step; seconds taken.

    One step is one read transaction: a consistent snapshot, and in WAL mode writers go on. Copying
    a few pages per step would let writers in between steps, but every commit of another connection
    restarts the copy, so under steady writes it never ends.
    """
    started = time.perf_counter()
    src = _connect_ro(db)
    try:
        # Pages come through mmap rather than one read() each: about a quarter off the copy.
        src.execute(f"PRAGMA mmap_size={SOURCE_MMAP_BYTES}")
        dst = sqlite3.connect(dest, isolation_level=None)
        try:
            # The temp file is thrown away on any failure and fsynced by us at the end: no journal
            # and no syncs of its own (a third off the copy time).
            dst.execute("PRAGMA journal_mode=OFF")
            dst.execute("PRAGMA synchronous=OFF")
            src.backup(dst, pages=-1)
            # A backup is a plain file: no WAL, so reading it never creates -wal/-shm beside it.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    finally:
        src.close()
    return time.perf_counter() - started


def _header_problems(path: Path) -> list[str]:
    """What is wrong with a database file's header against its size; empty when they agree."""
    with open(path, "rb") as f:
        header = f.read(100)
    size = path.stat().st_size
    if len(header) < 100 or header[:16] != SQLITE_HEADER:
        return ["the SQLite header is missing or wrong"]
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    change_counter, valid_for = header[24:28], header[92:96]
    if page_size < 512 or page_size & (page_size - 1):
        return [f"the header's page size {page_size} is not a power of two >= 512"]
    if change_counter != valid_for:
        return ["the header's page count is stale (change counter differs from version-valid-for)"]
    if pages * page_size != size:
        return [f"the header says {pages} pages x {page_size} bytes = {pages * page_size}, the file has {size}"]
    return []


def _cheap_checks(path: Path, quick_check_max_bytes: int) -> tuple[list[str], dict[str, int], str]:
    """Problems, row counts and what was verified, for a fresh copy: without a full read where possible.

    Header and size, PRAGMA page_count x page_size against the file, the schema read whole, every
    table's row count, and quick_check when the file is at most quick_check_max_bytes.
    """
    done = ["copy", "sha256", "header+size"]
    problems = _header_problems(path)
    if problems:
        return problems, {}, "+".join(done)
    try:
        conn = _connect_ro(path)
    except sqlite3.Error as exc:
        return [f"cannot open: {exc}"], {}, "+".join(done)
    try:
        try:
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            conn.execute("SELECT type, name, tbl_name, rootpage, sql FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as exc:
            return [f"schema unreadable: {exc}"], {}, "+".join(done)
        size = path.stat().st_size
        if page_size * pages != size:
            return [f"SQLite sees {pages} pages x {page_size} bytes, the file has {size}"], {}, "+".join(done)
        done.append("schema")
        if size <= quick_check_max_bytes:
            problems = _check(conn, full=False)
            if problems:
                return problems, {}, "+".join(done)
            done.append("quick_check")
        try:
            tables = _counts(conn)
        except sqlite3.DatabaseError as exc:
            return [f"counting rows failed: {exc}"], {}, "+".join(done)
        done.append("counts")
        return [], tables, "+".join(done)
    finally:
        conn.close()


def dry_restore(backup_path: Path | str, *, scratch_dir: Path | str | None = None) -> DryRestoreResult:
    """Restore a backup to a scratch file, check it fully, compare sha256 and row counts with the manifest.

    The full check of the restore drill. Marks the manifest good (recording "full_check" and
    "full_check_at") or bad; the scratch file is removed. A backup without a manifest (a crash
    right after its rename) is adopted: counted, and good if sound.
    """
    started = time.perf_counter()
    path = Path(backup_path)
    if not path.is_file():
        raise BackupError(f"backup not found: {path}", hint="list the backups with `crypto-agent backups`")
    manifest, manifest_problem = _read_manifest(path)
    scratch_root = Path(scratch_dir) if scratch_dir else path.parent
    scratch = scratch_root / f".dry-restore-{os.getpid()}-{path.name}"
    problems: list[str] = []
    tables: dict[str, int] = {}
    sha = None
    try:
        try:
            scratch_root.mkdir(parents=True, exist_ok=True)
            sha, _size = _copy_with_sha256(path, scratch)
        except OSError as exc:
            # Our scratch space failed, not the backup: its status stays as it was.
            raise BackupError(
                f"the dry restore of {path.name} could not run: cannot write {scratch}: {exc.strerror or exc}",
                hint="free space in (or fix) the scratch folder, then `crypto-agent backup` again",
            ) from None
        if manifest_problem:
            problems.append(manifest_problem)
        elif manifest is not None and manifest.get("sha256") and manifest["sha256"] != sha:
            problems.append(f"sha256 differs from the manifest (file {sha[:12]}, manifest {manifest['sha256'][:12]})")
        check_problems, tables = check_and_count(scratch, full=True)
        problems.extend(check_problems)
        if manifest is not None and not check_problems:
            problems.extend(_compare_counts(manifest.get("tables") or {}, tables))
    finally:
        _unlink(scratch)
        for suffix in ("-wal", "-shm", "-journal"):
            _unlink(scratch.with_name(scratch.name + suffix))
    ok = not problems
    _set_status(path, GOOD if ok else BAD, problems, tables=tables, sha256=sha, full_check=ok)
    return DryRestoreResult(path, ok, problems, tables, time.perf_counter() - started)


# --- choosing a backup ---


def choose_backup(
    backup_dir: Path | str,
    *,
    before: date | datetime | None = None,
    newest_good: bool = True,
) -> BackupInfo:
    """The newest backup of a day on or before `before` that is good (or, newest_good=False, not bad).

    Bad backups are never chosen. NoGoodBackup names the newest ones seen when none qualifies.
    """
    limit = _as_utc(before).date() if isinstance(before, datetime) else before
    backups = list_backups(backup_dir)
    allowed = (GOOD,) if newest_good else (GOOD, UNVERIFIED)
    for b in backups:
        if limit is not None and b.day > limit:
            continue
        if b.status in allowed:
            return b
    seen = ", ".join(f"{b.name} ({b.status})" for b in backups[:5]) or "none"
    wanted = "good" if newest_good else "usable"
    when = f" from {limit.isoformat()} or earlier" if limit else ""
    raise NoGoodBackup(
        f"no {wanted} backup{when} in {backup_dir}: newest were {seen}",
        hint="take one with `crypto-agent backup`, or restore an unverified one explicitly with "
        "`crypto-agent restore --backup FILE` (it is checked against its manifest first)",
    )


def backup_for_hours_ago(
    backup_dir: Path | str, hours: float, now: datetime | None = None, *, newest_good: bool = True
) -> BackupInfo:
    """The good backup to roll back `hours` (48 in the runbook): the newest of the day `hours` ago or before.

    Like the runbook's `db_backup_$(date -d "2 days ago")`, by backup day (UTC), falling back to older ones.
    """
    if hours < 0:
        raise BackupError(f"hours must be >= 0, got {hours}", hint="use e.g. --hours-ago 48")
    return choose_backup(backup_dir, before=_as_utc(now) - timedelta(hours=hours), newest_good=newest_good)


# --- retention ---


def retention(backup_dir: Path | str, policy: RetentionPolicy | None = None,
              now: datetime | None = None) -> list[Path]:
    """Delete the backups the policy does not keep (and every bad one); the files removed.

    Kept: the newest keep_daily non-bad backups and any of the last keep_daily days (so yesterday's
    and the 48 h one always stay), the newest of each of the last keep_weekly ISO weeks and of the
    last keep_monthly months, and the newest good backup whatever its age.
    """
    policy = policy or RetentionPolicy()
    bdir = Path(backup_dir)
    if not bdir.is_dir():
        return []
    today = _as_utc(now).date()
    removed: list[Path] = []
    with _backup_dir_lock(bdir):
        backups = list_backups(bdir)
        usable = [b for b in backups if b.status != BAD]  # newest first
        keep: set[Path] = set()
        keep.update(b.path for b in usable[: policy.keep_daily])
        keep.update(b.path for b in usable if (today - b.day).days < policy.keep_daily)
        for period, count in (
            (lambda d: tuple(d.isocalendar())[:2], policy.keep_weekly),
            (lambda d: (d.year, d.month), policy.keep_monthly),
        ):
            seen: list = []
            for b in usable:
                key = period(b.day)
                if key not in seen:
                    seen.append(key)
                    if len(seen) > count:
                        break
                    keep.add(b.path)
        good = [b for b in usable if b.status == GOOD]
        if good:
            keep.add(good[0].path)
        for b in backups:
            if b.path in keep:
                continue
            _unlink(b.path)
            _unlink(b.manifest_path)
            removed.append(b.path)
        if removed:
            _fsync_dir(bdir)
    return removed


def db_users(db_path: Path | str) -> list[tuple[int, str]]:
    """Processes other than this one that have the database (or its WAL) open: (pid, name)."""
    db = Path(db_path).resolve()
    wanted = {str(db), str(db) + "-wal"}
    me = os.getpid()
    users = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.info["pid"] == me:
            continue
        try:
            if any(f.path in wanted for f in proc.open_files()):
                users.append((proc.info["pid"], proc.info["name"] or "?"))
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return users


# --- quarantine, restore, salvage ---


def quarantine(db_path: Path | str, quarantine_dir: Path | str, reason: str,
               *, now: datetime | None = None) -> Path:
    """Move a database and its -wal/-shm/-journal into a new timestamped folder with a note; that folder.

    Never overwrites: two quarantines in the same second get two folders.
    """
    db = Path(db_path)
    files = _db_files(db)
    if not files:
        raise BackupError(f"nothing to quarantine: {db} does not exist", hint="check db_path (`crypto-agent config`)")
    qroot = Path(quarantine_dir)
    qroot.mkdir(parents=True, exist_ok=True)
    stamp = _as_utc(now).strftime("%Y%m%dT%H%M%SZ")
    folder = qroot / f"{stamp}-{db.name}"
    n = 1
    while True:
        try:
            folder.mkdir()
            break
        except FileExistsError:
            n += 1
            folder = qroot / f"{stamp}-{db.name}-{n}"
    note = {
        "reason": reason,
        "source": str(db.resolve()),
        "quarantined_at": _utcnow().isoformat(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "files": {p.name: p.stat().st_size for p in files},
    }
    _write_json_atomic(folder / "QUARANTINE.json", note)
    for p in files:  # the database first: its -wal only makes sense beside it
        target = folder / p.name
        if target.exists():  # cannot happen in a new folder; never overwrite anyway
            raise BackupError(f"{target} exists; refusing to overwrite it", hint="inspect the quarantine folder")
        try:
            os.rename(p, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise BackupError(f"moving {p} to quarantine failed: {exc.strerror}",
                                  hint=f"move it by hand to {folder}, never delete it") from None
            _copy_with_sha256(p, target)
            p.unlink()
    _fsync_dir(folder)
    _fsync_dir(db.parent)
    return folder


def restore(
    backup_path: Path | str,
    db_path: Path | str,
    quarantine_dir: Path | str,
    *,
    owner: str = "crypto-agent restore",
    reason: str = "replaced by a restore",
    allow_open: bool = False,
) -> RestoreResult:
    """Put a backup in place of the database, under the recovery lock; the old one goes to quarantine.

    The backup is copied beside the target, checked against its manifest and fsynced before
    anything is moved, so a failed restore leaves the current database where it was. Refuses a bad
    backup, and (unless allow_open) a database that another process still has open.
    """
    started = time.perf_counter()
    backup = Path(backup_path)
    db = Path(db_path)
    info = backup_info(backup)
    if info.status == BAD:
        raise RestoreRefused(
            f"backup {backup} is marked bad ({'; '.join(info.problems[:3]) or 'failed its dry restore'})",
            hint="choose another one with `crypto-agent backups` or `crypto-agent restore --latest-good`",
        )
    db.parent.mkdir(parents=True, exist_ok=True)
    with recovery_lock(db, owner):
        if not allow_open:
            users = db_users(db)
            if users:
                listed = ", ".join(f"{name} (pid {pid})" for pid, name in users)
                raise RestoreRefused(
                    f"not restoring {db}: it is still open in {listed}",
                    hint="stop the services first (`crypto-agent stop`), or pass --force if you are sure",
                )
        tmp = db.with_name(f".{db.name}.restore.tmp")
        _unlink(tmp)
        try:
            sha, _ = _copy_with_sha256(backup, tmp)
            problems = []
            if info.sha256 and sha != info.sha256:
                problems.append(f"sha256 differs from the manifest (file {sha[:12]}, manifest {info.sha256[:12]})")
            check_problems, tables = check_and_count(tmp, full=True)
            problems.extend(check_problems)
            if info.tables and not check_problems:
                problems.extend(_compare_counts(info.tables, tables))
            if problems:
                _set_status(backup, BAD, problems)
                raise RestoreRefused(
                    f"backup {backup} failed its check while restoring: {'; '.join(problems[:5])}; "
                    "it is now marked bad and the database was not touched",
                    hint="restore another one: `crypto-agent restore --latest-good`",
                )
            quarantined = quarantine(db, quarantine_dir, reason) if _db_files(db) else None
            os.replace(tmp, db)
            _fsync_dir(db.parent)
        except BaseException:
            _unlink(tmp)
            raise
    return RestoreResult(backup, db, quarantined, tables, time.perf_counter() - started)


def _table_columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, int]]:
    """(column name, position in the primary key, 0 if not in it) of a table."""
    return [(r[1], int(r[5])) for r in conn.execute(f'PRAGMA table_info("{table}")')]


def _has_rowid(conn: sqlite3.Connection, table: str) -> bool:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()
    return not (sql and re.search(r"WITHOUT\s+ROWID", sql[0] or "", re.IGNORECASE))


def salvage(
    corrupt_db: Path | str,
    target_db: Path | str,
    since_ms: int,
    tables: list[str] | None = None,
    *,
    time_column: str = "timestamp",
) -> SalvageResult:
    """Copy the readable rows with time_column >= since_ms from a corrupt database into target; rows per table.

    Reads the whole range first; when a damaged page stops that, reads again by key ranges
    (per symbol and time for candle tables, by rowid otherwise), halving a range that fails until
    only the unreadable pages are skipped. Rows are upserted (INSERT OR REPLACE): newer wins.
    Default tables: every table of the target that has time_column.
    """
    src_path, dst_path = Path(corrupt_db), Path(target_db)
    if not src_path.is_file():
        raise BackupError(f"nothing to salvage: {src_path} does not exist",
                          hint="point at the database inside the quarantine folder")
    if not dst_path.is_file():
        raise BackupError(f"salvage target {dst_path} does not exist", hint="restore a backup there first")
    result = SalvageResult()
    dst = sqlite3.connect(dst_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        dst.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        if tables is None:
            names = [r[0] for r in dst.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
            tables = [n for n in names if any(c == time_column for c, _ in _table_columns(dst, n))]
        try:
            src = _connect_ro(src_path)
        except sqlite3.Error as exc:
            for t in tables:
                result[t] = 0
                result.unreadable[t] = [f"cannot open {src_path}: {exc}"]
            return result
        with closing(src):
            for table in tables:
                copied, unreadable = _salvage_table(src, dst, table, since_ms, time_column)
                result[table] = copied
                if unreadable:
                    result.unreadable[table] = unreadable
    finally:
        dst.close()
    return result


def _salvage_table(src: sqlite3.Connection, dst: sqlite3.Connection, table: str, since_ms: int,
                   time_column: str) -> tuple[int, list[str]]:
    try:
        dst_cols = [c for c, _ in _table_columns(dst, table)]
        src_cols = [c for c, _ in _table_columns(src, table)]
        has_rowid = _has_rowid(src, table)
    except sqlite3.DatabaseError as exc:
        return 0, [f"schema unreadable: {exc}"]
    cols = [c for c in dst_cols if c in src_cols]
    if not cols or time_column not in cols:
        return 0, [f"no column {time_column} in both databases"]
    col_sql = ", ".join(f'"{c}"' for c in cols)
    rows: dict[tuple, tuple] = {}
    unreadable: list[str] = []

    def keep(row: tuple) -> None:
        rows[row[: len(cols)]] = row[: len(cols)]

    try:
        for r in src.execute(f'SELECT {col_sql} FROM "{table}" WHERE "{time_column}" >= ?', (since_ms,)):
            keep(r)
        damaged = False
    except sqlite3.DatabaseError:
        damaged = True
    if damaged:
        # Walk the table's own key in order, so a damaged page costs only its rows.
        if has_rowid:
            sql = f'SELECT {col_sql}, rowid FROM "{table}" WHERE "{time_column}" >= ?'
            skipped = walk_int_key(src, sql, (since_ms,), "rowid", len(cols), -(2**63), 2**63 - 1, keep)
            unreadable += [_skipped("rowid", a, b) for a, b in skipped]
        elif "symbol" in cols:
            t = cols.index(time_column)
            sql = f'SELECT {col_sql} FROM "{table}" WHERE symbol = ?'
            for sym in _readable_symbols(src, dst, table):
                skipped = walk_int_key(src, sql, (sym,), f'"{time_column}"', t, since_ms, 2**63 - 1, keep)
                unreadable += [_skipped(f"{sym} {time_column}", a, b) for a, b in skipped]
        else:
            unreadable.append("damaged, and its key cannot be walked: only the rows read before the damage")
    insert = f'INSERT OR REPLACE INTO "{table}" ({col_sql}) VALUES ({", ".join("?" * len(cols))})'
    copied = 0
    try:
        dst.execute("BEGIN IMMEDIATE")
        for r in rows.values():
            try:
                dst.execute(insert, r)
                copied += 1
            except sqlite3.IntegrityError:
                continue  # a damaged row that breaks a constraint is not worth keeping
        dst.execute("COMMIT")
    except BaseException:
        if dst.in_transaction:
            dst.execute("ROLLBACK")
        raise
    return copied, unreadable


def _skipped(what: str, start: int, end: int) -> str:
    """A key range the walk had to give up, in words: `rowid in [a, b)`, or `rowid from a` to the end."""
    return f"{what} from {start}" if end >= 2**63 - 1 else f"{what} in [{start}, {end})"


def _readable_symbols(src: sqlite3.Connection, dst: sqlite3.Connection, table: str) -> list[str]:
    """Symbols to try: those of the universe, the target, and whatever of the corrupt table is readable."""
    symbols = set(UNIVERSE)
    symbols.update(r[0] for r in dst.execute(f'SELECT DISTINCT symbol FROM "{table}"'))
    try:
        for r in src.execute(f'SELECT DISTINCT symbol FROM "{table}"'):
            symbols.add(r[0])
    except sqlite3.DatabaseError:
        pass
    return sorted(s for s in symbols if isinstance(s, str))


# --- compaction and the storage check ---


def storage_check(db_path: Path | str, max_gb: float) -> StorageCheck:
    """Bytes the database uses (file and WAL) against max_gb decimal gigabytes."""
    db = Path(db_path)
    used = sum(p.stat().st_size for p in _db_files(db) if not p.name.endswith("-shm"))
    return StorageCheck(used, int(max_gb * GB))


def compact(db_path: Path | str, *, max_gb: float = 1.2, owner: str = "crypto-agent compact") -> CompactResult:
    """VACUUM the database under the recovery lock, then check its size against max_gb."""
    started = time.perf_counter()
    db = Path(db_path)
    if not db.is_file() or not _is_sqlite_file(db):
        raise BackupError(f"{db} is not an existing SQLite database", hint="check db_path (`crypto-agent config`)")
    with recovery_lock(db, owner):
        before = storage_check(db, max_gb).used_bytes
        conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise BackupError(
                f"VACUUM of {db} failed: {exc}",
                hint="VACUUM needs free space of about the database's size; the database is unchanged",
            ) from None
        finally:
            conn.close()
        storage = storage_check(db, max_gb)
    return CompactResult(db, before, storage.used_bytes, storage, time.perf_counter() - started)


# --- the runbook's backup_test.sh ---


def restore_test(backup_dir: Path | str, now: datetime | None = None, *, min_rows: int = 1000,
                 scratch_dir: Path | str | None = None) -> tuple[bool, str]:
    """The runbook's backup_test.sh: yesterday's backup exists, passes integrity_check, has >= min_rows H4 rows.

    Returns (ok, the script's message). A backup found corrupted is also marked bad.
    """
    yesterday = (_as_utc(now) - timedelta(days=1)).date()
    path = Path(backup_dir) / backup_name(yesterday)
    if not path.is_file():
        return False, f"ERROR: Backup not found: {path}"
    scratch_root = Path(scratch_dir) if scratch_dir else path.parent
    scratch = scratch_root / f".restore-test-{os.getpid()}-{path.name}"
    count = 0
    try:
        _copy_with_sha256(path, scratch)
        try:
            conn = _connect_ro(scratch)
        except sqlite3.Error as exc:
            problems = [str(exc)]
        else:
            try:
                problems = _check(conn, full=True)
                if not problems:
                    try:
                        count = int(conn.execute("SELECT COUNT(*) FROM ohlcv_h4").fetchone()[0])
                    except sqlite3.OperationalError:
                        count = 0  # no such table: as empty as it gets
            finally:
                conn.close()
    finally:
        _unlink(scratch)
    if problems:
        _set_status(path, BAD, problems)
        return False, "ERROR: Backup corrupted: " + "\n".join(problems)
    if count < min_rows:
        return False, f"ERROR: Test DB too small: {count} rows"
    return True, f"✅ Backup test passed: {path.name} (rows={count})"
