"""Simulated sentiment and macro data: the Crypto Fear & Greed Index and a handful of FRED series.

Both are deterministic per (seed, day). The Fear & Greed value follows bitcoin's simulated two-week
return plus a slow random mood, so sentiment and prices agree. FRED series are mean-reverting walks
around realistic levels, with FRED's calendars: business-day series have no weekends and "." on US
federal holidays, monthly series are dated on the first of the month and published with a lag.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from crypto_agent.simulator.market import DAY_MS, EPOCH_DAY, Market, _ar1, keyed_rng

UNIX_EPOCH = dt.date(1970, 1, 1)

# --- Crypto Fear & Greed Index (alternative.me) ---------------------------------------------------

FNG_FIRST_DAY = (dt.date(2018, 2, 1) - UNIX_EPOCH).days


def fng_classification(value: int) -> str:
    """alternative.me's name for an index value."""
    if value <= 24:
        return "Extreme Fear"
    if value <= 46:
        return "Fear"
    if value <= 54:
        return "Neutral"
    if value <= 75:
        return "Greed"
    return "Extreme Greed"


class FearGreed:
    """The daily Fear & Greed value from 2018-02-01 on, driven by the simulated bitcoin price."""

    def __init__(self, market: Market, symbol: str = "BTCUSDT") -> None:
        self.market = market
        self.symbol = symbol
        self._mood: np.ndarray | None = None
        self._lock = threading.Lock()

    def _mood_series(self, last_day: int) -> np.ndarray:
        with self._lock:
            n = last_day - FNG_FIRST_DAY + 1
            if self._mood is None or len(self._mood) < n:
                blocks = n // 1024 + 1
                noise = np.concatenate(
                    [keyed_rng(self.market.seed, "fng", b).standard_normal(1024) for b in range(blocks)]
                )
                self._mood = _ar1(0.0, 0.93, 4.4 * noise)[1:]
            return self._mood

    def values(self, first_day: int, last_day: int) -> list[tuple[int, int]]:
        """(day, value 0-100) for each day from first_day to last_day, oldest first."""
        first_day = max(first_day, FNG_FIRST_DAY)
        if last_day < first_day:
            return []
        log_open, _ = self.market.daily_series(self.symbol, last_day)
        mood = self._mood_series(last_day)
        days = np.arange(first_day, last_day + 1)
        # The index is published at 00:00 UTC from the previous two weeks of prices.
        trend = log_open[days - EPOCH_DAY] - log_open[days - 14 - EPOCH_DAY]
        raw = 50 + 200 * trend + mood[days - FNG_FIRST_DAY]
        values = np.clip(np.round(raw), 1, 99).astype(int)
        return list(zip(days.tolist(), values.tolist(), strict=True))


# --- FRED (Federal Reserve Economic Data) ----------------------------------------------------------

FRED_ERRORS = {
    "no_key": "Bad Request.  Variable api_key has not been set.",
    "bad_key": (
        "Bad Request.  The value for variable api_key is not registered.  "
        "Read https://fred.stlouisfed.org/docs/api/api_key.html for more information."
    ),
    "no_series_id": "Bad Request.  Variable series_id is not set.",
    "no_series": "Bad Request.  The series does not exist.",
}


@dataclass(frozen=True)
class FredSeries:
    """How a simulated FRED series moves: its calendar, level, noise and rounding."""

    series_id: str
    title: str
    frequency: str  # "daily" (every day), "business" (Mon-Fri, "." on holidays) or "monthly"
    start: dt.date
    level: float  # long-run level (a log level when log=True)
    start_value: float
    noise: float  # standard deviation of one step
    reversion: float  # pull towards the level per step
    decimals: int
    log: bool = False  # a walk of the log, for series that grow
    growth: float = 0.0  # drift per step of the log level
    floor: float = 0.0
    release_day: int = 0  # monthly series: the day of the month the previous month is published


FRED_SERIES: dict[str, FredSeries] = {
    s.series_id: s
    for s in (
        FredSeries("DGS10", "Market Yield on U.S. Treasury Securities at 10-Year Constant Maturity",
                   "business", dt.date(2000, 1, 3), 3.6, 6.58, 0.055, 0.0015, 2, floor=0.5),
        FredSeries("DGS2", "Market Yield on U.S. Treasury Securities at 2-Year Constant Maturity",
                   "business", dt.date(2000, 1, 3), 2.8, 6.30, 0.05, 0.0015, 2, floor=0.1),
        FredSeries("DFF", "Federal Funds Effective Rate", "daily", dt.date(2000, 1, 1),
                   2.5, 5.43, 0.12, 0.04, 2, floor=0.05),
        FredSeries("CPIAUCSL", "Consumer Price Index for All Urban Consumers: All Items in U.S. City Average",
                   "monthly", dt.date(2000, 1, 1), 0.0, 169.3, 0.0015, 0.0, 3, log=True, growth=0.0021,
                   release_day=13),
        FredSeries("M2SL", "M2", "monthly", dt.date(2000, 1, 1), 0.0, 4667.6, 0.003, 0.0, 1, log=True,
                   growth=0.0049, release_day=25),
        FredSeries("DTWEXBGS", "Nominal Broad U.S. Dollar Index", "business", dt.date(2006, 1, 2),
                   math.log(115.0), 101.4, 0.0035, 0.002, 4, log=True),
        FredSeries("VIXCLS", "CBOE Volatility Index: VIX", "business", dt.date(2000, 1, 3),
                   math.log(18.0), 24.21, 0.07, 0.04, 2, log=True, floor=9.0),
    )
}
# Derived series: (series, minus series).
FRED_SPREADS: dict[str, tuple[str, str, str]] = {
    "T10Y2Y": ("DGS10", "DGS2", "10-Year Treasury Constant Maturity Minus 2-Year Treasury Constant Maturity"),
}


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> dt.date:
    """The n-th (1-based; -1 = last) given weekday (Monday=0) of a month."""
    if n > 0:
        first = dt.date(year, month, 1)
        return first + dt.timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))
    last = dt.date(year + (month == 12), month % 12 + 1, 1) - dt.timedelta(days=1)
    return last - dt.timedelta(days=(last.weekday() - weekday) % 7)


def _observed(day: dt.date) -> dt.date:
    """A fixed-date holiday moved off the weekend, as federal holidays are observed."""
    if day.weekday() == 5:
        return day - dt.timedelta(days=1)
    if day.weekday() == 6:
        return day + dt.timedelta(days=1)
    return day


def us_federal_holidays(year: int) -> set[dt.date]:
    """The US federal holidays of a year, on the days they are observed."""
    days = {
        _observed(dt.date(year, 1, 1)),
        _nth_weekday(year, 1, 0, 3),  # Martin Luther King Jr. Day
        _nth_weekday(year, 2, 0, 3),  # Washington's Birthday
        _nth_weekday(year, 5, 0, -1),  # Memorial Day
        _observed(dt.date(year, 7, 4)),
        _nth_weekday(year, 9, 0, 1),  # Labor Day
        _nth_weekday(year, 10, 0, 2),  # Columbus Day
        _observed(dt.date(year, 11, 11)),
        _nth_weekday(year, 11, 3, 4),  # Thanksgiving
        _observed(dt.date(year, 12, 25)),
    }
    if year >= 2021:
        days.add(_observed(dt.date(year, 6, 19)))
    return days


def _month_starts(first: dt.date, last: dt.date) -> list[dt.date]:
    out = []
    y, m = first.year, first.month
    while dt.date(y, m, 1) <= last:
        out.append(dt.date(y, m, 1))
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


class Fred:
    """Observations of the simulated FRED series, up to what FRED would have published by today."""

    def __init__(self, seed: int, today: Callable[[], dt.date]) -> None:
        self.seed = seed
        self.today = today
        self._walks: dict[str, tuple[list[dt.date], np.ndarray]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def known(series_id: str) -> bool:
        """Whether the simulator serves this series."""
        return series_id in FRED_SERIES or series_id in FRED_SPREADS

    def _dates(self, spec: FredSeries, last: dt.date) -> list[dt.date]:
        if spec.frequency == "monthly":
            return _month_starts(spec.start, last)
        days = [spec.start + dt.timedelta(days=k) for k in range((last - spec.start).days + 1)]
        if spec.frequency == "business":
            days = [d for d in days if d.weekday() < 5]
        return days

    def _walk(self, spec: FredSeries, last: dt.date) -> tuple[list[dt.date], np.ndarray]:
        """Dates and values of a series from its start to `last` (holidays included, as values)."""
        with self._lock:
            cached = self._walks.get(spec.series_id)
            if cached is not None and cached[0] and cached[0][-1] >= last:
                return cached
            # Walk to the end of next year at once, so the cache lasts.
            horizon = dt.date(last.year + 1, 12, 31)
            dates = self._dates(spec, horizon)
            n = len(dates)
            blocks = n // 1024 + 1
            noise = np.concatenate(
                [keyed_rng(self.seed, "fred", spec.series_id, b).standard_normal(1024) for b in range(blocks)]
            )[:n]
            if spec.series_id == "DFF":
                values = self._policy_rate(spec, dates, noise)
            elif spec.log and spec.growth:
                values = np.exp(math.log(spec.start_value) + np.cumsum(spec.growth + spec.noise * noise) - spec.growth)
            else:
                start = math.log(spec.start_value) if spec.log else spec.start_value
                deviation = _ar1(start - spec.level, 1 - spec.reversion, spec.noise * noise)[:-1]
                values = spec.level + deviation
                if spec.log:
                    values = np.exp(values)
            values = np.maximum(values, spec.floor)
            self._walks[spec.series_id] = (dates, values)
            return dates, values

    @staticmethod
    def _policy_rate(spec: FredSeries, dates: list[dt.date], noise: np.ndarray) -> np.ndarray:
        """The effective fed funds rate: a target moved in 25 bp steps every six weeks, plus a little noise."""
        target = spec.start_value
        values = np.empty(len(dates))
        for k in range(len(dates)):
            if k % 42 == 0 and k:
                pull = (spec.level - target) * spec.reversion
                move = round((pull + spec.noise * noise[k]) / 0.25) * 0.25
                target = min(max(target + move, spec.floor), 8.0)
            values[k] = target + 0.01 * round(noise[(k * 7) % len(noise)])
        return values

    def last_published(self, spec: FredSeries) -> dt.date:
        """The newest observation date FRED would show today."""
        today = self.today()
        if spec.frequency == "monthly":
            month = dt.date(today.year, today.month, 1)
            lag = 1 if today.day >= spec.release_day else 2
            for _ in range(lag):
                month = (month - dt.timedelta(days=1)).replace(day=1)
            return month
        return today - dt.timedelta(days=1)

    def observations(self, series_id: str, start: dt.date | None, end: dt.date | None) -> list[tuple[dt.date, str]]:
        """(date, value as FRED writes it, "." when missing) from start to end, oldest first."""
        if series_id in FRED_SPREADS:
            a_id, b_id, _ = FRED_SPREADS[series_id]
            a = dict(self.observations(a_id, start, end))
            b = dict(self.observations(b_id, start, end))
            out = []
            for day, a_value in a.items():
                b_value = b.get(day, ".")
                missing = a_value == "." or b_value == "."
                out.append((day, "." if missing else f"{float(a_value) - float(b_value):.2f}"))
            return out
        spec = FRED_SERIES[series_id]
        last = self.last_published(spec)
        if end is not None:
            last = min(last, end)
        first = max(spec.start, start) if start is not None else spec.start
        if last < first:
            return []
        dates, values = self._walk(spec, last)
        holidays: dict[int, set[dt.date]] = {}
        out = []
        for day, value in zip(dates, values, strict=True):
            if day < first:
                continue
            if day > last:
                break
            if spec.frequency == "business":
                year_holidays = holidays.setdefault(day.year, us_federal_holidays(day.year))
                if day in year_holidays:
                    out.append((day, "."))
                    continue
            out.append((day, f"{value:.{spec.decimals}f}"))
        return out

    @staticmethod
    def title(series_id: str) -> str:
        """The series' title as FRED names it."""
        if series_id in FRED_SPREADS:
            return FRED_SPREADS[series_id][2]
        return FRED_SERIES[series_id].title


def day_of(ms: int) -> int:
    """The day number (days since 1970-01-01) of a time in ms."""
    return ms // DAY_MS


def date_of_day(day: int) -> dt.date:
    """The date of a day number."""
    return UNIX_EPOCH + dt.timedelta(days=day)
