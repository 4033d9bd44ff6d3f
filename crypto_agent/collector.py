"""The collector: brings stored candles up to date from the exchange, and fills holes.

``collect(mode="update")`` fetches each symbol and timeframe from its newest stored closed candle
up to now; ``collect(mode="update-all")`` fills every missing candle of the lookback window, not
only the tail; ``backfill`` fetches exactly the windows it is given (the stale-data recovery uses
it). Every fetched page is written with one upsert, so a rerun, or two runs at once, write each
candle once and never leave a page half-written.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from crypto_agent.errors import CryptoAgentError, InputError, StoreLocked
from crypto_agent.exchange import (
    BinanceClient,
    ExchangeError,
    InvalidSymbol,
    MalformedResponse,
)
from crypto_agent.store import Store, store_locked
from crypto_agent.storelock import locked_error
from crypto_agent.universe import timeframe, validate_symbol

MODES = ("update", "update-all")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

# (symbol, timeframe, start_ms, end_ms): fetch closed candles with open time in [start_ms, end_ms).
Window = tuple[str, str, int, int]
Progress = Callable[[int, int, str], None]

# A failure of one symbol that the run goes on after (a 4xx ExchangeError; a 5xx is fatal).
SYMBOL_FAILURES = (InvalidSymbol, ExchangeError, MalformedResponse)


def is_fatal(error: BaseException) -> bool:
    """Whether an error stops the whole run rather than only its symbol.

    A ban, a long rate limit, an exchange that does not answer or keeps failing (5xx after retries),
    a store that cannot be written or is locked: every other symbol would fail the same way, and
    going on would lengthen a ban or make the run last for minutes.
    """
    if isinstance(error, ExchangeError) and error.status >= 500:
        return True
    return not isinstance(error, SYMBOL_FAILURES)


@dataclass
class CollectSummary:
    """What a run wrote per (symbol, timeframe), and which symbols failed and why."""

    mode: str
    written: dict[tuple[str, str], int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)
    aborted: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """True when every symbol was collected and the run was not stopped."""
        return not self.failures and self.aborted is None

    @property
    def total(self) -> int:
        """Candles written in the whole run."""
        return sum(self.written.values())

    def add(self, symbol: str, tf: str, count: int) -> None:
        """Count candles written for a symbol and timeframe (thread-safe)."""
        with self._lock:
            self.written[(symbol, tf)] = self.written.get((symbol, tf), 0) + count

    def fail(self, symbol: str, error: BaseException) -> None:
        """Record a symbol's failure (the first one per symbol) and what to do about it."""
        with self._lock:
            if symbol not in self.failures:
                self.failures[symbol] = getattr(error, "message", None) or str(error)
                hint = getattr(error, "hint", None)
                if hint:
                    self.hints[symbol] = hint

    def to_rows(self) -> list[tuple[str, str, int]]:
        """(symbol, timeframe, candles written), sorted by symbol then timeframe."""
        with self._lock:
            return sorted((s, tf, n) for (s, tf), n in self.written.items())

    def by_symbol(self) -> dict[str, dict[str, int]]:
        """Candles written per symbol, then per timeframe."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for s, tf, n in self.to_rows():
            out[s][tf] = n
        return dict(out)


# --- planning: which windows to fetch ---


def closed_end_ms(now_ms: int, tf_ms: int) -> int:
    """Open time of the candle still open at now_ms: every candle before it is closed."""
    return now_ms // tf_ms * tf_ms


def missing_ranges(expected_start: int, end: int, step: int, stored: Iterable[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of the grid expected_start, +step, ... < end that are not stored."""
    have = set(stored)
    ranges: list[tuple[int, int]] = []
    run_start: int | None = None
    for t in range(expected_start, end, step):
        if t in have:
            if run_start is not None:
                ranges.append((run_start, t))
                run_start = None
        elif run_start is None:
            run_start = t
    if run_start is not None:
        ranges.append((run_start, end))
    return ranges


def plan_windows(
    store: Store,
    symbols: Sequence[str],
    timeframes: Sequence[str],
    *,
    mode: str,
    lookback_hours: float,
    initial_history_days: int,
    now_ms: int,
) -> list[Window]:
    """The windows a collect run must fetch, from what the store already holds."""
    windows: list[Window] = []
    for tf_name in timeframes:
        tf = timeframe(tf_name)
        end = closed_end_ms(now_ms, tf.ms)
        initial_start = closed_end_ms(end - initial_history_days * DAY_MS, tf.ms)
        newest = store.newest_by_symbol(tf.interval)
        if mode == "update":
            for s in symbols:
                start = newest[s] + tf.ms if s in newest else initial_start
                if start < end:
                    windows.append((s, tf.interval, start, end))
            continue
        # update-all: every hole among the closed candles of the last lookback_hours
        lookback_start = closed_end_ms(end - int(lookback_hours * HOUR_MS), tf.ms)
        stored = store.open_times_all(tf.interval, start_ms=min(lookback_start, initial_start))
        stored_by_symbol = {s: g["timestamp"].tolist() for s, g in stored.groupby("symbol")} if len(stored) else {}
        for s in symbols:
            start = lookback_start if s in newest else min(lookback_start, initial_start)
            for a, b in missing_ranges(start, end, tf.ms, stored_by_symbol.get(s, ())):
                windows.append((s, tf.interval, a, b))
    return windows


def _check_args(mode: str, lookback_hours: float, initial_history_days: int, workers: int) -> None:
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}", hint=f"use one of: {', '.join(MODES)}")
    if not lookback_hours > 0:
        raise InputError(f"lookback must be positive, got {lookback_hours} hours", hint="pass e.g. --lookback-hours=72")
    if initial_history_days < 1:
        raise InputError(
            f"initial history must be at least one day, got {initial_history_days}",
            hint="set initial_history_days in the config file to 1 or more",
        )
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}", hint="pass e.g. --workers=4")


def _locked_error(store: Store) -> StoreLocked:
    return locked_error(store.path, "the collector wrote nothing more", "collect again")


# --- running ---


def collect(
    store: Store,
    client: BinanceClient,
    symbols: Sequence[str],
    timeframes: Sequence[str],
    *,
    mode: str = "update",
    lookback_hours: float = 72,
    initial_history_days: int = 30,
    now_ms: int | None = None,
    workers: int = 4,
    progress: Progress | None = None,
    lock_held: bool = False,
) -> CollectSummary:
    """Bring symbols and timeframes up to date (update) or fill every hole of the lookback (update-all).

    A symbol that fails (unknown to the exchange, a rejected request) is recorded and the others go on;
    a ban, a long rate limit, an unreachable exchange or an unwritable store stop the run at once and
    are raised, with the summary so far on the error's ``summary`` attribute. While the store's
    LOCKED file exists nothing is written (StoreLocked), unless the caller is the recovery that
    holds the lock (``lock_held=True``).
    """
    _check_args(mode, lookback_hours, initial_history_days, workers)
    symbols = [validate_symbol(s) for s in symbols]
    tfs = [timeframe(t).interval for t in timeframes]
    if not symbols or not tfs:
        raise InputError("nothing to collect: no symbols or no timeframes", hint="pass --symbols and --timeframes")
    if not lock_held and store_locked(store):
        raise _locked_error(store)
    if now_ms is None:
        now_ms = client.server_time()
    windows = plan_windows(
        store, symbols, tfs, mode=mode, lookback_hours=lookback_hours,
        initial_history_days=initial_history_days, now_ms=now_ms,
    )
    summary = CollectSummary(mode=mode, written={(s, tf): 0 for s in symbols for tf in tfs})
    return _run(store, client, windows, summary, now_ms=now_ms, workers=workers, progress=progress,
                lock_held=lock_held)


def backfill(
    store: Store,
    client: BinanceClient,
    windows: Sequence[Window],
    *,
    now_ms: int | None = None,
    workers: int = 4,
    progress: Progress | None = None,
    lock_held: bool = False,
) -> CollectSummary:
    """Fetch and store the closed candles of exactly these (symbol, timeframe, start_ms, end_ms) windows.

    Failures are handled as in ``collect``; ``lock_held=True`` lets the recovery that holds the lock write.
    """
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}", hint="pass e.g. workers=4")
    checked: list[Window] = []
    for symbol, tf, start, end in windows:
        if start > end:
            raise InputError(f"window of {symbol} {tf} starts after it ends: {start} > {end}",
                             hint="pass (symbol, timeframe, start_ms, end_ms) with start_ms <= end_ms")
        checked.append((validate_symbol(symbol), timeframe(tf).interval, int(start), int(end)))
    if not lock_held and store_locked(store):
        raise _locked_error(store)
    if now_ms is None:
        now_ms = client.server_time()
    summary = CollectSummary(mode="backfill", written={(s, tf): 0 for s, tf, _, _ in checked})
    return _run(store, client, checked, summary, now_ms=now_ms, workers=workers, progress=progress,
                lock_held=lock_held)


def _run(
    store: Store,
    client: BinanceClient,
    windows: Sequence[Window],
    summary: CollectSummary,
    *,
    now_ms: int,
    workers: int,
    progress: Progress | None,
    lock_held: bool,
) -> CollectSummary:
    """Fetch the windows, one task per (symbol, timeframe), on a few threads sharing the client."""
    tasks: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for symbol, tf, start, end in windows:
        if start < end:
            tasks[(symbol, tf)].append((start, end))
    stop = threading.Event()
    failed_symbols: set[str] = set()
    failed_lock = threading.Lock()

    def fetch(symbol: str, tf: str, ranges: list[tuple[int, int]]) -> None:
        try:
            for start, end in ranges:
                pages = client.iter_closed_klines(symbol, tf, start, end, now_ms=now_ms)
                # stop is checked before every request: the generator sends one per page
                while not stop.is_set():
                    page = next(pages, None)
                    if page is None:
                        break
                    with failed_lock:
                        if symbol in failed_symbols:
                            return
                    if not lock_held and store_locked(store):
                        raise _locked_error(store)
                    summary.add(symbol, tf, store.upsert_candles(symbol, tf, page))
        except BaseException as exc:
            if is_fatal(exc):
                stop.set()  # at once, so the other workers send nothing more
            raise

    total = len(tasks)
    done = 0
    if progress is not None:
        progress(0, total, "")
    fatal: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="collect")
    try:
        futures: dict[Future, tuple[str, str]] = {
            pool.submit(fetch, symbol, tf, ranges): (symbol, tf) for (symbol, tf), ranges in tasks.items()
        }
        pending = set(futures)
        while pending and fatal is None:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                symbol, tf = futures[fut]
                exc = fut.exception()
                if exc is not None and not is_fatal(exc):
                    summary.fail(symbol, exc)
                    with failed_lock:
                        failed_symbols.add(symbol)
                elif exc is not None:
                    if isinstance(exc, CryptoAgentError):
                        summary.fail(symbol, exc)
                    fatal = fatal or exc
                done += 1
                if progress is not None:
                    progress(done, total, f"{symbol} {tf}")
    finally:
        if fatal is not None or pending:
            stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    if fatal is not None:
        summary.aborted = getattr(fatal, "message", None) or str(fatal)
        fatal.summary = summary  # type: ignore[attr-defined]
        raise fatal
    return summary
