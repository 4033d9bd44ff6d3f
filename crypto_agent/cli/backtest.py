"""Commands: backtest (one strategy on one symbol from the store, its metrics printed)."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from sqlalchemy.engine import make_url

from crypto_agent import backtest as engine
from crypto_agent.cli.app import app
from crypto_agent.cli.data import check_store_sound
from crypto_agent.errors import InputError, StoreError, StoreUnreadable
from crypto_agent.settings import load_settings
from crypto_agent.store import Store
from crypto_agent.universe import timeframe as parse_timeframe
from crypto_agent.universe import validate_symbol


def parse_param_options(options: list[str]) -> dict[str, str]:
    """`NAME=VALUE` options as a dict of strings (typed later against the strategy); InputError if malformed."""
    out: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InputError(f"malformed --param {option!r}", hint="write it NAME=VALUE, e.g. --param fast=10")
        out[name.strip()] = value.strip()
    return out


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * 100:+.2f} %" if signed else f"{value * 100:.2f} %"


def _open_existing_store(url: str, create: bool) -> Store:
    """The configured store; StoreError when its SQLite file does not exist (a backtest never creates one)."""
    parsed = make_url(url)
    database = parsed.database or ""
    is_file = parsed.get_backend_name() == "sqlite" and database not in ("", ":memory:")
    if is_file and Path(database).exists() and not Path(database).is_file():
        raise StoreUnreadable(
            f"the store {database} is not a file (a folder or device is in its place)",
            hint="point CRYPTO_AGENT_DB_PATH at the store, or restore it (`crypto-agent restore --latest-good`)",
        )
    if is_file and not Path(database).is_file():
        raise StoreError(
            f"no database at {database}",
            hint="point CRYPTO_AGENT_DB_PATH at the store, or collect candles first",
        )
    return Store(url, create=create)


def render(report: dict[str, Any]) -> str:
    """The human-readable metrics block of one backtest report."""
    params = " ".join(f"{k}={v}" for k, v in report["params"].items())
    trades = report["trades"]
    win = _pct(report["win_rate"])
    if trades:
        win += f" ({round(report['win_rate'] * trades)} of {trades} closed trades)"
    sharpe = "n/a" if report["sharpe"] is None else f"{report['sharpe']:.3f}"
    lines = [
        f"{report['symbol']} {report['timeframe']} {report['strategy']} {params}",
        (
            f"period        {_utc(report['start_ms'])} -> {_utc(report['end_ms'])} UTC (candle open times), "
            f"{report['candles']} candles, fee {report['fee_bps']:g} bps"
        ),
        f"total_return  {_pct(report['total_return'], signed=True)}",
        f"sharpe        {sharpe} (annualised, {report['periods_per_year']:g} periods/year)",
        f"max_drawdown  {_pct(report['max_drawdown'], signed=True)}",
        f"win_rate      {win}",
        f"trades        {trades}{' (+1 still open)' if report['open_trade'] else ''}",
        f"exposure      {_pct(report['exposure'])}",
    ]
    if report.get("run_id"):
        lines.append(f"saved         run_id {report['run_id']}")
    return "\n".join(lines)


@app.command("backtest")
def backtest_command(
    symbol: str = typer.Option(..., "--symbol", help="The symbol, e.g. BTCUSDT."),
    timeframe: str = typer.Option("4h", "--timeframe", help="1h or 4h (H1, H4)."),
    strategy: str = typer.Option(..., "--strategy", help=f"One of: {', '.join(engine.STRATEGIES)}."),
    param: list[str] = typer.Option([], "--param", help="A strategy parameter NAME=VALUE; repeatable."),
    days: float | None = typer.Option(None, "--days", help="Only the last N days up to the newest candle."),
    fee_bps: float = typer.Option(engine.DEFAULT_FEE_BPS, "--fee-bps", help="Fee per fill, basis points."),
    save: bool = typer.Option(False, "--save", help="Also save the result in backtest_results (run_id cli-...)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Backtest one strategy on one symbol's stored candles and print the metrics; exit 2 on a bad input."""
    # every input is checked before the store is opened
    sym = validate_symbol(symbol)
    tf = parse_timeframe(timeframe).interval
    strat = engine.get_strategy(strategy)
    params = engine.resolve_params(strat, parse_param_options(param))
    if not (math.isfinite(fee_bps) and 0 <= fee_bps < 10_000):
        raise InputError(f"--fee-bps must be in [0, 10000), got {fee_bps}", hint="10 is Binance's spot taker fee")
    if days is not None and not (math.isfinite(days) and days > 0):
        raise InputError(f"--days must be > 0, got {days}", hint="e.g. --days 365")

    settings = load_settings()
    if save:  # a result is never written into a damaged store
        check_store_sound(settings)
    store = _open_existing_store(settings.database_url, create=save)
    try:
        candles = engine.load_candles(store, sym, tf, days)
        needed = strat.min_candles(params)
        if len(candles) < needed:
            raise InputError(
                f"{sym} {tf} has {len(candles)} stored candles in the window; {strat.name} "
                f"with {engine.format_params(params)} needs at least {needed}",
                hint="collect more history, widen --days, or shorten the strategy's windows",
            )
        result = engine.run_backtest(candles, strat.name, params, fee_bps, engine.periods_per_year(tf))
        run_id = None
        if save:
            run_id = "cli-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            engine.save_result(store, run_id, strat.name, sym, tf, params, result)
    finally:
        store.close()

    report = {"symbol": sym, "timeframe": tf, "strategy": strat.name, "params": params, **result.to_dict()}
    if run_id:
        report["run_id"] = run_id
    print(json.dumps(report, indent=2) if as_json else render(report))
