"""Commands: quality."""

from __future__ import annotations

from crypto_agent.cli.app import app  # noqa: F401
