"""The live-trading service, paper only: it never sends an order anywhere.

Each cycle it reads the newest closed candles of every configured symbol, evaluates the configured
strategy (`trader_strategy` on `trader_timeframe`) and records the signal in paper_signals, once per
closed candle; a signal that changes the position opens or closes a paper position (paper_positions)
at that candle's close. It is service "trader": run/trader.pid, run/trader.heartbeat, logs/trader.log,
at normal priority. Run it with `crypto-agent trader`, `crypto-agent service start trader` or
`python -m crypto_agent.trader`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent import backtest
from crypto_agent.errors import ConfigError, StoreError
from crypto_agent.schema import paper_positions, paper_signals
from crypto_agent.service import STATE_RUNNING, ServiceRuntime, run_as_program, store_fault_of
from crypto_agent.settings import Settings, get_settings
from crypto_agent.store import Store, store_locked
from crypto_agent.universe import TIMEFRAMES

SERVICE_NAME = "trader"

log = logging.getLogger("crypto_agent.trader")


@dataclass(frozen=True)
class Evaluation:
    """The paper trader's decision on one symbol's newest closed candle."""

    symbol: str
    candle_time: int
    close: float
    signal: int
    # open, close, hold (long, stays long), flat (flat, stays flat), seen (candle done before),
    # stale (newest closed candle older than the staleness limit: nothing decided, nothing written)
    action: str


@dataclass
class TraderCycle:
    """What one cycle did: the evaluations, and the symbols skipped for want of closed candles."""

    evaluations: list[Evaluation] = field(default_factory=list)
    no_data: list[str] = field(default_factory=list)
    locked: bool = False

    @property
    def stale(self) -> list[str]:
        """Symbols whose newest closed candle is too old to decide on."""
        return [e.symbol for e in self.evaluations if e.action == "stale"]

    @property
    def opened(self) -> int:
        """Paper positions opened this cycle."""
        return sum(e.action == "open" for e in self.evaluations)

    @property
    def closed(self) -> int:
        """Paper positions closed this cycle."""
        return sum(e.action == "close" for e in self.evaluations)


def check_trader_settings(settings: Settings) -> None:
    """ConfigError when the trader's strategy or timeframe is unknown."""
    if settings.trader_strategy not in backtest.STRATEGIES:
        raise ConfigError(
            f"trader_strategy {settings.trader_strategy!r} is not a known strategy",
            hint=f"set CRYPTO_AGENT_TRADER_STRATEGY to one of: {', '.join(backtest.STRATEGIES)}",
        )
    if settings.trader_timeframe not in TIMEFRAMES:
        raise ConfigError(
            f"trader_timeframe {settings.trader_timeframe!r} is not a known timeframe",
            hint=f"set CRYPTO_AGENT_TRADER_TIMEFRAME to one of: {', '.join(TIMEFRAMES)}",
        )


def evaluate_symbol(store: Store, settings: Settings, symbol: str, now_ms: int) -> Evaluation | None:
    """Evaluate the strategy on a symbol's newest closed candles and record it; None without closed candles.

    The signal row and the position change are written in one transaction; a candle already
    evaluated is not recorded twice (action "seen"). Data older than the staleness limit of the
    timeframe (runbook: H1 6 h, H4 24 h) decides nothing (action "stale").
    """
    tf = TIMEFRAMES[settings.trader_timeframe]
    strategy = settings.trader_strategy
    # one candle more than needed, in case the newest one is still forming
    start = now_ms - (settings.trader_candles + 1) * tf.ms
    candles = store.candles(symbol, tf.interval, start_ms=start)
    candles = candles[candles["close_time"].to_numpy() < now_ms].tail(settings.trader_candles)
    if candles.empty:
        return None
    signal = backtest.latest_signal(candles, strategy)
    candle_time = int(candles["timestamp"].iloc[-1])
    close = float(candles["close"].iloc[-1])
    if now_ms - (candle_time + tf.ms) > settings.stale_limit_hours(tf.interval) * 3_600_000:
        return Evaluation(symbol, candle_time, close, signal, "stale")
    key = (paper_signals.c.symbol == symbol) & (paper_signals.c.timeframe == tf.interval) & (
        paper_signals.c.strategy == strategy) & (paper_signals.c.candle_time == candle_time)
    pos = paper_positions.c
    open_key = (pos.symbol == symbol) & (pos.timeframe == tf.interval) & (pos.strategy == strategy) & (
        pos.status == "open")
    try:
        with store.engine.begin() as conn:
            if conn.execute(select(paper_signals.c.id).where(key)).first() is not None:
                return Evaluation(symbol, candle_time, close, signal, "seen")
            position = conn.execute(select(pos.id, pos.quantity, pos.entry_price).where(open_key)).first()
            wall_ms = int(time.time() * 1000)
            if signal == 1 and position is None:
                action = "open"
                conn.execute(insert(paper_positions).values(
                    symbol=symbol, timeframe=tf.interval, strategy=strategy, status="open",
                    quantity=settings.trader_notional_usdt / close, entry_time=candle_time,
                    entry_price=close, opened_at=wall_ms,
                ))
            elif signal == 0 and position is not None:
                action = "close"
                conn.execute(update(paper_positions).where(pos.id == position.id).values(
                    status="closed", exit_time=candle_time, exit_price=close,
                    pnl_usdt=position.quantity * (close - position.entry_price), closed_at=wall_ms,
                ))
            else:
                action = "hold" if signal == 1 else "flat"
            conn.execute(insert(paper_signals).values(
                symbol=symbol, timeframe=tf.interval, strategy=strategy, candle_time=candle_time,
                close=close, signal=signal, action=action, evaluated_at=wall_ms,
            ))
    except SQLAlchemyError as exc:
        raise StoreError(
            f"recording the paper signal of {symbol} failed: {getattr(exc, 'orig', exc)}",
            hint="nothing of this signal was written; check `crypto-agent check-integrity`",
        ) from None
    return Evaluation(symbol, candle_time, close, signal, action)


def run_cycle(
    store: Store, settings: Settings, now_ms: int | None = None, between: Callable[[], Any] | None = None
) -> TraderCycle:
    """One evaluation of every configured symbol; stops early (locked=True) when db/LOCKED appears."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cycle = TraderCycle()
    for symbol in settings.symbols:
        if store_locked(store):
            cycle.locked = True
            break
        evaluation = evaluate_symbol(store, settings, symbol, now_ms)
        if evaluation is None:
            cycle.no_data.append(symbol)
        else:
            cycle.evaluations.append(evaluation)
        if between is not None:
            between()
    return cycle


def open_positions(store: Store) -> list[dict[str, Any]]:
    """The open paper positions, oldest first."""
    q = select(paper_positions).where(paper_positions.c.status == "open").order_by(paper_positions.c.id)
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def run_trader(settings: Settings | None = None) -> int:
    """Run the paper trader until SIGTERM/SIGINT; the exit code (0 on a clean stop, 70 after a crash)."""
    settings = settings or get_settings()
    check_trader_settings(settings)
    rt = ServiceRuntime(SERVICE_NAME, settings, niceness=0)
    with rt:
        store = rt.open_store()
        log.info(
            "paper trading %s on %s candles of %d symbols, every %.0f s; no order is ever sent",
            settings.trader_strategy, settings.trader_timeframe, len(settings.symbols), settings.trader_cycle_s,
        )
        cycle_no = 0
        warned_empty = False
        while not rt.stopping:
            if not rt.hold_while_locked(store):
                break
            cycle_no += 1
            rt.beat(f"{STATE_RUNNING}: cycle {cycle_no}")
            try:
                cycle = run_cycle(store, settings, between=rt.beat)
            except (StoreError, SQLAlchemyError) as exc:
                error = store_fault_of(exc)
                if error is not None:  # reported through the heartbeat; the store is left alone until retried
                    if not rt.pause_on_store_corrupt(error):
                        break
                    continue
                if isinstance(exc, SQLAlchemyError):
                    raise
                log.error("cycle %d: %s", cycle_no, exc.message)
            else:
                if not cycle.evaluations and not cycle.locked:
                    if not warned_empty:
                        log.warning(
                            "no closed %s candles for any of the %d symbols: nothing to evaluate yet",
                            settings.trader_timeframe, len(settings.symbols),
                        )
                        warned_empty = True
                else:
                    warned_empty = False
                    if cycle.stale:
                        log.warning(
                            "cycle %d: stale data, no decision for %s (newest closed candle older than %g h)",
                            cycle_no, ",".join(cycle.stale), settings.stale_limit_hours(settings.trader_timeframe),
                        )
                    new = [e for e in cycle.evaluations if e.action not in ("seen", "stale")]
                    log.info(
                        "cycle %d: %d symbols evaluated (%d new candles), %d opened, %d closed, %d without data",
                        cycle_no, len(cycle.evaluations), len(new), cycle.opened, cycle.closed, len(cycle.no_data),
                    )
                rt.beat(f"{STATE_RUNNING}: cycle {cycle_no} done")
            rt.wait(settings.trader_cycle_s)
    return rt.exit_code


def main() -> None:
    """`python -m crypto_agent.trader`: run the paper trader with the settings from the environment."""
    run_as_program(lambda: run_trader())


if __name__ == "__main__":
    main()
