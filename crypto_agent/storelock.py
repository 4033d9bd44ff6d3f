"""The store's recovery lock, `<db folder>/LOCKED`: who holds it, taking it, and the writers' check.

A recovery (a restore, a compaction, a rebuild) takes the lock; while the file exists every writer
(the collector, the trader, the daemon, backtest results, backups) writes nothing and says why.
The file holds JSON {owner, pid, host, since}; an empty file (an operator's `touch`) also locks.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from crypto_agent.errors import InputError, StoreLocked

LOCK_FILE_NAME = "LOCKED"


class RecoveryLocked(StoreLocked):
    """The recovery lock `<db folder>/LOCKED` is held by someone else."""


def lock_path(db_path: Path | str) -> Path:
    """The recovery lock of a database: `<db folder>/LOCKED`."""
    return Path(db_path).parent / LOCK_FILE_NAME


def lock_name(db_path: Path | str | None) -> str:
    """The lock file's path as text for a message; bare "LOCKED" for a store without a file."""
    return str(lock_path(db_path)) if db_path is not None else LOCK_FILE_NAME


def is_locked(db_path: Path | str | None) -> bool:
    """Whether a recovery holds the lock of a database (the file exists); False for a store without a file."""
    return db_path is not None and lock_path(db_path).exists()


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    if not text:
        return {}
    try:
        data = json.loads(text)
        return data if isinstance(data, dict) else {"owner": text[:200]}
    except ValueError:
        return {"owner": text[:200]}


def lock_holder(db_path: Path | str) -> dict[str, Any] | None:
    """Who holds the recovery lock of a database: {owner, pid, host, since}, {} if unknown, None if free."""
    return _read_holder(lock_path(db_path))


def describe_holder(db_path: Path | str) -> str:
    """The holder of a database's lock in words: "released", or owner, pid (running or not), host, since."""
    holder = lock_holder(db_path)
    if holder is None:
        return "released"
    if not holder:
        return "held by an unknown owner (empty file, perhaps `touch`ed by an operator)"
    parts = [f"held by {holder.get('owner', 'unknown')}"]
    pid = holder.get("pid")
    if isinstance(pid, int):
        alive = psutil.pid_exists(pid)
        parts.append(f"pid {pid}{'' if alive else ' (not running)'}")
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


def locked_error(db_path: Path | str | None, outcome: str, retry: str) -> StoreLocked:
    """The error a writer raises while the lock exists: what it did not write, and when to try again."""
    return StoreLocked(
        f"the store is locked by a recovery ({lock_name(db_path)} exists); {outcome}",
        hint=f"wait for the recovery to finish (it removes the file), then {retry}",
    )


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass


@contextmanager
def recovery_lock(db_path: Path | str, owner: str) -> Iterator[Path]:
    """Hold `<db folder>/LOCKED` (owner, pid, time) for a recovery; refuse when someone else holds it.

    Re-entrant for the same owner: a flow that took the lock can call restore/compact with its
    owner name, and only the outermost holder removes the file.
    """
    if not owner or not owner.strip():
        raise InputError("the recovery lock needs an owner name", hint="pass e.g. owner='recover-db-corruption'")
    path = lock_path(db_path)
    holder = _read_holder(path)
    if holder is not None and holder.get("owner") == owner:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    content = json.dumps({"owner": owner, "pid": os.getpid(), "host": socket.gethostname(),
                          "since": datetime.now(UTC).isoformat(timespec="seconds")})
    # Write then hard-link: the lock appears atomically, complete, and only if nobody holds it.
    tmp = path.with_name(f".{LOCK_FILE_NAME}.{os.getpid()}.{time.monotonic_ns()}")
    tmp.write_text(content + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise RecoveryLocked(
            f"the recovery lock {path} is {describe_holder(db_path)}",
            hint=f"wait for that recovery to end; if its process is gone and nothing is running, delete {path}",
        ) from None
    finally:
        _unlink(tmp)
    try:
        yield path
    finally:
        if _read_holder(path) == json.loads(content):
            _unlink(path)
