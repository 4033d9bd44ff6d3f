"""The Typer application every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="crypto-agent",
    help="The 24/7 crypto backtesting infrastructure and its runbook.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """The 24/7 crypto backtesting infrastructure and its runbook."""
