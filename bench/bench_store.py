"""Candles stored per second: Store.upsert_candles against raw sqlite3 executemany of the same rows.

Both write the same rows, one transaction per symbol, into fresh files with the same schema and
pragmas, in the same run. Target: the store reaches at least 0.7 of raw.

Run: python -m bench.bench_store [--symbols 60] [--hours 8760]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.schema import CreateTable

from crypto_agent.schema import OHLCV_TABLES
from crypto_agent.store import BUSY_TIMEOUT_MS, Candle, Store
from crypto_agent.universe import TIMEFRAMES, UNIVERSE

TARGET_RATIO = 0.7
HOUR_MS = TIMEFRAMES["1h"].ms
START_MS = 1_700_000_000_000 // HOUR_MS * HOUR_MS


def synthetic_candles(n: int, seed: int) -> list[Candle]:
    """n consecutive H1 candles with plausible, distinct values."""
    out: list[Candle] = []
    price = 100.0 + seed
    for i in range(n):
        t = START_MS + i * HOUR_MS
        price *= 1.0 + ((i * 7919 + seed * 104729) % 201 - 100) / 100_000
        out.append((t, price, price * 1.01, price * 0.99, price * 1.001, 10.0 + i % 97,
                    t + HOUR_MS - 1, price * (10.0 + i % 97), 100 + i % 50))
    return out


def raw_write(path: Path, table_name: str, data: dict[str, list[Candle]]) -> float:
    """Seconds to write every row with sqlite3 executemany INSERT OR REPLACE, one transaction per symbol."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(str(CreateTable(OHLCV_TABLES["1h"]).compile(dialect=sqlite_dialect.dialect())))
    sql = f"INSERT OR REPLACE INTO {table_name} VALUES (?,?,?,?,?,?,?,?,?,?)"
    started = time.perf_counter()
    for symbol, candles in data.items():
        conn.execute("BEGIN")
        conn.executemany(sql, [(symbol, *c) for c in candles])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def store_write(path: Path, data: dict[str, list[Candle]]) -> float:
    """Seconds to write every row with Store.upsert_candles, one call per symbol."""
    store = Store(f"sqlite:///{path}")
    try:
        started = time.perf_counter()
        for symbol, candles in data.items():
            store.upsert_candles(symbol, "1h", candles)
        return time.perf_counter() - started
    finally:
        store.close()


def _count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {OHLCV_TABLES['1h'].name}").fetchone()[0]
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    """Print rows/s of the store and of raw sqlite3, and their ratio against the target."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_store", description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=60, help="symbols to write (at most 60)")
    parser.add_argument("--hours", type=int, default=8760, help="H1 candles per symbol")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    args = parser.parse_args([] if argv is None else argv)  # called bare by `python -m bench`

    symbols = UNIVERSE[: max(1, min(args.symbols, len(UNIVERSE)))]
    data = {s: synthetic_candles(args.hours, i) for i, s in enumerate(symbols)}
    rows = sum(len(c) for c in data.values())
    print(f"bench_store: {len(symbols)} symbols x {args.hours} H1 candles = {rows:,} rows, "
          f"one transaction per symbol, best of {args.rounds} rounds")

    raw_best = store_best = float("inf")
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        for r in range(args.rounds):
            raw_path = Path(tmp) / f"raw{r}.db"
            store_path = Path(tmp) / f"store{r}.db"
            raw_best = min(raw_best, raw_write(raw_path, OHLCV_TABLES["1h"].name, data))
            store_best = min(store_best, store_write(store_path, data))
            for p in (raw_path, store_path):
                if _count(p) != rows:
                    raise SystemExit(f"bench_store: {p.name} holds {_count(p)} rows, expected {rows}")

    raw_rate = rows / raw_best
    store_rate = rows / store_best
    ratio = store_rate / raw_rate
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    print(f"  raw sqlite3 executemany : {raw_rate:12,.0f} rows/s ({raw_best:.3f} s)")
    print(f"  Store.upsert_candles    : {store_rate:12,.0f} rows/s ({store_best:.3f} s)")
    print(f"  ratio store/raw         : {ratio:.2f} (target >= {TARGET_RATIO}) {verdict}")


if __name__ == "__main__":
    main(sys.argv[1:])
