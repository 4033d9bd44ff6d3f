"""Commands: check-data (staleness, coverage, continuity) and check-integrity (PRAGMA checks)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from crypto_agent.cli.app import app
from crypto_agent.errors import ConfigError
from crypto_agent.quality import (
    DataQualityReport,
    check_data,
    format_utc,
    timeframe_label,
)
from crypto_agent.settings import Settings, load_settings
from crypto_agent.store import Store, check_integrity
from crypto_agent.universe import parse_symbols


def existing_db_path(settings: Settings) -> Path | None:
    """The SQLite file the settings name (None for a non-file URL); ConfigError when it does not exist.

    A check must never create the database it is asked about: an empty new file would hide a
    wrong path behind a report of "no data".
    """
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    path = Path(url.database).expanduser().absolute()
    if path.exists() and not path.is_file():
        raise ConfigError(
            f"the store {path} is not a file (a folder or device is in its place)",
            hint="move it aside and restore the store (`crypto-agent restore --latest-good`), or point "
            "CRYPTO_AGENT_DB_PATH (or db_path in the config file) at the store",
        )
    if not path.is_file():
        raise ConfigError(
            f"database file {path} does not exist",
            hint="point CRYPTO_AGENT_DB_PATH (or db_path in the config file) at the store, "
            "or fill it first with `crypto-agent collect`",
        )
    return path


def print_report(report: DataQualityReport, console: Console) -> None:
    table = Table(title=f"data quality at {format_utc(report.checked_at_ms)} UTC")
    table.add_column("symbol")
    for tf in report.timeframes:
        table.add_column(f"{timeframe_label(tf)} age h", justify="right")
    table.add_column("gaps", justify="right")
    table.add_column("status")
    table.add_column("reasons")
    for symbol in report.symbols:
        rows = report.series_of(symbol)
        ages = ["no data" if r.age_hours is None else f"{r.age_hours:.1f}" for r in rows]
        ok = all(r.ok for r in rows)
        status = "[green]ok[/]" if ok else "[red]FAIL[/]"
        table.add_row(
            symbol, *ages, str(sum(len(r.gaps) for r in rows)), status,
            "; ".join(reason for r in rows for reason in r.reasons),
        )
    console.print(table)
    limits = ", ".join(f"{timeframe_label(tf)} < {h:g} h" for tf, h in report.stale_limits_hours.items())
    details = {
        "staleness": f"newest closed candle {limits}",
        "coverage": f"{report.fresh_symbols} of {len(report.symbols)} symbols fresh "
        f"({report.coverage:.1%}, minimum {report.coverage_min:.0%})",
        "continuity": f"no gap longer than {report.max_gap_candles} candles "
        f"in the last {report.continuity_window_hours:g} h",
    }
    for name, passed in report.checks.items():
        mark = "[green]PASS[/]" if passed else "[red]FAIL[/]"
        console.print(f"{mark} {name}: {details[name]}")
    for reason in report.reasons:
        console.print(f"  - {reason}", markup=False, highlight=False)
    console.print("data quality: " + ("[green]OK[/]" if report.ok else "[red]FAILED[/]"))


@app.command("check-data")
def check_data_command(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report."),
    symbols: str | None = typer.Option(None, "--symbols", help="Comma-separated symbols (default: the universe)."),
    timeframes: str | None = typer.Option(None, "--timeframes", help="Comma-separated, e.g. 1h,4h (default: all)."),
) -> None:
    """Check staleness, coverage and continuity of the stored candles; exit 0 all pass, 1 one fails, 2 bad input."""
    settings = load_settings()
    chosen_symbols = parse_symbols(symbols, settings.symbols) if symbols is not None else None
    chosen_tfs = [p for p in timeframes.split(",") if p.strip()] if timeframes is not None else None
    existing_db_path(settings)
    store = Store(settings.database_url, create=False)
    try:
        report = check_data(store, settings, symbols=chosen_symbols, timeframes=chosen_tfs)
    finally:
        store.close()
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, Console())
    raise typer.Exit(0 if report.ok else 1)


@app.command("check-integrity")
def check_integrity_command(
    full: bool = typer.Option(False, "--full", help="PRAGMA integrity_check (slow) instead of quick_check."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
) -> None:
    """Check the database file with PRAGMA quick_check (or integrity_check); exit 0 ok, 1 problems, 2 no file."""
    settings = load_settings()
    path = existing_db_path(settings)
    result = check_integrity(path, full=full)
    if as_json:
        print(json.dumps({
            "ok": result.ok, "mode": result.mode,
            "database": str(path) if path else settings.database_url, "problems": result.problems,
        }, indent=2))
    elif result.ok:
        print(f"ok ({result.mode}) {path if path else settings.database_url}")
    else:
        print(f"CORRUPT ({result.mode}) {path}: {len(result.problems)} problem(s)")
        for problem in result.problems:
            print(f"  {problem}")
        print("  what to do: stop the writers and recover (runbook scenario 3): "
              "`prefect deployment run recover-db-corruption/auto`, or restore the newest good backup "
              "with `crypto-agent restore --latest-good`")
    raise typer.Exit(0 if result.ok else 1)
