"""Benchmark: backfill 60 symbols x 72 h of 1h and 4h from an in-process simulator into a fresh store.

Target: under 10 s with the default workers. A run with workers=1 in the same process is the baseline.
Run: `python -m bench.bench_collector`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from crypto_agent.collector import CollectSummary, backfill, closed_end_ms
from crypto_agent.exchange import BinanceClient
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store
from crypto_agent.universe import TIMEFRAMES, UNIVERSE

LOOKBACK_HOURS = 72
TARGET_S = 10.0


def _run(sim: Simulator, folder: Path, workers: int) -> tuple[float, CollectSummary, int]:
    """One backfill into a fresh store: seconds taken, the summary, klines requests sent."""
    before = sim.stats()["requests"].get("/api/v3/klines", 0)
    with Store(f"sqlite:///{folder / f'workers{workers}.db'}") as store, BinanceClient(sim.url) as client:
        started = time.perf_counter()
        now = client.server_time()
        windows = []
        for tf in TIMEFRAMES.values():
            end = closed_end_ms(now, tf.ms)
            windows += [(s, tf.interval, end - LOOKBACK_HOURS * 3_600_000, end) for s in UNIVERSE]
        summary = backfill(store, client, windows, now_ms=now, workers=workers)
        elapsed = time.perf_counter() - started
        if not summary.ok:
            raise RuntimeError(f"backfill failed: {summary.failures}")
        expected = sum(len(UNIVERSE) * LOOKBACK_HOURS * 3_600_000 // tf.ms for tf in TIMEFRAMES.values())
        if summary.total != expected or store.count("1h") + store.count("4h") != expected:
            raise RuntimeError(f"wrote {summary.total} candles, expected {expected}")
    return elapsed, summary, sim.stats()["requests"].get("/api/v3/klines", 0) - before


def main() -> None:
    """Print the time, candles/s and requests of a backfill with 4 workers and with 1 (the baseline)."""
    with tempfile.TemporaryDirectory(prefix="bench-collector-") as tmp, \
            Simulator(host="127.0.0.1", port=0, symbols=UNIVERSE, seed=0, history_days=30) as sim:
        folder = Path(tmp)
        # The simulator computes each symbol's price path once; do it before timing, so that neither
        # run pays for it and the ratio compares the collector alone.
        started = time.perf_counter()
        for symbol in UNIVERSE:
            for tf in TIMEFRAMES:
                sim.klines(symbol, tf, limit=LOOKBACK_HOURS)
        print(f"simulator warm-up (not counted): {time.perf_counter() - started:.2f} s")
        results = {}
        for workers in (1, 4):
            elapsed, summary, requests = _run(sim, folder, workers)
            results[workers] = elapsed
            print(f"backfill {len(UNIVERSE)} symbols x {LOOKBACK_HOURS} h x 1h+4h, workers={workers}: "
                  f"{summary.total} candles in {elapsed:.2f} s = {summary.total / elapsed:,.0f} candles/s, "
                  f"{requests} klines requests")
        verdict = "meets" if results[4] < TARGET_S else "MISSES"
        print(f"workers=4 vs workers=1 (baseline): {results[1] / results[4]:.2f}x faster; "
              f"{verdict} the {TARGET_S:.0f} s target")


if __name__ == "__main__":
    main()
