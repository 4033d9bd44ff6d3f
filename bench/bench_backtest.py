"""Backtest throughput: the vectorized engine against a plain pandas row loop, 60 symbols x 2 years of H1.

Prints candles x strategies per second for every strategy of the engine, and, for sma_cross, the same
backtest written as a Python loop over DataFrame.itertuples(); the two must agree on every position and
metric before any figure is printed. Run: `python -m bench.bench_backtest [--loop-symbols N]`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import deque

import numpy as np
import pandas as pd

from crypto_agent import backtest as bt
from crypto_agent.universe import UNIVERSE

H1_MS = 3_600_000
YEARS = 2
CANDLES_PER_SYMBOL = YEARS * 365 * 24  # 17,520
START_MS = 1_672_531_200_000  # 2023-01-01 00:00 UTC
FEE_BPS = 10.0
REPEATS = 3


def synthetic_candles(symbol: str, seed: int, n: int = CANDLES_PER_SYMBOL) -> pd.DataFrame:
    """n hourly candles of a random walk, shaped like Store.candles() returns them."""
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.008, n)))
    open_ = np.concatenate(([100.0], close[:-1]))
    wick = 1.0 + np.abs(rng.normal(0.0, 0.003, (2, n)))
    ts = START_MS + np.arange(n, dtype=np.int64) * H1_MS
    df = pd.DataFrame({
        "symbol": symbol, "timestamp": ts, "open": open_, "high": np.maximum(open_, close) * wick[0],
        "low": np.minimum(open_, close) / wick[1], "close": close, "volume": rng.uniform(1, 100, n),
        "close_time": ts + H1_MS - 1, "quote_volume": 0.0, "trades": 1,
    })
    df.index = pd.to_datetime(df["timestamp"], unit="ms", utc=True)
    df.index.name = "open_time"
    return df


def loop_sma_cross(candles: pd.DataFrame, fast: int, slow: int, fee_bps: float, ppy: float) -> tuple[list[int], dict]:
    """sma_cross and its metrics, one row at a time over itertuples(): the reference the engine must match."""
    fee = fee_bps / 10_000.0
    window: deque[float] = deque(maxlen=slow)
    positions: list[int] = []
    returns: list[float] = []
    equity = peak = carry = 1.0
    worst = 0.0
    held = trades = wins = 0
    prev_close = entry_close = math.nan
    position = 0
    for i, row in enumerate(candles.itertuples(index=False)):
        close = row.close
        window.append(close)
        target = 0
        if len(window) == slow:
            fast_sma = sum(list(window)[-fast:]) / fast
            target = 1 if fast_sma > sum(window) / slow else 0
        growth = 1.0
        if i > 0 and position == 1:
            growth = close / prev_close
            held += 1
        if target != position:
            growth *= 1.0 - fee
            if target == 1:
                entry_close = close
            else:
                trades += 1
                wins += close / entry_close * (1.0 - fee) ** 2 > 1.0
        if i == 0:
            carry = growth  # a fill at the first close is paid with the first period
        else:
            growth *= carry
            carry = 1.0
            equity *= growth
            returns.append(growth - 1.0)
            peak = max(peak, equity)
            worst = min(worst, equity / peak - 1.0)
        positions.append(target)
        position = target
        prev_close = close
    mean = sum(returns) / len(returns)
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1))
    return positions, {
        "total_return": equity - 1.0, "sharpe": mean / std * math.sqrt(ppy) if std > 0 else math.nan,
        "max_drawdown": worst, "win_rate": wins / trades if trades else math.nan, "trades": trades,
        "exposure": held / (len(candles) - 1),
    }


def _assert_agree(symbol: str, engine: bt.BacktestResult, loop: dict) -> None:
    for key, value in loop.items():
        got = getattr(engine, key)
        if not (got == value or math.isclose(got, value, rel_tol=1e-9, abs_tol=1e-12)):
            raise AssertionError(f"{symbol}: engine {key}={got!r} but the loop gives {value!r}")


def main(argv: list[str] | None = None) -> None:
    """Build the data in memory, time both implementations, check they agree, print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.bench_backtest")
    parser.add_argument("--symbols", type=int, default=60, help="symbols in the universe (default 60)")
    parser.add_argument("--loop-symbols", type=int, default=60, help="symbols the slow loop runs over")
    args = parser.parse_args([] if argv is None else argv)  # under `python -m bench` argv is the runner's
    symbols = list(UNIVERSE[: args.symbols])
    loop_symbols = symbols[: max(1, min(args.loop_symbols, len(symbols)))]

    started = time.perf_counter()
    data = {s: synthetic_candles(s, seed) for seed, s in enumerate(symbols)}
    total = sum(len(df) for df in data.values())
    print(f"data: {len(symbols)} symbols x {CANDLES_PER_SYMBOL:,} H1 candles ({YEARS} years) = {total:,} candles, "
          f"built in {time.perf_counter() - started:.1f} s")
    ppy = bt.periods_per_year("1h")

    # vectorized: every strategy on every symbol, default parameters; best of REPEATS passes
    per_strategy: dict[str, float] = dict.fromkeys(bt.STRATEGIES, math.inf)
    engine_sma: dict[str, bt.BacktestResult] = {}
    for _ in range(REPEATS):
        for name in bt.STRATEGIES:
            t0 = time.perf_counter()
            for symbol, df in data.items():
                result = bt.run_backtest(df, name, fee_bps=FEE_BPS, periods_per_year=ppy)
                if name == "sma_cross":
                    engine_sma[symbol] = result
            per_strategy[name] = min(per_strategy[name], time.perf_counter() - t0)
    vector_seconds = sum(per_strategy.values())
    vector_rate = total * len(bt.STRATEGIES) / vector_seconds
    print(f"vectorized run_backtest, {len(bt.STRATEGIES)} strategies x {len(symbols)} symbols "
          f"(best of {REPEATS}): {vector_seconds:.2f} s, {vector_rate:,.0f} candles x strategies / s")
    for name, seconds in per_strategy.items():
        print(f"  {name:<14} {seconds:6.2f} s  {total / seconds:>14,.0f} candles / s  "
              f"({seconds / len(symbols) * 1000:.1f} ms per symbol)")

    # the plain loop, sma_cross only, checked against the engine symbol by symbol
    fast, slow = bt.STRATEGIES["sma_cross"].defaults["fast"], bt.STRATEGIES["sma_cross"].defaults["slow"]
    loop_candles = sum(len(data[s]) for s in loop_symbols)
    t0 = time.perf_counter()
    loop_results = {s: loop_sma_cross(data[s], fast, slow, FEE_BPS, ppy) for s in loop_symbols}
    loop_seconds = time.perf_counter() - t0
    for symbol, (positions, metrics) in loop_results.items():
        vector_positions = bt.STRATEGIES["sma_cross"].positions(data[symbol], fast=fast, slow=slow).tolist()
        if vector_positions != positions:
            raise AssertionError(f"{symbol}: the engine's sma_cross positions differ from the loop's")
        _assert_agree(symbol, engine_sma[symbol], metrics)
    trades = sum(m["trades"] for _, m in loop_results.values())
    loop_rate = loop_candles / loop_seconds
    scaled = "" if len(loop_symbols) == len(symbols) else (
        f" (over {len(loop_symbols)} of {len(symbols)} symbols; {total / loop_rate:.1f} s scaled to all)")
    print(f"plain loop over itertuples(), sma_cross: {loop_seconds:.2f} s for {loop_candles:,} candles, "
          f"{loop_rate:,.0f} candles / s{scaled}")
    print(f"agreement: positions identical and metrics equal (rel 1e-9) on {len(loop_symbols)} symbols, "
          f"{trades:,} trades")
    sma_rate = total / per_strategy["sma_cross"]
    print(f"speed-up on sma_cross: vectorized {sma_rate:,.0f} vs loop {loop_rate:,.0f} candles / s "
          f"= {sma_rate / loop_rate:.0f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
