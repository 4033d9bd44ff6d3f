"""A corrupt or unreadable store, met anywhere in a command, in one wording: the file, the problem, what next."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from crypto_agent.errors import CryptoAgentError, StoreCorrupt, StoreError, StoreUnreadable
from crypto_agent.store import sqlite_reason, store_error

DB_ERRORS = (DBAPIError, sqlite3.Error)
INCIDENT_LOG_NEXT = (
    "move it aside (it only holds the incident history; a fresh one is created on the next incident); "
    "`sqlite3 {path} .recover` salvages its rows"
)


def _configured(name: str) -> Path | None:
    """A path setting (db_path, incidents_db_path), or None when the settings do not load."""
    try:
        from crypto_agent.settings import load_settings

        return Path(getattr(load_settings(), name)).absolute()
    except Exception:  # noqa: BLE001 (only the wording of an error message depends on it)
        return None


def database_error(exc: BaseException) -> CryptoAgentError:
    """The operator's message for a SQLite/SQLAlchemy error that escaped a command: the file, the problem, what next."""
    tagged = getattr(exc, "db_path", None) or getattr(getattr(exc, "orig", None), "db_path", None)
    path = Path(tagged).absolute() if tagged else _configured("db_path")
    if path is not None and path == _configured("incidents_db_path"):
        known = store_error(exc, path, what="the incident log", hint=INCIDENT_LOG_NEXT.format(path=path))
    else:
        known = store_error(exc, path)
    if known is not None:
        return known
    where = f"the store {path}" if path else "the store"
    return StoreError(f"{where}: {(sqlite_reason(exc).splitlines() or [type(exc).__name__])[0]}",
                      hint="`crypto-agent check-integrity` tells whether it is damaged; nothing more was done")


def as_store_error(exc: CryptoAgentError) -> CryptoAgentError:
    """A command's error whose cause is a damaged or unreadable store file, in the one wording of those; else itself."""
    if isinstance(exc, (StoreCorrupt, StoreUnreadable)):
        return exc
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, DB_ERRORS) and getattr(cause, "db_path", None) is not None:
        known = database_error(cause)
        if isinstance(known, (StoreCorrupt, StoreUnreadable)):
            return known
    return exc
