"""`crypto-agent`: the command line. Each module below registers its commands on the one app."""

from __future__ import annotations

import sys

from crypto_agent.cli.app import app
from crypto_agent.errors import CryptoAgentError

# Importing a module registers its commands.
from crypto_agent.cli import backtest, config, data, quality, services, simulator  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """Entry point: run a command; an operator error becomes a message on stderr and a non-zero exit."""
    try:
        app(args=argv, standalone_mode=True)
    except CryptoAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
