"""The runbook's data-quality checks (its staleness detector): staleness, coverage, continuity.

- Staleness: the newest CLOSED candle of a (symbol, timeframe) (open time + interval <= now) must be
  younger than the timeframe's limit (H4 < 24 h, H1 < 6 h), its age measured from the candle's close.
  A symbol with no closed candle at all is stale ("no data").
- Coverage: the share of symbols fresh on every checked timeframe must be >= ``coverage_min`` (95 %).
- Continuity: within the last ``continuity_window_hours``, no run of missing candles between two
  stored candles may be longer than ``max_gap_candles`` (2). A run that straddles the window's start
  counts only with its part inside the window. The missing candles after the newest stored one are
  not a gap: they are what staleness measures (between two daily updates they are normal).

The report's ``ok`` needs all three checks: one stale series fails the staleness check even while
coverage is still met, because the runbook lists staleness as a check of its own; coverage is
reported beside it so that a recovery can tell "a few symbols lag" from "the feed is down".

Windows are half-open ``[start_ms, end_ms)`` over candle open times, in UTC epoch milliseconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import Connection, String, column, func, select, values
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent.errors import InputError, StoreError
from crypto_agent.schema import OHLCV_TABLES
from crypto_agent.settings import Settings
from crypto_agent.store import Store
from crypto_agent.universe import timeframe as parse_timeframe
from crypto_agent.universe import validate_symbol

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
CHECK_NAMES = ("staleness", "coverage", "continuity")
# How many offenders an overall reason names before it says "and N more".
_REASON_EXAMPLES = 5

# (symbol, timeframe, start_ms, end_ms): candles to backfill, open times in [start_ms, end_ms).
Window = tuple[str, str, int, int]


def timeframe_label(timeframe: str) -> str:
    """The runbook's name of a timeframe: '1h' -> 'H1', '4h' -> 'H4'."""
    return "H" + timeframe[:-1] if timeframe.endswith("h") else timeframe.upper()


def format_utc(ms: int) -> str:
    """An epoch-millisecond instant as 'YYYY-MM-DD HH:MM' in UTC."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def _gap_reason(label: str, start_ms: int, end_ms: int, candles: int) -> str:
    start, end = format_utc(start_ms), format_utc(end_ms)
    if start[:10] == end[:10]:
        end = end[11:]
    return f"{label} gap of {candles} candles from {start} to {end} UTC"


@dataclass(frozen=True)
class SeriesQuality:
    """Quality of one (symbol, timeframe): freshness of its newest closed candle and its gaps."""

    symbol: str
    timeframe: str
    interval_ms: int
    newest_open_ms: int | None
    age_hours: float | None
    limit_hours: float
    fresh: bool
    gaps: list[tuple[int, int]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Fresh and without a gap longer than the limit."""
        return self.fresh and not self.gaps

    @property
    def missing_candles(self) -> int:
        """Candles missing in the reported gaps."""
        return sum((end - start) // self.interval_ms for start, end in self.gaps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "symbol": self.symbol,
            "timeframe": self.timeframe,
            "ok": self.ok,
            "fresh": self.fresh,
            "newest_open_ms": self.newest_open_ms,
            "newest_open": _iso(self.newest_open_ms),
            "age_hours": None if self.age_hours is None else round(self.age_hours, 3),
            "limit_hours": self.limit_hours,
            "gaps": [
                {"start_ms": s, "end_ms": e, "start": _iso(s), "end": _iso(e),
                 "candles": (e - s) // self.interval_ms}
                for s, e in self.gaps
            ],
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class DataQualityReport:
    """Outcome of check_data: per-series rows, the three checks, and why any of them failed."""

    checked_at_ms: int
    symbols: list[str]
    timeframes: list[str]
    series: list[SeriesQuality]
    fresh_symbols: int
    coverage: float
    coverage_min: float
    stale_limits_hours: dict[str, float]
    max_gap_candles: int
    continuity_window_hours: float
    history_days: int
    checks: dict[str, bool]
    reasons: list[str]

    @property
    def ok(self) -> bool:
        """Every check passed: staleness, coverage and continuity."""
        return all(self.checks.values())

    def __bool__(self) -> bool:
        return self.ok

    def series_of(self, symbol: str) -> list[SeriesQuality]:
        """The rows of one symbol, in timeframe order."""
        return [s for s in self.series if s.symbol == symbol]

    def symbol_ok(self) -> dict[str, bool]:
        """Per symbol: fresh and gap-free on every checked timeframe."""
        out = dict.fromkeys(self.symbols, True)
        for row in self.series:
            out[row.symbol] = out[row.symbol] and row.ok
        return out

    @property
    def failing_symbols(self) -> list[str]:
        """Symbols with a stale series or a gap, in universe order."""
        return [s for s, ok in self.symbol_ok().items() if not ok]

    @property
    def stale_series(self) -> list[SeriesQuality]:
        """Rows whose newest closed candle is too old, or that have none."""
        return [s for s in self.series if not s.fresh]

    @property
    def gap_series(self) -> list[SeriesQuality]:
        """Rows with a gap longer than the limit."""
        return [s for s in self.series if s.gaps]

    def failing_windows(self) -> list[Window]:
        """(symbol, timeframe, start_ms, end_ms) to backfill: stale tails up to now, and the gaps.

        A stale series yields [first candle after its newest closed one, checked_at); one with no
        data yields the last ``initial_history_days``; overlapping windows are merged.
        """
        out: list[Window] = []
        for row in self.series:
            spans: list[tuple[int, int]] = list(row.gaps)
            if not row.fresh:
                if row.newest_open_ms is None:
                    start = (self.checked_at_ms - self.history_days * DAY_MS) // row.interval_ms * row.interval_ms
                else:
                    start = row.newest_open_ms + row.interval_ms
                if start < self.checked_at_ms:
                    spans.append((start, self.checked_at_ms))
            for start, end in _merge(spans):
                out.append((row.symbol, row.timeframe, start, end))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with ISO times beside the epoch milliseconds."""
        return {
            "ok": self.ok,
            "checks": dict(self.checks),
            "reasons": list(self.reasons),
            "checked_at_ms": self.checked_at_ms,
            "checked_at": _iso(self.checked_at_ms),
            "timeframes": list(self.timeframes),
            "limits": {
                "stale_hours": dict(self.stale_limits_hours),
                "coverage_min": self.coverage_min,
                "max_gap_candles": self.max_gap_candles,
                "continuity_window_hours": self.continuity_window_hours,
            },
            "coverage": {
                "fresh_symbols": self.fresh_symbols,
                "total_symbols": len(self.symbols),
                "share": round(self.coverage, 6),
                "minimum": self.coverage_min,
            },
            "failing_symbols": self.failing_symbols,
            "failing_windows": [
                {"symbol": s, "timeframe": tf, "start_ms": a, "end_ms": b, "start": _iso(a), "end": _iso(b)}
                for s, tf, a, b in self.failing_windows()
            ],
            "series": [s.to_dict() for s in self.series],
        }


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _normalise_timeframes(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        tf = parse_timeframe(name).interval
        if tf not in out:
            out.append(tf)
    if not out:
        raise InputError("no timeframes given", hint="pass e.g. --timeframes=1h,4h")
    return out


def _normalise_symbols(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        s = validate_symbol(name)
        if s not in out:
            out.append(s)
    if not out:
        raise InputError("no symbols given", hint="pass e.g. --symbols=BTCUSDT,ETHUSDT")
    return out


def _newest_and_anchor(
    conn: Connection, timeframe: str, symbols: list[str], closed_cut_ms: int, window_start_ms: int
) -> dict[str, tuple[int | None, int | None]]:
    """Per symbol: newest closed open time (<= closed_cut_ms) and newest open time before the window.

    Two index seeks per symbol in one statement, instead of a MAX ... GROUP BY over the whole table.
    """
    table = OHLCV_TABLES[timeframe]
    wanted = values(column("symbol", String), name="wanted").data([(s,) for s in symbols]).cte("wanted")
    newest = (
        select(func.max(table.c.timestamp))
        .where(table.c.symbol == wanted.c.symbol, table.c.timestamp <= closed_cut_ms)
        .scalar_subquery()
    )
    anchor = (
        select(func.max(table.c.timestamp))
        .where(table.c.symbol == wanted.c.symbol, table.c.timestamp < window_start_ms)
        .scalar_subquery()
    )
    rows = conn.execute(select(wanted.c.symbol, newest, anchor)).all()
    return {s: (n, a) for s, n, a in rows}


def _window_open_times(
    conn: Connection, timeframe: str, symbols: list[str], start_ms: int, end_ms: int
) -> list[tuple[str, int]]:
    """(symbol, open time) of the stored candles of the symbols with open time in [start_ms, end_ms)."""
    table = OHLCV_TABLES[timeframe]
    q = select(table.c.symbol, table.c.timestamp).where(
        table.c.symbol.in_(symbols), table.c.timestamp >= start_ms, table.c.timestamp < end_ms
    )
    return [(s, t) for s, t in conn.execute(q)]


def _find_gaps(
    symbols: list[str],
    rows: list[tuple[str, int]],
    anchors: dict[str, int | None],
    interval_ms: int,
    window_start_ms: int,
    max_gap_candles: int,
) -> dict[str, list[tuple[int, int]]]:
    """Per symbol, the runs of missing candles longer than the limit, clipped to the window."""
    code = {s: i for i, s in enumerate(symbols)}
    anchor_items = [(code[s], a) for s, a in anchors.items() if a is not None]
    n = len(rows) + len(anchor_items)
    sym = np.fromiter((code[s] for s, _ in rows), dtype=np.int64, count=len(rows))
    ts = np.fromiter((t for _, t in rows), dtype=np.int64, count=len(rows))
    if anchor_items:
        sym = np.concatenate([sym, np.array([c for c, _ in anchor_items], dtype=np.int64)])
        ts = np.concatenate([ts, np.array([a for _, a in anchor_items], dtype=np.int64)])
    out: dict[str, list[tuple[int, int]]] = {s: [] for s in symbols}
    if n < 2:
        return out
    order = np.lexsort((ts, sym))
    sym, ts = sym[order], ts[order]
    same = sym[1:] == sym[:-1]
    # The first missing candle after each stored one, not earlier than the window's first candle.
    starts = np.maximum(ts[:-1] + interval_ms, window_start_ms)
    ends = ts[1:]
    missing = (ends - starts) // interval_ms
    hit = np.flatnonzero(same & (missing > max_gap_candles))
    for i in hit:
        out[symbols[int(sym[i])]].append((int(starts[i]), int(ends[i])))
    return out


def _check_timeframe(
    conn: Connection, timeframe: str, symbols: list[str], now: int, settings: Settings
) -> dict[str, SeriesQuality]:
    """Freshness and gaps of every symbol on one timeframe, from two small queries."""
    interval = parse_timeframe(timeframe).ms
    limit = settings.stale_limit_hours(timeframe)
    label = timeframe_label(timeframe)
    closed_cut = now - interval  # open time of the newest candle that can be closed at `now`
    window_ms = int(settings.continuity_window_hours * HOUR_MS)
    window_start = -(-(now - window_ms) // interval) * interval  # first candle inside the window
    newest_anchor = _newest_and_anchor(conn, timeframe, symbols, closed_cut, window_start)
    rows = _window_open_times(conn, timeframe, symbols, window_start, now)
    anchors = {s: anchor for s, (_, anchor) in newest_anchor.items()}
    gaps = _find_gaps(symbols, rows, anchors, interval, window_start, settings.max_gap_candles)

    out: dict[str, SeriesQuality] = {}
    for s in symbols:
        newest = newest_anchor[s][0]
        reasons: list[str] = []
        age: float | None = None
        if newest is None:
            fresh = False
            reasons.append(f"{label} no data")
        else:
            age = (now - (newest + interval)) / HOUR_MS  # measured from the candle's close
            fresh = age < limit
            if not fresh:
                reasons.append(f"{label} newest candle {age:.1f} h old (limit {limit:g} h)")
        reasons.extend(_gap_reason(label, a, b, (b - a) // interval) for a, b in gaps[s])
        out[s] = SeriesQuality(
            symbol=s, timeframe=timeframe, interval_ms=interval, newest_open_ms=newest,
            age_hours=age, limit_hours=limit, fresh=fresh, gaps=gaps[s], reasons=reasons,
        )
    return out


def _named(rows: list[SeriesQuality], describe: Callable[[SeriesQuality], str]) -> str:
    """The first few offenders, then how many more."""
    text = ", ".join(describe(r) for r in rows[:_REASON_EXAMPLES])
    return text + (f" and {len(rows) - _REASON_EXAMPLES} more" if len(rows) > _REASON_EXAMPLES else "")


def check_data(
    store: Store,
    settings: Settings,
    *,
    now_ms: int | None = None,
    symbols: Iterable[str] | None = None,
    timeframes: Iterable[str] | None = None,
) -> DataQualityReport:
    """Check staleness, coverage and continuity of the stored candles; the report says why any fails."""
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    syms = _normalise_symbols(settings.symbols if symbols is None else symbols)
    tfs = _normalise_timeframes(settings.timeframes if timeframes is None else timeframes)
    try:
        with store.engine.connect() as conn:
            per_tf = {tf: _check_timeframe(conn, tf, syms, now, settings) for tf in tfs}
    except SQLAlchemyError as exc:
        raise StoreError(
            f"reading the store {store.url} failed: {getattr(exc, 'orig', exc)}",
            hint="`crypto-agent check-integrity` tells whether the database is corrupt",
        ) from None

    series = [per_tf[tf][s] for s in syms for tf in tfs]
    fresh_symbols = sum(all(per_tf[tf][s].fresh for tf in tfs) for s in syms)
    coverage = fresh_symbols / len(syms)
    # Compare counts, not floats: 57 of 60 must meet 0.95 whatever the rounding of either side.
    needed = math.ceil(settings.coverage_min * len(syms) - 1e-9)
    stale = [r for r in series if not r.fresh]
    gappy = [r for r in series if r.gaps]
    checks = {"staleness": not stale, "coverage": fresh_symbols >= needed, "continuity": not gappy}

    reasons: list[str] = []
    if stale:
        named = _named(stale, lambda r: f"{r.symbol} {timeframe_label(r.timeframe)} "
                       + ("no data" if r.age_hours is None else f"{r.age_hours:.1f} h"))
        limits = ", ".join(f"{timeframe_label(tf)} {settings.stale_limit_hours(tf):g} h" for tf in tfs)
        reasons.append(f"staleness: {len(stale)} of {len(series)} series stale ({named}; limits {limits})")
    if not checks["coverage"]:
        reasons.append(
            f"coverage: {fresh_symbols} of {len(syms)} symbols fresh ({coverage:.1%}, "
            f"minimum {settings.coverage_min:.0%}: {needed} needed)"
        )
    if gappy:
        named = _named(gappy, lambda r: f"{r.symbol} {timeframe_label(r.timeframe)}")
        reasons.append(
            f"continuity: {sum(len(r.gaps) for r in gappy)} gap(s) longer than {settings.max_gap_candles} "
            f"candles in the last {settings.continuity_window_hours:g} h ({named})"
        )

    return DataQualityReport(
        checked_at_ms=now,
        symbols=syms,
        timeframes=tfs,
        series=series,
        fresh_symbols=fresh_symbols,
        coverage=coverage,
        coverage_min=settings.coverage_min,
        stale_limits_hours={tf: settings.stale_limit_hours(tf) for tf in tfs},
        max_gap_candles=settings.max_gap_candles,
        continuity_window_hours=settings.continuity_window_hours,
        history_days=settings.initial_history_days,
        checks=checks,
        reasons=reasons,
    )
