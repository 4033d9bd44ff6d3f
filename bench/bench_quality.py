"""Time to check the quality of 60 symbols x 2 years of H1 and H4 candles (target: under 1 s).

The database is built once in a temporary file with raw sqlite3 executemany (setup, not timed),
with a few gaps and one stale symbol so the check has something to find; then check_data runs
several times on a fresh Store and the median is printed against the target.

Run: python -m bench.bench_quality [--symbols 60] [--days 730] [--runs 5]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.schema import CreateTable

from crypto_agent.quality import check_data
from crypto_agent.schema import OHLCV_TABLES
from crypto_agent.settings import load_settings
from crypto_agent.store import Store
from crypto_agent.universe import TIMEFRAMES, UNIVERSE

TARGET_S = 1.0
HOUR_MS = 3_600_000
# A fixed "now" on an H4 boundary, so every run sees the same data as equally fresh.
NOW_MS = 1_790_000_000_000 // (4 * HOUR_MS) * (4 * HOUR_MS)


def build(path: Path, symbols: tuple[str, ...], days: int) -> int:
    """Write `days` of H1 and H4 candles per symbol, ending at NOW_MS, with a few holes; rows written."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    for table in OHLCV_TABLES.values():
        conn.execute(str(CreateTable(table).compile(dialect=sqlite_dialect.dialect())))
    total = 0
    for tf, table in OHLCV_TABLES.items():
        interval = TIMEFRAMES[tf].ms
        n = days * 24 * HOUR_MS // interval
        first = NOW_MS - n * interval
        for i, symbol in enumerate(symbols):
            stop = NOW_MS - (40 * HOUR_MS if i == 1 else 0)  # symbol 1 is stale on both timeframes
            holes = set(range(n - 10, n - 5)) if i % 10 == 3 else set()  # every tenth: a 5-candle gap
            rows = [
                (symbol, t, 1.0, 1.1, 0.9, 1.0, 5.0, t + interval - 1, 5.0, 10)
                for k in range(n)
                if k not in holes and (t := first + k * interval) + interval <= stop
            ]
            conn.execute("BEGIN")
            conn.executemany(f"INSERT INTO {table.name} VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
            total += len(rows)
    conn.close()
    return total


def main(argv: list[str] | None = None) -> None:
    """Print the median time of check_data over the built database against the 1 s target."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=60, help="symbols (at most 60)")
    parser.add_argument("--days", type=int, default=730, help="days of history per symbol")
    parser.add_argument("--runs", type=int, default=5, help="timed runs; the median is reported")
    args = parser.parse_args([] if argv is None else argv)  # called bare by `python -m bench`
    symbols = UNIVERSE[: max(1, min(args.symbols, len(UNIVERSE)))]

    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        path = Path(tmp) / "quality.db"
        started = time.perf_counter()
        rows = build(path, symbols, args.days)
        setup_s = time.perf_counter() - started
        size_mb = path.stat().st_size / 1e6
        print(f"bench_quality: {len(symbols)} symbols x {args.days} days of H1 and H4 = {rows:,} rows "
              f"({size_mb:.0f} MB, built in {setup_s:.1f} s)")

        settings = load_settings(symbols=list(symbols), db_path=path)
        times: list[float] = []
        report = None
        for _ in range(max(1, args.runs)):
            store = Store(settings.database_url, create=False)
            try:
                started = time.perf_counter()
                report = check_data(store, settings, now_ms=NOW_MS + 30 * 60_000)
                times.append(time.perf_counter() - started)
            finally:
                store.close()

    assert report is not None
    median = statistics.median(times)
    verdict = "PASS" if median < TARGET_S else "MISS"
    print(f"  check_data: median {median * 1000:.1f} ms over {len(times)} runs "
          f"(first {times[0] * 1000:.1f} ms, best {min(times) * 1000:.1f} ms); target < {TARGET_S:g} s {verdict}")
    print(f"  found: checks {report.checks}, {len(report.stale_series)} stale series, "
          f"{sum(len(s.gaps) for s in report.series)} gaps, {len(report.failing_windows())} windows to backfill")


if __name__ == "__main__":
    main(sys.argv[1:])
