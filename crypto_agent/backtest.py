"""The backtest engine: long-only spot strategies run vectorized over stored candles, with fees and metrics.

Conventions (every metric below follows them; the tests check them on hand-computed paths):

- A strategy returns, for every candle, the target position (0 or 1) decided on that candle's close.
  The order fills at that same close; the position is held from the next candle on. So the return of
  candle i (close[i-1] -> close[i]) is earned when the target of candle i-1 was 1: no look-ahead.
- Fees: `fee_bps` of the traded value on every position change, so equity is multiplied by
  (1 - fee_bps / 10_000) at each entry and at each exit. A position still open at the last candle is
  marked to market at the last close, with no exit fee.
- Per-candle strategy returns are the n - 1 close-to-close periods of n candles, net of fees.
  Sharpe = mean / standard deviation (ddof=1) * sqrt(periods per year), risk-free rate 0; NaN when
  the returns are constant (never in position). Periods per year come from the timeframe (365-day
  years: crypto trades every day), or from the median candle spacing when not given.
- max_drawdown is a fraction <= 0: the worst fall of the equity curve (starting at 1) from its running
  peak; -0.25 means a 25 % fall.
- A trade is one entry-exit round trip; `trades` counts the closed ones, and `win_rate` is the share of
  them whose return net of both fees is > 0 (NaN when none closed). `open_trade` says whether a position
  was still held at the end.
- exposure is the share of the n - 1 periods spent in position.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import insert, select
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent.errors import InputError, StoreError, StoreLocked
from crypto_agent.schema import backtest_results
from crypto_agent.store import Store, store_locked
from crypto_agent.storelock import locked_error
from crypto_agent.universe import timeframe as parse_timeframe
from crypto_agent.universe import validate_symbol

DAY_MS = 86_400_000
YEAR_MS = 365 * DAY_MS
DEFAULT_FEE_BPS = 10.0  # Binance spot taker fee, 0.1 %


# --- strategies ---


@dataclass(frozen=True)
class Strategy:
    """A named long-only strategy: its parameters' defaults and the function that gives target positions."""

    name: str
    defaults: dict[str, Any]
    positions: Callable[..., pd.Series]
    description: str = ""
    # index of the first candle whose target can be 1, given resolved params (the indicator's warm-up)
    warmup: Callable[[dict[str, Any]], int] = field(default=lambda params: 0)
    # raises InputError when resolved params are inconsistent (e.g. fast >= slow)
    check: Callable[[dict[str, Any]], None] = field(default=lambda params: None)

    def min_candles(self, params: dict[str, Any]) -> int:
        """Fewest candles for a meaningful run: the warm-up, one candle to signal, one to hold."""
        return self.warmup(params) + 2


def _sma_cross(candles: pd.DataFrame, fast: int = 20, slow: int = 50) -> pd.Series:
    """Long while the fast simple moving average of the close is above the slow one."""
    close = candles["close"]
    fast_sma = close.rolling(fast, min_periods=fast).mean()
    slow_sma = close.rolling(slow, min_periods=slow).mean()
    return (fast_sma > slow_sma).astype("int8")  # NaN during the warm-up compares False: flat


def _hold_between(enter: pd.Series, leave: pd.Series) -> pd.Series:
    """1 from a candle where `enter` holds until the next one where `leave` holds (causal forward fill)."""
    state = pd.Series(np.where(enter, 1.0, np.where(leave, 0.0, np.nan)), index=enter.index)
    return state.ffill().fillna(0.0).astype("int8")


def _wilder_average(values: pd.Series, period: int) -> pd.Series:
    """Wilder's smoothing: seeded with the mean of the first `period` values (from index 1), then EMA 1/period."""
    out = np.full(len(values), np.nan)
    if len(values) > period:
        tail = values.iloc[period:].to_numpy(dtype=float, copy=True)
        tail[0] = values.iloc[1:period + 1].mean()
        out[period:] = pd.Series(tail).ewm(alpha=1.0 / period, adjust=False).mean().to_numpy()
    return pd.Series(out, index=values.index)


def rsi(close: pd.Series, period: int = 14) -> pd.Series:
    """Wilder's RSI (0-100) of a close series; NaN during the warm-up and where the price did not move."""
    delta = close.diff()
    avg_gain = _wilder_average(delta.clip(lower=0.0), period)
    avg_loss = _wilder_average((-delta).clip(lower=0.0), period)
    total = avg_gain + avg_loss
    # 100 * g / (g + l) is 100 - 100 / (1 + g / l) without dividing by a zero loss
    return (100.0 * avg_gain / total).where(total > 0)


def _rsi_reversion(candles: pd.DataFrame, period: int = 14, low: float = 30.0, high: float = 70.0) -> pd.Series:
    """Enter when the RSI closes below `low` (oversold), leave when it closes above `high`."""
    value = rsi(candles["close"], period)
    return _hold_between(value < low, value > high)


def _breakout(candles: pd.DataFrame, lookback: int = 20) -> pd.Series:
    """Donchian breakout: enter on a close above the previous `lookback` highs, leave below their lows."""
    upper = candles["high"].rolling(lookback, min_periods=lookback).max().shift(1)
    lower = candles["low"].rolling(lookback, min_periods=lookback).min().shift(1)
    return _hold_between(candles["close"] > upper, candles["close"] < lower)


def _check_sma(params: dict[str, Any]) -> None:
    if params["fast"] < 1 or params["slow"] <= params["fast"]:
        raise InputError(
            f"sma_cross needs 1 <= fast < slow, got fast={params['fast']} slow={params['slow']}",
            hint="e.g. --param fast=20 --param slow=50",
        )


def _check_rsi(params: dict[str, Any]) -> None:
    if params["period"] < 1:
        raise InputError(f"rsi_reversion needs period >= 1, got {params['period']}", hint="e.g. --param period=14")
    if not 0 <= params["low"] < params["high"] <= 100:
        raise InputError(
            f"rsi_reversion needs 0 <= low < high <= 100, got low={params['low']} high={params['high']}",
            hint="e.g. --param low=30 --param high=70",
        )


def _check_breakout(params: dict[str, Any]) -> None:
    if params["lookback"] < 1:
        raise InputError(f"breakout needs lookback >= 1, got {params['lookback']}", hint="e.g. --param lookback=20")


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "sma_cross", {"fast": 20, "slow": 50}, _sma_cross,
            "long while SMA(fast) of the close > SMA(slow)",
            warmup=lambda p: p["slow"] - 1, check=_check_sma,
        ),
        Strategy(
            "rsi_reversion", {"period": 14, "low": 30.0, "high": 70.0}, _rsi_reversion,
            "enter when Wilder's RSI < low, leave when it is > high",
            warmup=lambda p: p["period"], check=_check_rsi,
        ),
        Strategy(
            "breakout", {"lookback": 20}, _breakout,
            "enter on a close above the previous lookback highs, leave on a close below their lows",
            warmup=lambda p: p["lookback"], check=_check_breakout,
        ),
    )
}


def get_strategy(name: str) -> Strategy:
    """The strategy of that name; InputError listing the valid names otherwise."""
    strategy = STRATEGIES.get(name)
    if strategy is None:
        raise InputError(
            f"unknown strategy {name!r}",
            hint=f"use one of: {', '.join(STRATEGIES)}",
        )
    return strategy


def _coerce(strategy: Strategy, key: str, value: Any) -> int | float:
    """A parameter value converted to the type of its default (int or float); InputError if it is not one."""
    want = type(strategy.defaults[key])
    bad = InputError(
        f"parameter {key} of {strategy.name} must be {'an integer' if want is int else 'a number'}, got {value!r}",
        hint=f"defaults: {format_params(strategy.defaults)}",
    )
    if isinstance(value, bool):
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(number) or (want is int and not number.is_integer()):
        raise bad
    return int(number) if want is int else number


def resolve_params(strategy: str | Strategy, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The strategy's defaults overridden by `params`, typed and checked; InputError naming the valid keys."""
    strat = strategy if isinstance(strategy, Strategy) else get_strategy(strategy)
    params = dict(params or {})
    unknown = sorted(set(params) - set(strat.defaults))
    if unknown:
        raise InputError(
            f"unknown parameter(s) {', '.join(unknown)} for strategy {strat.name}",
            hint=f"valid parameters: {format_params(strat.defaults)} (the defaults)",
        )
    resolved = {k: _coerce(strat, k, params.get(k, v)) for k, v in strat.defaults.items()}
    strat.check(resolved)
    return resolved


def format_params(params: dict[str, Any]) -> str:
    """Parameters as the CLI takes them: `fast=20 slow=50`."""
    return " ".join(f"{k}={v}" for k, v in params.items())


def periods_per_year(timeframe: str) -> float:
    """Candles per 365-day year of a timeframe ('1h' -> 8760, '4h' -> 2190)."""
    return YEAR_MS / parse_timeframe(timeframe).ms


# --- the engine ---


@dataclass(frozen=True)
class BacktestResult:
    """The metrics of one backtest; see the module docstring for each one's exact definition."""

    total_return: float  # fraction: 0.12 is +12 %, net of fees
    sharpe: float  # annualised; NaN when undefined
    max_drawdown: float  # fraction <= 0
    win_rate: float  # share of closed trades with a positive net return; NaN when none closed
    trades: int  # closed round trips
    exposure: float  # share of periods in position
    candles: int
    start_ms: int  # open time (UTC ms) of the first candle used
    end_ms: int  # open time (UTC ms) of the last candle used
    open_trade: bool = False  # a position was still held at the last candle
    fee_bps: float = DEFAULT_FEE_BPS
    periods_per_year: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The metrics as a JSON-ready dict; undefined values (NaN) become None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _open_times_ms(candles: pd.DataFrame) -> np.ndarray:
    """Open time (UTC ms) of every candle: the `timestamp` column if present, else the DatetimeIndex."""
    if "timestamp" in candles.columns:
        return candles["timestamp"].to_numpy(dtype=np.int64)
    if isinstance(candles.index, pd.DatetimeIndex):
        return candles.index.as_unit("ms").asi8
    raise InputError(
        "candles have neither a timestamp column nor a DatetimeIndex",
        hint="pass the DataFrame Store.candles() returns",
    )


def _target_positions(candles: pd.DataFrame, strat: Strategy, params: dict[str, Any]) -> np.ndarray:
    """The strategy's target positions as a float array of 0.0 / 1.0, checked."""
    missing = [c for c in ("close", "high", "low") if c not in candles.columns]
    if missing:
        raise InputError(f"candles lack column(s) {', '.join(missing)}",
                         hint="pass the DataFrame Store.candles() returns")
    targets = strat.positions(candles, **params)
    values = np.asarray(targets, dtype=float)
    if values.shape != (len(candles),) or not np.isin(values, (0.0, 1.0)).all():
        raise InputError(
            f"strategy {strat.name} returned positions other than one 0 or 1 per candle",
            hint="a strategy's positions() must return a Series aligned with the candles, values in {0, 1}",
        )
    return values


def _check_candles(candles: pd.DataFrame, times: np.ndarray) -> np.ndarray:
    """The close prices, after checking the candles are ordered, unique and priced."""
    if len(candles) < 2:
        raise InputError(f"a backtest needs at least 2 candles, got {len(candles)}", hint="collect more history first")
    if not (np.diff(times) > 0).all():
        raise InputError("candles are not in strictly increasing open-time order", hint="pass Store.candles() output")
    close = candles["close"].to_numpy(dtype=float)
    if not (np.isfinite(close).all() and (close > 0).all()):
        raise InputError("candles have missing or non-positive close prices", hint="run the data-quality checks")
    return close


def _metrics(
    close: np.ndarray, targets: np.ndarray, fee_bps: float, ppy: float, times: np.ndarray
) -> BacktestResult:
    """Every metric of one run from close prices and target positions (both arrays of length n >= 2)."""
    fee = fee_bps / 10_000.0
    change = np.diff(targets, prepend=0.0)  # +1 entry, -1 exit, filled at this candle's close
    fee_factor = 1.0 - fee * np.abs(change)
    held = targets[:-1]  # the position held over period i (close[i] -> close[i+1])
    growth = (1.0 + held * (close[1:] / close[:-1] - 1.0)) * fee_factor[1:]
    growth[0] *= fee_factor[0]  # a fill at the very first close is paid in the first period
    equity = np.concatenate(([1.0], np.cumprod(growth)))
    returns = growth - 1.0

    std = returns.std(ddof=1) if len(returns) > 1 else 0.0
    sharpe = float(returns.mean() / std * math.sqrt(ppy)) if std > 0 else math.nan
    drawdown = equity / np.maximum.accumulate(equity) - 1.0

    entries = np.flatnonzero(change > 0)
    exits = np.flatnonzero(change < 0)
    # long-only 0/1 from flat: entries and exits alternate, entry k precedes exit k
    trade_returns = close[exits] / close[entries[: len(exits)]] * (1.0 - fee) ** 2 - 1.0
    return BacktestResult(
        total_return=float(equity[-1] - 1.0),
        sharpe=sharpe,
        max_drawdown=float(drawdown.min()),
        win_rate=float((trade_returns > 0).mean()) if len(exits) else math.nan,
        trades=len(exits),
        exposure=float(held.mean()),
        candles=len(close),
        start_ms=int(times[0]),
        end_ms=int(times[-1]),
        open_trade=bool(targets[-1] == 1.0),
        fee_bps=float(fee_bps),
        periods_per_year=float(ppy),
    )


def run_backtest(
    candles: pd.DataFrame,
    strategy: str,
    params: dict[str, Any] | None = None,
    fee_bps: float = DEFAULT_FEE_BPS,
    periods_per_year: float | None = None,
) -> BacktestResult:
    """Backtest one strategy over candles (oldest first); InputError on a bad strategy, param or input."""
    strat = get_strategy(strategy)
    resolved = resolve_params(strat, params)
    _check_fee(fee_bps)
    times = _open_times_ms(candles)
    close = _check_candles(candles, times)
    targets = _target_positions(candles, strat, resolved)
    return _metrics(close, targets, float(fee_bps), _periods_per_year(times, periods_per_year), times)


def evaluate_positions(
    candles: pd.DataFrame,
    positions: pd.Series | np.ndarray,
    fee_bps: float = DEFAULT_FEE_BPS,
    periods_per_year: float | None = None,
) -> BacktestResult:
    """The metrics of given target positions (0/1 per candle, decided on its close) over candles."""
    _check_fee(fee_bps)
    times = _open_times_ms(candles)
    close = _check_candles(candles, times)
    targets = np.asarray(positions, dtype=float)
    if targets.shape != close.shape or not np.isin(targets, (0.0, 1.0)).all():
        raise InputError("positions must hold one 0 or 1 per candle", hint="align them with the candles")
    return _metrics(close, targets, float(fee_bps), _periods_per_year(times, periods_per_year), times)


def _check_fee(fee_bps: float) -> None:
    if not (isinstance(fee_bps, (int, float)) and math.isfinite(fee_bps) and 0 <= fee_bps < 10_000):
        raise InputError(f"fee_bps must be in [0, 10000), got {fee_bps!r}", hint="10 is Binance's spot taker fee")


def _periods_per_year(times: np.ndarray, given: float | None) -> float:
    """The given periods per year, checked, or the one the median candle spacing implies."""
    if given is None:
        return YEAR_MS / float(np.median(np.diff(times)))
    if not (isinstance(given, (int, float)) and math.isfinite(given) and given > 0):
        raise InputError(f"periods_per_year must be > 0, got {given!r}", hint="8760 for 1h candles")
    return float(given)


def latest_signal(
    candles: pd.DataFrame, strategy: str, params: dict[str, Any] | None = None, now_ms: int | None = None
) -> int:
    """Target position (0 or 1) after the newest closed candle; 0 when there are too few candles to say.

    Every candle is taken as closed unless `now_ms` is given: then candles whose close_time is not yet
    past are ignored, so a still-forming candle never drives a live decision.
    """
    strat = get_strategy(strategy)
    resolved = resolve_params(strat, params)
    if now_ms is not None and "close_time" in candles.columns:
        candles = candles[candles["close_time"].to_numpy() < now_ms]
    if len(candles) == 0:
        return 0
    return int(_target_positions(candles, strat, resolved)[-1])


# --- the results table ---


def _locked_error(store: Store) -> StoreLocked:
    return locked_error(store.path, "no backtest result was written", "run again")


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not run_id.strip() or len(run_id) > 64:
        raise InputError(f"run_id must be 1-64 characters, got {run_id!r}", hint="e.g. a UTC timestamp")


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def save_result(
    store: Store,
    run_id: str,
    strategy: str,
    symbol: str,
    timeframe: str,
    params: dict[str, Any] | None,
    result: BacktestResult,
) -> None:
    """Write one row of backtest_results; StoreLocked when the store is locked, StoreError if the write fails.

    For a known strategy the params saved are the resolved ones (defaults filled in), so a row says it all.
    """
    _check_run_id(run_id)
    if strategy in STRATEGIES:
        params = resolve_params(strategy, params)
    if store_locked(store):
        raise _locked_error(store)
    row = {
        "run_id": run_id,
        "strategy": strategy,
        "params": json.dumps(params or {}, sort_keys=True),
        "symbol": symbol,
        "timeframe": timeframe,
        "period_start": result.start_ms,
        "period_end": result.end_ms,
        "candles": result.candles,
        "fee_bps": result.fee_bps,
        "total_return": result.total_return,
        "sharpe": _none_if_nan(result.sharpe),
        "max_drawdown": result.max_drawdown,
        "win_rate": _none_if_nan(result.win_rate),
        "trades": result.trades,
        "exposure": result.exposure,
        "created_at": int(time.time() * 1000),
    }
    try:
        with store.engine.begin() as conn:
            conn.execute(insert(backtest_results), [row])
    except SQLAlchemyError as exc:
        raise StoreError(
            f"writing the backtest result of {strategy} on {symbol} {timeframe} failed: {getattr(exc, 'orig', exc)}",
            hint="nothing was written; check disk space and `crypto-agent check-integrity`",
        ) from None


def results(
    store: Store, run_id: str | None = None, symbol: str | None = None, limit: int | None = None
) -> pd.DataFrame:
    """Saved backtest results, newest first, optionally of one run and/or symbol (params as JSON text)."""
    t = backtest_results
    q = select(t).order_by(t.c.id.desc())
    if run_id is not None:
        q = q.where(t.c.run_id == run_id)
    if symbol is not None:
        q = q.where(t.c.symbol == symbol)
    if limit is not None:
        q = q.limit(int(limit))
    with store.engine.connect() as conn:
        return pd.DataFrame(conn.execute(q).all(), columns=[c.name for c in t.columns])


def load_candles(
    store: Store, symbol: str, timeframe: str, lookback_days: float | None = None
) -> pd.DataFrame:
    """Stored candles of a symbol, all of them or the last `lookback_days` up to the newest stored candle."""
    tf = parse_timeframe(timeframe)
    if lookback_days is None:
        return store.candles(symbol, tf.interval)
    if not (isinstance(lookback_days, (int, float)) and math.isfinite(lookback_days) and lookback_days > 0):
        raise InputError(f"lookback_days must be > 0, got {lookback_days!r}", hint="e.g. 365")
    newest = store.newest_open_time(symbol, tf.interval)
    if newest is None:
        return store.candles(symbol, tf.interval)
    # relative to the newest stored candle, not the clock, so the same data gives the same window
    start = newest + tf.ms - round(lookback_days * DAY_MS)
    return store.candles(symbol, tf.interval, start_ms=start)


def run_unit(
    store: Store,
    symbol: str,
    timeframe: str,
    strategy: str,
    run_id: str,
    params: dict[str, Any] | None = None,
    lookback_days: float | None = None,
    fee_bps: float = DEFAULT_FEE_BPS,
) -> BacktestResult | None:
    """Backtest one (symbol, timeframe, strategy) from the store and save the row; None if too little data.

    StoreLocked (before any work) when the store is locked; InputError on a bad name or parameter.
    """
    if store_locked(store):
        raise _locked_error(store)
    _check_run_id(run_id)
    sym = validate_symbol(symbol)
    tf = parse_timeframe(timeframe)
    strat = get_strategy(strategy)
    resolved = resolve_params(strat, params)
    candles = load_candles(store, sym, tf.interval, lookback_days)
    if len(candles) < strat.min_candles(resolved):
        return None
    result = run_backtest(candles, strat.name, resolved, fee_bps, periods_per_year(tf.interval))
    save_result(store, run_id, strat.name, sym, tf.interval, resolved, result)
    return result
