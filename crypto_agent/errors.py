"""Errors an operator can act on: what happened, and what to do next."""

from __future__ import annotations


class CryptoAgentError(Exception):
    """Base of every error the CLI reports as a message and a non-zero exit instead of a traceback."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  what to do: {self.hint}"


class ConfigError(CryptoAgentError):
    """A setting is malformed or inconsistent; nothing was started."""

    exit_code = 2


class InputError(CryptoAgentError):
    """A bad argument (symbol, timeframe, lookback); nothing was written."""

    exit_code = 2


class StoreError(CryptoAgentError):
    """The database cannot be opened or written."""


class StoreLocked(CryptoAgentError):
    """The store is locked (`<db folder>/LOCKED`) by a recovery; nothing was written."""


class StoreCorrupt(StoreError):
    """The store's file is damaged (malformed pages, not a database, truncated): check it, then recover."""


class StoreUnreadable(StoreError):
    """The store's file cannot be opened (permissions, a folder in its place, no such folder)."""
