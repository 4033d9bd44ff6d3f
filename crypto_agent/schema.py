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

