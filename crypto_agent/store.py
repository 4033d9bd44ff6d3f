"""The market-data store: SQLAlchemy 2 schema on SQLite (WAL), idempotent upserts, integrity checks."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
from sqlalchemy import (
    Engine,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from crypto_agent.errors import StoreError
from crypto_agent.schema import CANDLE_COLUMNS, OHLCV_TABLES, metadata

BUSY_TIMEOUT_MS = 30_000

# A candle as stored: (open_time, open, high, low, close, volume, close_time, quote_volume, trades)
Candle = tuple[int, float, float, float, float, float, int, float, int]


def candle_from_kline(k: Sequence) -> Candle:
    """A stored candle from one Binance kline array (prices arrive as strings)."""
    return (
        int(k[0]), float(k[1]), float(k[2]), float(k[3]), float(k[4]), float(k[5]),
        int(k[6]), float(k[7]), int(k[8]),
    )


@dataclass(frozen=True)
class IntegrityResult:
    """The outcome of PRAGMA quick_check / integrity_check: ok, or the problems SQLite listed."""

    ok: bool
    mode: str
    problems: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def _on_connect(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine on the store: WAL mode and a busy timeout on every connection; the folder is created."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the database folder {path.parent}: {exc.strerror}",
                hint="set CRYPTO_AGENT_DB_PATH (or db_path in the config file) to a writable place",
            ) from None
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _on_connect)
    return engine


class Store:
    """The market-data store: one SQLite file, its tables created on open."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if create:
            try:
                metadata.create_all(self.engine)
            except OperationalError as exc:
                raise StoreError(
                    f"cannot open the database {url}: {exc.orig}",
                    hint="check that the path is writable and the file is a SQLite database "
                    "(`crypto-agent check-integrity` tells whether it is corrupt)",
                ) from None

    @property
    def path(self) -> Path | None:
        """The database file, for a SQLite store."""
        db = make_url(self.url).database
        return Path(db) if db and db != ":memory:" else None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- candles ---

    def upsert_candles(self, symbol: str, timeframe: str, candles: Iterable[Candle]) -> int:
        """Insert or replace candles of one symbol and timeframe, in one transaction; the count written."""
        table = OHLCV_TABLES[timeframe]
        rows = [
            {
                "symbol": symbol, "timestamp": c[0], "open": c[1], "high": c[2], "low": c[3],
                "close": c[4], "volume": c[5], "close_time": c[6], "quote_volume": c[7],
                "trades": c[8],
            }
            for c in candles
        ]
        if not rows:
            return 0
        stmt = sqlite_insert(table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["symbol", "timestamp"],
            set_={c: stmt.excluded[c] for c in (
                "open", "high", "low", "close", "volume", "close_time", "quote_volume", "trades")},
        )
        try:
            with self.engine.begin() as conn:
                conn.execute(stmt, rows)
        except SQLAlchemyError as exc:
            raise StoreError(
                f"writing {len(rows)} {timeframe} candles of {symbol} failed: {getattr(exc, 'orig', exc)}",
                hint="nothing of this batch was written; check disk space and `crypto-agent check-integrity`",
            ) from None
        return len(rows)

    def newest_open_time(self, symbol: str, timeframe: str) -> int | None:
        """Open time (ms) of the newest stored candle of a symbol, or None when it has none."""
        t = OHLCV_TABLES[timeframe]
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(t.c.timestamp)).where(t.c.symbol == symbol)).scalar()

    def newest_by_symbol(self, timeframe: str) -> dict[str, int]:
        """Open time (ms) of the newest stored candle of every symbol present."""
        t = OHLCV_TABLES[timeframe]
        with self.engine.connect() as conn:
            rows = conn.execute(select(t.c.symbol, func.max(t.c.timestamp)).group_by(t.c.symbol))
            return {s: ts for s, ts in rows}

    def open_times(self, symbol: str, timeframe: str, start_ms: int, end_ms: int) -> list[int]:
        """Sorted open times (ms) stored for a symbol in [start_ms, end_ms)."""
        t = OHLCV_TABLES[timeframe]
        q = (
            select(t.c.timestamp)
            .where(t.c.symbol == symbol, t.c.timestamp >= start_ms, t.c.timestamp < end_ms)
            .order_by(t.c.timestamp)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def open_times_all(self, timeframe: str, start_ms: int | None = None) -> pd.DataFrame:
        """(symbol, timestamp) of every stored candle, optionally from start_ms, sorted."""
        t = OHLCV_TABLES[timeframe]
        q = select(t.c.symbol, t.c.timestamp)
        if start_ms is not None:
            q = q.where(t.c.timestamp >= start_ms)
        q = q.order_by(t.c.symbol, t.c.timestamp)
        with self.engine.connect() as conn:
            return pd.DataFrame(conn.execute(q).all(), columns=["symbol", "timestamp"])

    def candles(
        self, symbol: str, timeframe: str, start_ms: int | None = None, end_ms: int | None = None
    ) -> pd.DataFrame:
        """Stored candles of one symbol as a DataFrame indexed by open time (UTC), oldest first."""
        t = OHLCV_TABLES[timeframe]
        q = select(t).where(t.c.symbol == symbol)
        if start_ms is not None:
            q = q.where(t.c.timestamp >= start_ms)
        if end_ms is not None:
            q = q.where(t.c.timestamp < end_ms)
        q = q.order_by(t.c.timestamp)
        with self.engine.connect() as conn:
            df = pd.DataFrame(conn.execute(q).all(), columns=[c.name for c in t.columns])
        df.index = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
        df.index.name = "open_time"
        return df

    def count(self, timeframe: str, symbol: str | None = None) -> int:
        """Number of stored candles of a timeframe (of one symbol, if given)."""
        t = OHLCV_TABLES[timeframe]
        q = select(func.count()).select_from(t)
        if symbol is not None:
            q = q.where(t.c.symbol == symbol)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar() or 0)

    # --- integrity ---

    def check_integrity(self, full: bool = False, max_errors: int = 100) -> IntegrityResult:
        """PRAGMA quick_check (default) or integrity_check (full): ok, or the problems found."""
        return check_integrity(self.path, full=full, max_errors=max_errors)


def check_integrity(path: Path | str | None, full: bool = False, max_errors: int = 100) -> IntegrityResult:
    """Check a SQLite file with PRAGMA quick_check or integrity_check, without creating or changing it."""
    mode = "integrity_check" if full else "quick_check"
    if path is None:
        return IntegrityResult(True, mode)
    p = Path(path)
    if not p.is_file():
        return IntegrityResult(False, mode, [f"database file {p} does not exist"])
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            rows = [r[0] for r in conn.execute(f"PRAGMA {mode}({int(max_errors)})")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return IntegrityResult(False, mode, [f"{type(exc).__name__}: {exc}"])
    ok = rows == ["ok"]
    return IntegrityResult(ok, mode, [] if ok else rows)


def open_store(settings=None) -> Store:
    """The store the settings point at."""
    if settings is None:
        from crypto_agent.settings import get_settings

        settings = get_settings()
    return Store(settings.database_url)


def table_counts(engine: Engine) -> dict[str, int]:
    """Row count of every table in the database."""
    with engine.connect() as conn:
        names = [r[0] for r in conn.execute(text(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name"))]
        return {n: int(conn.execute(text(f'SELECT COUNT(*) FROM "{n}"')).scalar()) for n in names}
