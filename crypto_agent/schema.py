"""Every table of the store, on one MetaData, so one create_all() makes the whole schema.

Each issue adds its tables in a section of its own below; nothing here does I/O.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table

from crypto_agent.universe import TIMEFRAMES

metadata = MetaData()

CANDLE_COLUMNS = (
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "trades",
)


def _ohlcv_table(name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("symbol", String(20), primary_key=True),
        # candle open time, UTC epoch milliseconds as Binance gives it
        Column("timestamp", BigInteger, primary_key=True),
        Column("open", Float, nullable=False),
        Column("high", Float, nullable=False),
        Column("low", Float, nullable=False),
        Column("close", Float, nullable=False),
        Column("volume", Float, nullable=False),
        Column("close_time", BigInteger, nullable=False),
        Column("quote_volume", Float, nullable=False),
        Column("trades", Integer, nullable=False),
        sqlite_with_rowid=False,
    )


# --- market data (issue 2) ---
OHLCV_TABLES: dict[str, Table] = {tf.interval: _ohlcv_table(tf.table) for tf in TIMEFRAMES.values()}


# --- backtest results (issue 3) ---
from sqlalchemy import Index, Text  # noqa: E402  (kept in this section so sections stay independent)

backtest_results = Table(
    "backtest_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("strategy", String(40), nullable=False),
    Column("params", Text, nullable=False),  # JSON object, keys sorted
    Column("symbol", String(20), nullable=False),
    Column("timeframe", String(4), nullable=False),
    # open times (UTC ms) of the first and the last candle the backtest used
    Column("period_start", BigInteger, nullable=False),
    Column("period_end", BigInteger, nullable=False),
    Column("candles", Integer, nullable=False),
    Column("fee_bps", Float, nullable=False),
    Column("total_return", Float, nullable=False),
    Column("sharpe", Float),  # NULL when undefined (flat returns)
    Column("max_drawdown", Float, nullable=False),  # <= 0: the worst fall from a peak, as a fraction
    Column("win_rate", Float),  # NULL when no trade was closed
    Column("trades", Integer, nullable=False),
    Column("exposure", Float, nullable=False),
    Column("created_at", BigInteger, nullable=False),  # UTC ms
    Index("ix_backtest_results_run_id", "run_id"),
    Index("ix_backtest_results_symbol_tf", "symbol", "timeframe", "strategy"),
    sqlite_autoincrement=True,
)


# --- services: paper trading, health probe, service events (issue 3) ---
from sqlalchemy import Boolean  # noqa: E402  (kept in this section so sections stay independent)
from sqlalchemy import text as _sql_text  # noqa: E402

# One row per symbol, strategy and closed candle the paper trader evaluated (never an order).
paper_signals = Table(
    "paper_signals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("symbol", String(20), nullable=False),
    Column("timeframe", String(4), nullable=False),
    Column("strategy", String(40), nullable=False),
    Column("candle_time", BigInteger, nullable=False),  # open time (UTC ms) of the newest closed candle
    Column("close", Float, nullable=False),
    Column("signal", Integer, nullable=False),  # 1 long, 0 flat
    Column("action", String(8), nullable=False),  # open, close, hold, flat
    Column("evaluated_at", BigInteger, nullable=False),  # UTC ms
    Index("ux_paper_signals_candle", "symbol", "timeframe", "strategy", "candle_time", unique=True),
)

paper_positions = Table(
    "paper_positions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("symbol", String(20), nullable=False),
    Column("timeframe", String(4), nullable=False),
    Column("strategy", String(40), nullable=False),
    Column("status", String(8), nullable=False),  # open, closed
    Column("quantity", Float, nullable=False),
    Column("entry_time", BigInteger, nullable=False),  # candle open time (UTC ms) of the entry signal
    Column("entry_price", Float, nullable=False),
    Column("exit_time", BigInteger),
    Column("exit_price", Float),
    Column("pnl_usdt", Float),
    Column("opened_at", BigInteger, nullable=False),  # UTC ms, wall clock
    Column("closed_at", BigInteger),
    # at most one open paper position per symbol, timeframe and strategy
    Index(
        "ux_paper_positions_open", "symbol", "timeframe", "strategy",
        unique=True, sqlite_where=_sql_text("status = 'open'"),
    ),
)

probe_samples = Table(
    "probe_samples",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service", String(20), nullable=False),
    Column("checked_at", BigInteger, nullable=False),  # UTC ms
    Column("status", String(10), nullable=False),  # HEALTHY, DEGRADED, DEAD
    Column("pid", Integer),
    Column("alive", Boolean, nullable=False),
    Column("zombie", Boolean, nullable=False),
    Column("heartbeat_age_s", Float),
    Column("cpu_pct", Float),
    Column("rss_mb", Float),
    Column("log_errors_per_min", Float),
    Column("reasons", Text, nullable=False),  # "; "-joined, empty when healthy
    Index("ix_probe_samples_service_time", "service", "checked_at"),
)

# started / stopped (by the service), killed / start-failed (process control), crashed (whoever
# first sees a process gone without a clean stop); one row per kind and process instance.
service_events = Table(
    "service_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service", String(20), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("at", BigInteger, nullable=False),  # UTC ms
    Column("pid", Integer),
    Column("instance", String(64), nullable=False),  # "<pid>@<create time>", so a crash counts once
    Column("source", String(20), nullable=False),  # service, process-control, probe
    Column("detail", Text, nullable=False),
    Index("ux_service_events_instance", "service", "kind", "instance", unique=True),
    Index("ix_service_events_time", "service", "kind", "at"),
)


# --- sentiment and macro (issue 4) ---

# The Crypto Fear & Greed index, one row per day.
sentimento_mercado = Table(
    "sentimento_mercado",
    metadata,
    Column("timestamp", BigInteger, primary_key=True, autoincrement=False),  # UTC ms of the day's start
    Column("date", String(10), nullable=False),  # YYYY-MM-DD (UTC), for people and SQL
    Column("value", Integer, nullable=False),  # 0 (extreme fear) .. 100 (extreme greed)
    Column("classification", String(32), nullable=False),  # "Extreme Fear" .. "Extreme Greed"
    Column("fetched_at", BigInteger, nullable=False),  # UTC ms
)

# FRED observations, one row per series and date; value is NULL where FRED says "." (no value).
macro_series = Table(
    "macro_series",
    metadata,
    Column("series_id", String(40), primary_key=True),
    Column("date", String(10), primary_key=True),  # YYYY-MM-DD as FRED gives it
    Column("timestamp", BigInteger, nullable=False),  # UTC ms of that date's start, like the other tables
    Column("value", Float),
    Column("fetched_at", BigInteger, nullable=False),  # UTC ms
)
