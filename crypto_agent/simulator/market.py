"""The simulated market: deterministic, realistic candles for any symbol, interval and time range.

Prices follow a mean-reverting random walk of the log price per day (fat-tailed daily moves, volatility
that clusters), computed once per symbol from 2010-01-01 and cached. Each day is then filled in at
one-minute resolution by a bridge between that day's open and the next day's open, with an intraday
volatility and volume profile, from a random generator keyed by a hash of (seed, symbol, day): any
time range is computed without walking from the epoch. Every interval is aggregated from the same
minutes, so a 4h candle is exactly its four 1h candles (open, high, low, close; sums for volumes).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
MINUTES_PER_DAY = 1440

# Day number (days since 1970-01-01) of 2010-01-01: the first day the simulated market exists.
EPOCH_DAY = 14_610
# Weeks on Binance start on Monday; 1970-01-05 was the first Monday after the epoch.
WEEK_OFFSET_MS = 4 * DAY_MS

# Binance's interval names and their lengths; 1s and 1M (calendar month) are not simulated.
INTERVALS_MS: dict[str, int] = {
    "1m": MINUTE_MS,
    "3m": 3 * MINUTE_MS,
    "5m": 5 * MINUTE_MS,
    "15m": 15 * MINUTE_MS,
    "30m": 30 * MINUTE_MS,
    "1h": HOUR_MS,
    "2h": 2 * HOUR_MS,
    "4h": 4 * HOUR_MS,
    "6h": 6 * HOUR_MS,
    "8h": 8 * HOUR_MS,
    "12h": 12 * HOUR_MS,
    "1d": DAY_MS,
    "3d": 3 * DAY_MS,
    "1w": 7 * DAY_MS,
}

# Columns of a candle row, in the order the arrays hold them.
OPEN, HIGH, LOW, CLOSE, VOLUME, QUOTE_VOLUME, TRADES, TAKER_BASE, TAKER_QUOTE = range(9)
N_COLUMNS = 9

# Rough price levels of the universe, so each symbol looks like itself; others get a hashed level.
_PRICE_LEVELS: dict[str, float] = {
    "BTCUSDT": 65000, "ETHUSDT": 3200, "BNBUSDT": 580, "SOLUSDT": 150, "XRPUSDT": 0.6,
    "ADAUSDT": 0.45, "DOGEUSDT": 0.15, "AVAXUSDT": 30, "DOTUSDT": 6.5, "TRXUSDT": 0.13,
    "LINKUSDT": 14, "POLUSDT": 0.45, "LTCUSDT": 75, "BCHUSDT": 400, "ATOMUSDT": 7,
    "UNIUSDT": 8, "XLMUSDT": 0.11, "ETCUSDT": 22, "FILUSDT": 4.5, "APTUSDT": 8,
    "NEARUSDT": 5, "ARBUSDT": 0.8, "OPUSDT": 1.8, "ICPUSDT": 9, "HBARUSDT": 0.08,
    "VETUSDT": 0.03, "ALGOUSDT": 0.16, "AAVEUSDT": 120, "GRTUSDT": 0.2, "SANDUSDT": 0.35,
    "MANAUSDT": 0.35, "AXSUSDT": 6, "EGLDUSDT": 35, "THETAUSDT": 1.5, "XTZUSDT": 0.8,
    "EOSUSDT": 0.6, "INJUSDT": 22, "FLOWUSDT": 0.6, "CHZUSDT": 0.07, "KAVAUSDT": 0.4,
    "RUNEUSDT": 4.5, "CRVUSDT": 0.35, "SNXUSDT": 2, "COMPUSDT": 50, "SUIUSDT": 1.2,
    "ZECUSDT": 30, "DASHUSDT": 28, "NEOUSDT": 12, "IOTAUSDT": 0.2, "ENJUSDT": 0.2,
    "BATUSDT": 0.2, "ZILUSDT": 0.02, "1INCHUSDT": 0.35, "SUSHIUSDT": 0.8, "YFIUSDT": 6500,
    "QTUMUSDT": 2.8, "ONEUSDT": 0.015, "SEIUSDT": 0.4, "KSMUSDT": 25, "TIAUSDT": 6,
}
_DAILY_VOL: dict[str, float] = {"BTCUSDT": 0.028, "ETHUSDT": 0.035, "BNBUSDT": 0.032}
_DAILY_QUOTE_VOLUME: dict[str, float] = {
    "BTCUSDT": 1.2e9, "ETHUSDT": 6e8, "SOLUSDT": 3e8, "BNBUSDT": 1e8, "XRPUSDT": 1.5e8, "DOGEUSDT": 1e8,
}
_QUOTE_ASSETS = ("USDT", "FDUSD", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB")

# Daily log-price dynamics: pull towards the symbol's level (half-life ~170 days), clustered volatility.
_MEAN_REVERSION = 0.004
_VOL_PERSISTENCE = 0.97
_VOL_OF_VOL = 0.08
_DAILY_BLOCK = 1024


def stable_key(*parts: object) -> int:
    """A 128-bit integer from a hash of the parts: the seed of a random generator."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


def keyed_rng(*parts: object) -> np.random.Generator:
    """A random generator determined by the parts alone (seeded by their hash)."""
    return np.random.Generator(np.random.SFC64(stable_key(*parts)))


def _unit(*parts: object) -> float:
    """A number in [0, 1) determined by the parts alone."""
    return (stable_key(*parts) >> 64) / 2.0**64


@dataclass(frozen=True)
class SymbolProfile:
    """What makes a simulated symbol itself: its price level, volatility, liquidity and filters."""

    symbol: str
    base_asset: str
    quote_asset: str
    price: float  # the level the price reverts to
    daily_vol: float  # standard deviation of the daily log return in a calm regime
    daily_quote_volume: float  # USDT traded per day at the typical activity level
    avg_trade_quote: float  # USDT per trade
    tick_size: float
    step_size: float
    price_decimals: int
    qty_decimals: int


@lru_cache(maxsize=4096)
def symbol_profile(symbol: str) -> SymbolProfile:
    """The profile of a symbol: a fixed table for the universe, a hash of the name for any other."""
    quote = next((q for q in _QUOTE_ASSETS if symbol.endswith(q) and len(symbol) > len(q)), symbol[-4:])
    base = symbol[: -len(quote)] if symbol.endswith(quote) else symbol[:-4]
    price = _PRICE_LEVELS.get(symbol) or 10 ** (-2 + 5 * _unit("price", symbol))
    vol = _DAILY_VOL.get(symbol) or 0.042 + 0.03 * _unit("vol", symbol)
    quote_volume = _DAILY_QUOTE_VOLUME.get(symbol) or 10 ** (6.7 + 1.2 * _unit("volume", symbol))
    magnitude = math.floor(math.log10(price))
    price_decimals = min(8, max(2, 4 - magnitude))
    qty_decimals = min(8, max(0, magnitude + 1))
    return SymbolProfile(
        symbol=symbol,
        base_asset=base,
        quote_asset=quote,
        price=float(price),
        daily_vol=float(vol),
        daily_quote_volume=float(quote_volume),
        avg_trade_quote=150.0 + 900.0 * _unit("trade", symbol),
        tick_size=10.0**-price_decimals,
        step_size=10.0**-qty_decimals,
        price_decimals=price_decimals,
        qty_decimals=qty_decimals,
    )


def _intraday_profile() -> tuple[np.ndarray, np.ndarray]:
    """Per-minute volatility and volume multipliers over a UTC day: busiest at the US open, quiet in Asia's night."""
    hours = (np.arange(MINUTES_PER_DAY) + 0.5) / 60.0
    activity = (
        0.8
        + 0.55 * np.exp(-(((hours - 14.5) / 2.5) ** 2))
        + 0.25 * np.exp(-(((hours - 8.5) / 2.0) ** 2))
        + 0.15 * np.exp(-(((hours - 1.0) / 1.5) ** 2))
    )
    vol = activity / np.sqrt(np.mean(activity**2))
    volume = activity**1.5 / np.mean(activity**1.5)
    return vol, volume


_VOL_PROFILE, _VOLUME_PROFILE = _intraday_profile()


def interval_offset(interval_ms: int) -> int:
    """Where candles of this length are aligned: the epoch, except weeks, which start on Monday."""
    return WEEK_OFFSET_MS if interval_ms == INTERVALS_MS["1w"] else 0


def aggregate(open_times: np.ndarray, rows: np.ndarray, interval_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """Candles of interval_ms from consecutive shorter candles: first open, max high, min low, last close, sums."""
    if len(open_times) == 0:
        return open_times, rows
    offset = interval_offset(interval_ms)
    group = (open_times - offset) // interval_ms
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], len(group)] - 1
    out = np.empty((len(starts), N_COLUMNS))
    out[:, OPEN] = rows[starts, OPEN]
    out[:, HIGH] = np.maximum.reduceat(rows[:, HIGH], starts)
    out[:, LOW] = np.minimum.reduceat(rows[:, LOW], starts)
    out[:, CLOSE] = rows[ends, CLOSE]
    out[:, VOLUME:] = np.add.reduceat(rows[:, VOLUME:], starts, axis=0)
    return group[starts] * interval_ms + offset, out



def _fold(rows: np.ndarray, k: int) -> np.ndarray:
    """Candles k times longer from (days, m*k, N_COLUMNS) rows: (days, m, N_COLUMNS)."""
    days, n, _ = rows.shape
    grouped = rows.reshape(days, n // k, k, N_COLUMNS)
    out = np.empty((days, n // k, N_COLUMNS))
    out[..., OPEN] = grouped[:, :, 0, OPEN]
    out[..., HIGH] = grouped[..., HIGH].max(axis=2)
    out[..., LOW] = grouped[..., LOW].min(axis=2)
    out[..., CLOSE] = grouped[:, :, -1, CLOSE]
    out[..., VOLUME:] = grouped[..., VOLUME:].sum(axis=2)
    return out


def _ar1(y0: float, a: float, inputs: np.ndarray) -> np.ndarray:
    """y[0] = y0, y[i+1] = a*y[i] + inputs[i], without a Python loop over i."""
    out = np.empty(len(inputs) + 1)
    out[0] = y0
    chunk = 256  # keeps a**-chunk far from overflow
    for lo in range(0, len(inputs), chunk):
        u = inputs[lo:lo + chunk]
        j = np.arange(1, len(u) + 1)
        out[lo + 1:lo + 1 + len(u)] = a**j * (out[lo] + np.cumsum(u * a ** -j))
    return out


class _LruCache:
    """A small thread-safe least-recently-used map."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        """The value, marked as recently used; None when absent."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        """Store a value, dropping the least recently used beyond capacity."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


_GENERATE_CHUNK_DAYS = 64
# Resolutions kept per day: 1440 one-minute rows, 24 one-hour rows, one one-day row.
_LEVEL_ROWS = {MINUTE_MS: MINUTES_PER_DAY, HOUR_MS: 24, DAY_MS: 1}


class Market:
    """Deterministic candles for (seed, symbol, interval, open time), existing from history_start_ms on."""

    def __init__(self, seed: int, history_start_ms: int) -> None:
        if history_start_ms < EPOCH_DAY * DAY_MS:
            raise ValueError("the simulated market starts on 2010-01-01")
        self.seed = seed
        self.history_start_ms = history_start_ms // DAY_MS * DAY_MS
        self._daily: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._daily_lock = threading.Lock()
        self._cache = {
            MINUTE_MS: _LruCache(192),  # ~100 kB a day
            HOUR_MS: _LruCache(16384),  # ~2 kB a day
            DAY_MS: _LruCache(65536),
        }

    # --- the daily walk -------------------------------------------------------------------------

    def daily_series(self, symbol: str, day: int) -> tuple[np.ndarray, np.ndarray]:
        """(log open price per day, daily volatility per day), indexed by day - EPOCH_DAY, covering `day`+1."""
        index = day - EPOCH_DAY
        series = self._daily.get(symbol)
        if series is not None and len(series[1]) > index + 1:
            return series
        with self._daily_lock:
            series = self._daily.get(symbol)
            if series is None or len(series[1]) <= index + 1:
                series = self._compute_daily(symbol, (index + 2) // _DAILY_BLOCK + 1)
                self._daily[symbol] = series
        return series

    def _compute_daily(self, symbol: str, blocks: int) -> tuple[np.ndarray, np.ndarray]:
        profile = symbol_profile(symbol)
        shocks, vol_shocks = [], []
        for b in range(blocks):
            # Blocks keyed on their own, so extending the series never changes its past.
            rng = keyed_rng(self.seed, symbol, "daily", b)
            # Student-t with 4 degrees of freedom, scaled to unit variance: fat-ish tails.
            shocks.append(rng.standard_t(4, _DAILY_BLOCK) / math.sqrt(2.0))
            vol_shocks.append(rng.standard_normal(_DAILY_BLOCK))
        log_vol = _ar1(0.0, _VOL_PERSISTENCE, _VOL_OF_VOL * np.concatenate(vol_shocks))[:-1]
        sigma = profile.daily_vol * np.exp(log_vol)
        level = math.log(profile.price)
        # Start away from the level, differently per seed, so seeds do not share one history.
        start = 0.3 * (2 * _unit(self.seed, symbol, "start") - 1)
        log_open = level + _ar1(start, 1 - _MEAN_REVERSION, sigma * np.concatenate(shocks))
        return log_open, sigma

    # --- whole days at one-minute resolution ----------------------------------------------------

    def _generate_minutes(self, symbol: str, days: list[int]) -> np.ndarray:
        """The one-minute candles of the given days: (len(days), 1440, N_COLUMNS)."""
        profile = symbol_profile(symbol)
        log_open, sigma = self.daily_series(symbol, max(days))
        n = len(days)
        idx = np.asarray(days) - EPOCH_DAY
        x0, x1, day_sigma = log_open[idx][:, None], log_open[idx + 1][:, None], sigma[idx][:, None]
        z = np.empty((3, n, MINUTES_PER_DAY))
        hour_noise = np.empty((n, 24))
        for k, day in enumerate(days):
            rng = keyed_rng(self.seed, symbol, "day", day)
            z[:, k] = rng.standard_normal((3, MINUTES_PER_DAY))
            hour_noise[k] = rng.standard_normal(24)
        shock, wick_noise, volume_noise = z[0], z[1], z[2]
        # About one minute in 300 is a jump: four times the usual move, with a long wick.
        jumps = np.abs(wick_noise) > 2.97
        hour_factor = np.repeat(np.exp(0.25 * hour_noise), 60, axis=1)
        weight = _VOL_PROFILE * hour_factor
        weight[jumps] *= 4.0
        variance = weight * weight
        total_variance = variance.sum(axis=1, keepdims=True)
        scale = day_sigma / np.sqrt(total_variance)
        steps = scale * weight * shock
        # Bridge: spread the gap to the next day's open over the minutes, in proportion to their variance.
        steps += variance * (((x1 - x0) - steps.sum(axis=1, keepdims=True)) / total_variance)
        path = np.empty((n, MINUTES_PER_DAY + 1))
        path[:, 0:1] = x0
        np.cumsum(steps, axis=1, out=path[:, 1:])
        path[:, 1:] += x0
        path[:, -1:] = x1
        tick = profile.tick_size
        prices = np.maximum(np.round(np.exp(path) / tick), 1) * tick
        opens, closes = prices[:, :-1], prices[:, 1:]
        wick = (0.6 * scale) * weight
        # Rounded outwards to the tick, so a wick never cuts into the body.
        highs = np.ceil(np.maximum(opens, closes) * np.exp(wick * np.abs(wick_noise)) / tick) * tick
        low_noise = np.abs(np.roll(wick_noise, 720, axis=1))  # another minute's draw: independent of the high
        lows = np.floor(np.minimum(opens, closes) * np.exp(-wick * low_noise) / tick) * tick
        lows = np.clip(lows, tick, None)
        # Busier markets in volatile regimes; volume counted in the base asset.
        activity = np.minimum((day_sigma / profile.daily_vol) ** 2, 6.0)
        base_volume = profile.daily_quote_volume / MINUTES_PER_DAY / np.exp(x0) * activity
        surprise = 0.55 + 0.45 * np.abs(shock)
        surprise[jumps] *= 3.0
        step = profile.step_size
        volume = base_volume * (_VOLUME_PROFILE * np.sqrt(hour_factor) * surprise * np.exp(0.35 * volume_noise - 0.06))
        volume = np.maximum(np.round(volume / step), 1) * step
        typical = (opens + highs + lows + closes) * 0.25
        quote_volume = np.round(volume * typical, 8)
        trades = np.maximum(np.round(quote_volume / profile.avg_trade_quote), 1)
        # Buyers take more of the liquidity on up-minutes.
        taker_share = np.clip(0.5 + 0.12 * np.tanh(shock) + 0.05 * volume_noise, 0.05, 0.95)
        taker_base = np.round(volume * taker_share / step) * step
        taker_quote = np.round(taker_base * typical, 8)
        return np.stack(
            (opens, highs, lows, closes, volume, quote_volume, trades, taker_base, taker_quote), axis=-1
        )

    def _days(self, symbol: str, days: list[int], level_ms: int) -> list[np.ndarray]:
        """Whole-day rows at one resolution (1m, 1h or 1d) for each day, from the cache or generated."""
        cache = self._cache[level_ms]
        found = [cache.get((symbol, day)) for day in days]
        missing = [day for day, rows in zip(days, found, strict=True) if rows is None]
        fresh: dict[int, np.ndarray] = {}
        # In chunks, so a long range never holds more than a few MB of minutes at once.
        for lo in range(0, len(missing), _GENERATE_CHUNK_DAYS):
            chunk = missing[lo:lo + _GENERATE_CHUNK_DAYS]
            minutes = self._generate_minutes(symbol, chunk)
            hours = _fold(minutes, 60)
            generated = {MINUTE_MS: minutes, HOUR_MS: hours, DAY_MS: _fold(hours, 24)}
            for k, day in enumerate(chunk):
                for level, rows in generated.items():
                    if level != MINUTE_MS or level_ms == MINUTE_MS:
                        self._cache[level].put((symbol, day), rows[k].copy())
                fresh[day] = generated[level_ms][k]
        return [rows if rows is not None else fresh[day] for day, rows in zip(days, found, strict=True)]

    # --- candles of any interval ----------------------------------------------------------------

    def _base(
        self, symbol: str, first_day: int, last_day: int, level_ms: int, now_ms: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candles of level_ms (1m, 1h or 1d) over whole days, the day holding now_ms cut at now_ms."""
        today = now_ms // DAY_MS
        past = list(range(first_day, min(last_day, today - 1) + 1))
        per_day = _LEVEL_ROWS[level_ms]
        times = [day * DAY_MS + np.arange(per_day, dtype=np.int64) * level_ms for day in past]
        parts = self._days(symbol, past, level_ms) if past else []
        if first_day <= today <= last_day:
            # Today: only the minutes opened by now exist, and the newest candle is still open.
            minutes = self._days(symbol, [today], MINUTE_MS)[0]
            minute_times = today * DAY_MS + np.arange(MINUTES_PER_DAY, dtype=np.int64) * MINUTE_MS
            keep = minute_times <= now_ms
            t, rows = aggregate(minute_times[keep], minutes[keep], level_ms)
            times.append(t)
            parts.append(rows)
        if not parts:
            return np.empty(0, dtype=np.int64), np.empty((0, N_COLUMNS))
        return np.concatenate(times), np.concatenate(parts)

    def candles(self, symbol: str, interval_ms: int, open_times: np.ndarray, now_ms: int) -> np.ndarray:
        """Rows for the given open times (ascending, aligned, each within history and opened by now_ms)."""
        if len(open_times) == 0:
            return np.empty((0, N_COLUMNS))
        if interval_ms < HOUR_MS:
            level_ms = MINUTE_MS
        elif interval_ms < DAY_MS:
            level_ms = HOUR_MS
        else:
            level_ms = DAY_MS
        first_day = max(int(open_times[0]) // DAY_MS, self.history_start_ms // DAY_MS)
        last_day = min((int(open_times[-1]) + interval_ms - 1) // DAY_MS, now_ms // DAY_MS)
        times, rows = self._base(symbol, first_day, last_day, level_ms, now_ms)
        if interval_ms != level_ms:
            times, rows = aggregate(times, rows, interval_ms)
        return rows[np.searchsorted(times, open_times)]

    def first_open_time(self, interval_ms: int) -> int:
        """The open time of the oldest candle of this length: the first one that starts within history."""
        offset = interval_offset(interval_ms)
        return -((offset - self.history_start_ms) // interval_ms) * interval_ms + offset
