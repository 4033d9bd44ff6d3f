"""Commands: collect (market data from the exchange into the store)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy.engine import make_url

from crypto_agent.cli.app import app
from crypto_agent.collector import MODES, CollectSummary, collect
from crypto_agent.errors import CryptoAgentError, InputError, StoreCorrupt, StoreError, StoreUnreadable
from crypto_agent.exchange import BinanceClient
from crypto_agent.settings import Settings, load_settings
from crypto_agent.store import CORRUPTION_NEXT, Store, check_integrity, store_error
from crypto_agent.universe import parse_symbols, timeframe


def _parse_timeframes(text: str) -> list[str]:
    names: list[str] = []
    for part in text.split(","):
        if part.strip():
            name = timeframe(part).interval
            if name not in names:
                names.append(name)
    if not names:
        raise InputError("no timeframes given", hint="pass e.g. --timeframes=1h,4h")
    return names


def check_db_writable(settings: Settings) -> None:
    """StoreError unless the SQLite file (or the folder it will be created in) is writable; creates nothing."""
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database).expanduser().absolute()
    hint = "set CRYPTO_AGENT_DB_PATH (or db_path in the config file) to a writable place"
    if path.exists() and not path.is_file():
        raise StoreUnreadable(f"the store {path} is not a file (a folder or device is in its place)",
                              hint="move it aside and restore the store (`crypto-agent restore --latest-good`), "
                              "or " + hint)
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise StoreError(f"cannot create the database {path}: {folder} is not a folder", hint=hint)
    # os.access says yes to root even on /proc; only creating a file tells the truth.
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".crypto-agent-write-test-"):
            pass
    except OSError as exc:
        raise StoreError(f"cannot create the database {path}: {folder} is not writable ({exc.strerror})",
                         hint=hint) from None


def check_store_sound(settings: Settings) -> None:
    """StoreCorrupt (or StoreUnreadable) when the existing store fails quick_check: a writer never writes into it.

    About 0.35 s per 50 MB of store; a store that does not exist yet passes (it is created later).
    """
    url = make_url(settings.database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database).expanduser().absolute()
    if not path.is_file():
        return
    result = check_integrity(path)
    if result.ok:
        return
    # "DatabaseError: file is not a database" -> SQLite's words; quick_check's own rows stay as they are
    first = result.problems[0] if result.problems else "quick_check failed"
    name, sep, rest = first.partition(": ")
    reason = rest if sep and name.endswith("Error") else first
    more = f"; {len(result.problems) - 1} more problem(s)" if len(result.problems) > 1 else ""
    known = store_error(Exception(reason), path)
    if known is not None:
        raise known
    raise StoreCorrupt(f"the store {path} is corrupt ({reason}{more})", hint=CORRUPTION_NEXT)


def backfill_universe(
    stack: ExitStack, settings: Settings, store: Store, client: BinanceClient, err: Console
) -> tuple[CollectSummary, str]:
    """The collector's update of the whole universe (a progress bar on a terminal); the summary and one line of it."""
    summary = collect(
        store, client, list(settings.symbols), list(settings.timeframes), mode="update",
        initial_history_days=settings.initial_history_days, progress=progress_bar(stack, err),
    )
    per_tf = {tf: sum(n for (_, t), n in summary.written.items() if t == tf) for tf in settings.timeframes}
    line = (f"{summary.total} candles written for {len(settings.symbols)} symbols "
            f"({', '.join(f'{tf}: {n}' for tf, n in per_tf.items())})")
    return summary, line


def progress_bar(stack: ExitStack, console: Console) -> Callable[[int, int, str], None] | None:
    """A collect progress callback drawing a bar on a terminal (closed with the stack); None elsewhere."""
    if not console.is_terminal:
        return None
    bar = stack.enter_context(Progress(
        TextColumn("collect {task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True,
    ))
    task = bar.add_task("", total=None)

    def update(done: int, total: int, label: str) -> None:
        bar.update(task, completed=done, total=total, description=label)

    return update


def print_summary(summary: CollectSummary, console: Console) -> None:
    by_symbol = summary.by_symbol()
    tfs = sorted({tf for _, tf, _ in summary.to_rows()}, key=lambda t: timeframe(t).ms)
    table = Table(title=f"candles written ({summary.mode})")
    table.add_column("symbol")
    for tf in tfs:
        table.add_column(tf, justify="right")
    table.add_column("status")
    for symbol, counts in by_symbol.items():
        status = "failed" if symbol in summary.failures else "ok"
        table.add_row(symbol, *(str(counts.get(tf, 0)) for tf in tfs), status)
    console.print(table)
    per_tf = ", ".join(f"{tf}: {sum(c.get(tf, 0) for c in by_symbol.values())}" for tf in tfs)
    console.print(f"total: {summary.total} candles written ({per_tf}) for {len(by_symbol)} symbols; "
                  f"{len(summary.failures)} failed")


@app.command("collect")
def collect_command(
    mode: str = typer.Option(
        "update", "--mode",
        help="update: from each newest stored closed candle up to now; "
        "update-all: fill every hole of the lookback window.",
    ),
    symbols: str | None = typer.Option(
        None, "--symbols", help="Comma-separated symbols, e.g. BTCUSDT,ETHUSDT (default: the configured universe)."
    ),
    timeframes: str | None = typer.Option(
        None, "--timeframes", help="Comma-separated timeframes, e.g. 1h,4h (default: the configured ones)."
    ),
    lookback_hours: float = typer.Option(72.0, "--lookback-hours", help="Window update-all fills, in hours."),
    exchange_url: str | None = typer.Option(
        None, "--exchange-url", help="Binance-compatible REST base URL (default: the exchange_url setting)."
    ),
    workers: int = typer.Option(4, "--workers", help="Requests in flight at once (1-16)."),
) -> None:
    """Fetch closed candles from the exchange into the store; exit 1 if a symbol failed, 2 on bad input."""
    settings = load_settings()
    # Everything is checked before the network or the database is touched.
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}", hint=f"use --mode={MODES[0]} or --mode={MODES[1]}")
    chosen = parse_symbols(symbols, settings.symbols) if symbols is not None else list(settings.symbols)
    tfs = _parse_timeframes(timeframes) if timeframes is not None else list(settings.timeframes)
    if not lookback_hours > 0:
        raise InputError(f"--lookback-hours must be positive, got {lookback_hours:g}",
                         hint="pass e.g. --lookback-hours=72")
    if not 1 <= workers <= 16:
        raise InputError(f"--workers must be between 1 and 16, got {workers}", hint="pass e.g. --workers=4")
    if exchange_url is not None:
        if not exchange_url.startswith(("http://", "https://")):
            raise InputError(f"--exchange-url {exchange_url!r} is not an http(s) URL",
                             hint="pass e.g. --exchange-url=https://api.binance.com")
        settings = load_settings(exchange_url=exchange_url)
    check_db_writable(settings)
    check_store_sound(settings)

    out = Console()
    err = Console(stderr=True)
    with ExitStack() as stack:
        client = stack.enter_context(BinanceClient.from_settings(settings))
        client.ping()  # an unreachable exchange stops us here, before the store is created
        store = stack.enter_context(Store(settings.database_url))
        progress_cb = progress_bar(stack, err)
        try:
            summary = collect(
                store, client, chosen, tfs, mode=mode, lookback_hours=lookback_hours,
                initial_history_days=settings.initial_history_days, workers=workers, progress=progress_cb,
            )
        except CryptoAgentError as exc:
            partial = getattr(exc, "summary", None)
            if isinstance(partial, CollectSummary):
                print_summary(partial, out)
                err.print(f"the run stopped after writing {partial.total} candles; every written page is complete",
                          markup=False)
            raise
    print_summary(summary, out)
    if summary.failures:
        for symbol, message in summary.failures.items():
            hint = summary.hints.get(symbol)
            print(f"failed: {symbol}: {message}" + (f"\n  what to do: {hint}" if hint else ""), file=sys.stderr)
        others = len(chosen) - len(summary.failures)
        print(f"error: {len(summary.failures)} symbol(s) failed: {', '.join(summary.failures)}; "
              + (f"the other {others} were collected" if others else "nothing was collected"), file=sys.stderr)
        raise typer.Exit(1)
