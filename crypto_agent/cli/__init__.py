"""`crypto-agent`: the command line. Each module below registers its commands on the one app."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

# Importing a module registers its commands.
from crypto_agent.cli import (  # noqa: F401
    backtest,
    config,
    data,
    incidents,
    maintenance,
    quality,
    receiver,
    replica,
    run,
    services,
    simulator,
    watchdog,
)
from crypto_agent.cli.app import app
from crypto_agent.cli.storeerrors import DB_ERRORS, as_store_error, database_error
from crypto_agent.errors import CryptoAgentError

PLUGIN_GROUP = "crypto_agent.cli"
_plugins_loaded: list[str] = []
_plugins_tried = False


def load_plugins() -> list[str]:
    """Call every entry point of group "crypto_agent.cli" with the app; the names loaded (once per process).

    This is how commands that need prefect (deployments/cli.py) join the CLI without crypto_agent
    importing prefect: a plugin that fails to load is reported on stderr and the rest of the CLI works.
    """
    global _plugins_tried
    if _plugins_tried:
        return list(_plugins_loaded)
    _plugins_tried = True
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()(app)
        except Exception as exc:  # noqa: BLE001 (a broken plugin must not take the whole CLI down)
            print(f"warning: CLI plugin {ep.name} ({ep.value}) did not load: {exc}", file=sys.stderr)
            continue
        _plugins_loaded.append(ep.name)
    return list(_plugins_loaded)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run a command; an operator error becomes a message on stderr and a non-zero exit.

    A SQLite or SQLAlchemy error that escapes a command (a corrupt or unreadable store met mid-way) is
    reported the same way, never as a traceback.
    """
    load_plugins()
    try:
        app(args=argv, standalone_mode=True)
    except CryptoAgentError as exc:
        err = as_store_error(exc)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except DB_ERRORS as exc:
        err = database_error(exc)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
