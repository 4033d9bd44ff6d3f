"""The 24/7 backtest daemon: cycles over the universe, timeframes and strategies, one unit at a time.

Run it with `crypto-agent daemon` (foreground) or `crypto-agent service start backtest` (detached),
or `python -m crypto_agent.daemon`. It is service "backtest": run/backtest.pid, run/backtest.heartbeat,
logs/backtest_24h7.log. One unit of work is one backtest of one (symbol, timeframe, strategy),
saved to backtest_results; the heartbeat is written between units. It lowers its own CPU priority
(`daemon_niceness`), pauses while `db/LOCKED` exists, pauses while live trading comes first (a
`run/backtest.yield` request, crypto_agent.priority: it finishes the unit in progress, then starts no
new one and writes nothing, heart-beating "paused: live trading first") and stops cleanly on SIGTERM.

Fault injection, for tests and chaos drills only (read by the daemon alone, never by the trader):

    CRYPTO_AGENT_DAEMON_FAULT=burn-cpu        spin the CPU in the main loop, heart-beating, until stopped
    CRYPTO_AGENT_DAEMON_FAULT=grow-memory[:M] grow resident memory by M MB per second (default 50),
                                              heart-beating, up to CRYPTO_AGENT_DAEMON_FAULT_MAX_MB
                                              (default 2048), then hold it until stopped
    CRYPTO_AGENT_DAEMON_FAULT=log-errors[:N]  log N ERROR lines per second (default 10) until stopped
    CRYPTO_AGENT_DAEMON_FAULT=crash-after:N   after N steps, die at once (os._exit(70)): pidfile left behind
    CRYPTO_AGENT_DAEMON_FAULT=hang-after:N    after N steps, hang in the main loop: no heartbeat, SIGTERM
                                              ignored (SIGUSR1 still dumps stacks; SIGKILL ends it)

A step is one unit of work, or one idle heartbeat while the store holds no candles.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from crypto_agent import backtest, priority
from crypto_agent.errors import ConfigError, CryptoAgentError, StoreLocked
from crypto_agent.service import (
    EXIT_CRASHED,
    STATE_RUNNING,
    ServiceRuntime,
    run_as_program,
    store_fault_of,
)
from crypto_agent.settings import Settings, get_settings
from crypto_agent.store import Store

SERVICE_NAME = "backtest"
FAULT_ENV = "CRYPTO_AGENT_DAEMON_FAULT"
FAULT_MAX_MB_ENV = "CRYPTO_AGENT_DAEMON_FAULT_MAX_MB"
FAULT_KINDS = ("burn-cpu", "grow-memory", "log-errors", "crash-after", "hang-after")

log = logging.getLogger("crypto_agent.backtest.daemon")


@dataclass(frozen=True)
class Unit:
    """One unit of work: a backtest of one symbol, timeframe and strategy."""

    symbol: str
    timeframe: str
    strategy: str


@dataclass(frozen=True)
class Fault:
    """A misbehaviour asked for through CRYPTO_AGENT_DAEMON_FAULT (tests and chaos drills only)."""

    kind: str
    amount: float

    @property
    def after_steps(self) -> int:
        """For crash-after / hang-after: the number of steps done before the fault strikes."""
        return int(self.amount)


def parse_fault(text: str | None) -> Fault | None:
    """The fault named by `text` (see the module docstring); None when empty; ConfigError when malformed."""
    if not text or not text.strip():
        return None
    kind, _, arg = text.strip().partition(":")
    defaults = {"burn-cpu": 0.0, "grow-memory": 50.0, "log-errors": 10.0}
    if kind not in FAULT_KINDS:
        raise ConfigError(
            f"unknown {FAULT_ENV} {text!r}",
            hint=f"use one of: burn-cpu, grow-memory[:MB_PER_S], log-errors[:N_PER_S], crash-after:N, hang-after:N; "
            f"or unset {FAULT_ENV}",
        )
    if not arg:
        if kind not in defaults:
            raise ConfigError(f"{FAULT_ENV}={text!r} needs a count", hint=f"e.g. {kind}:3")
        return Fault(kind, defaults[kind])
    try:
        amount = float(arg)
    except ValueError:
        amount = -1.0
    if amount < 0 or (kind in ("crash-after", "hang-after") and amount != int(amount)):
        raise ConfigError(f"{FAULT_ENV}={text!r}: {arg!r} is not a valid amount", hint=f"e.g. {kind}:3")
    return Fault(kind, amount)


def plan_units(store: Store, settings: Settings) -> list[Unit]:
    """Every unit of one cycle: symbols of the universe with stored candles x timeframes x strategies."""
    units: list[Unit] = []
    present = {tf: set(store.newest_by_symbol(tf)) for tf in settings.timeframes}
    for symbol in settings.symbols:
        for tf in settings.timeframes:
            if symbol in present[tf]:
                units.extend(Unit(symbol, tf, name) for name in backtest.STRATEGIES)
    return units


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _FaultInjector:
    """Carries out the configured fault from the main loop (so it looks like the real thing to a probe)."""

    def __init__(self, fault: Fault | None, rt: ServiceRuntime) -> None:
        self.fault = fault
        self.rt = rt
        self.steps = 0
        self._ballast: list[bytearray] = []

    def step(self) -> None:
        """Count one step of the main loop, and strike when the fault says so."""
        self.steps += 1
        f = self.fault
        if f is None:
            return
        if f.kind == "crash-after" and self.steps > f.after_steps:
            log.critical("fault injection (%s=crash-after:%d): crashing now", FAULT_ENV, f.after_steps)
            logging.shutdown()
            os._exit(EXIT_CRASHED)
        if f.kind == "hang-after" and self.steps > f.after_steps:
            log.warning("fault injection (%s=hang-after:%d): hanging now", FAULT_ENV, f.after_steps)
            while True:  # a hang: no heartbeat, stop requests ignored; signal handlers still run
                time.sleep(1.0)
        if f.kind == "burn-cpu":
            self._burn_cpu()
        elif f.kind == "grow-memory":
            self._grow_memory(f.amount)
        elif f.kind == "log-errors":
            self._log_errors(int(f.amount))

    def _burn_cpu(self) -> None:
        log.warning("fault injection (%s=burn-cpu): burning CPU until stopped", FAULT_ENV)
        next_beat = 0.0
        x = 0
        while not self.rt.stopping:
            x = (x * 31 + 7) % 1_000_003
            now = time.monotonic()
            if now >= next_beat:
                self.rt.beat("running: fault burn-cpu")
                next_beat = now + 1.0

    def _grow_memory(self, mb_per_s: float) -> None:
        cap_mb = float(os.environ.get(FAULT_MAX_MB_ENV, "2048"))
        log.warning(
            "fault injection (%s=grow-memory): growing %.0f MB/s up to %.0f MB until stopped",
            FAULT_ENV, mb_per_s, cap_mb,
        )
        grown = 0.0
        chunk_mb = mb_per_s / 10
        while not self.rt.stopping:
            if chunk_mb > 0 and grown + chunk_mb <= cap_mb:
                # bytes(1) * n writes every page, so the growth is resident, not just reserved
                self._ballast.append(bytearray(b"\x01") * int(chunk_mb * 1024 * 1024))
                grown += chunk_mb
            self.rt.beat(f"running: fault grow-memory {grown:.0f} MB")
            self.rt.wait(0.1)

    def _log_errors(self, per_s: int) -> None:
        log.warning("fault injection (%s=log-errors:%d): logging errors until stopped", FAULT_ENV, per_s)
        n = 0
        while not self.rt.stopping:
            for _ in range(per_s):
                n += 1
                log.error("fault injection: synthetic error %d", n)
            self.rt.beat("running: fault log-errors")
            self.rt.wait(1.0)


def run_daemon(settings: Settings | None = None, fault: Fault | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit code (0 on a clean stop, 70 after a crash).

    The fault, when not given, comes from CRYPTO_AGENT_DAEMON_FAULT. ServiceAlreadyRunning when
    another live instance owns the pidfile; ConfigError for a malformed fault.
    """
    settings = settings or get_settings()
    if fault is None:
        fault = parse_fault(os.environ.get(FAULT_ENV))
    rt = ServiceRuntime(SERVICE_NAME, settings, niceness=settings.daemon_niceness)
    with rt:
        if fault is not None:
            log.warning("fault injection armed: %s=%s:%g", FAULT_ENV, fault.kind, fault.amount)
        store = rt.open_store()
        _serve(rt, store, settings, _FaultInjector(fault, rt))
    return rt.exit_code


def yield_reason(settings: Settings) -> str | None:
    """Why the daemon yields now (a live-trading-first request, one line), None when it does not."""
    request = priority.yield_request(settings)
    return None if request is None else f"live trading first ({request.description})"


def _hold(rt: ServiceRuntime, store: Store, settings: Settings) -> bool:
    """Pause while live trading comes first or the store is locked (both ended at once); False on stop."""
    while True:
        if not rt.hold_while_yielding(lambda: yield_reason(settings)) or not rt.hold_while_locked(store):
            return False
        if yield_reason(settings) is None:
            return True


def _serve(rt: ServiceRuntime, store: Store, settings: Settings, faults: _FaultInjector) -> None:
    cycle = 0
    warned_empty = False
    while not rt.stopping:
        if not _hold(rt, store, settings):
            break
        try:
            units = plan_units(store, settings)
        except Exception as exc:  # the store's own fault is reported, not crashed on; anything else still crashes
            error = store_fault_of(exc)
            if error is None:
                raise
            if not rt.pause_on_store_corrupt(error):
                break
            continue
        idle_s = min(settings.daemon_cycle_pause_s, settings.heartbeat_interval_s)
        if not units:
            if not warned_empty:
                log.warning(
                    "the store holds no candles of the %d configured symbols (%s): nothing to backtest; "
                    "looking again every %g s",
                    len(settings.symbols), ",".join(settings.timeframes), idle_s,
                )
                warned_empty = True
            rt.beat("idle: empty store")
            faults.step()
            rt.wait(idle_s)
            continue
        warned_empty = False
        cycle += 1
        error = _run_cycle(rt, store, settings, faults, units, cycle)
        if error is not None:
            rt.pause_on_store_corrupt(error)
            continue
        if not rt.stopping:
            rt.beat(f"{STATE_RUNNING}: cycle {cycle} done, next in {settings.daemon_cycle_pause_s:.0f} s")
            _pause_between_cycles(rt, settings)


def _pause_between_cycles(rt: ServiceRuntime, settings: Settings) -> None:
    """The pause between two cycles, cut short by a yield request (live trading first): the loop then pauses
    heart-beating it, so the heartbeat says the daemon yields as soon as it is asked, not a cycle later."""
    deadline = time.monotonic() + settings.daemon_cycle_pause_s
    while not rt.stopping and yield_reason(settings) is None:
        left = deadline - time.monotonic()
        if left <= 0 or not rt.wait(min(1.0, settings.heartbeat_interval_s, left)):
            return


def _run_cycle(
    rt: ServiceRuntime, store: Store, settings: Settings, faults: _FaultInjector, units: list[Unit], cycle: int
) -> str | None:
    """Run one cycle's units; the store fault that ended it early (SQLite's malformed / not a database), or None."""
    started = time.monotonic()
    run_id = f"daemon-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-c{cycle}"
    done = skipped = failed = 0
    corrupt: str | None = None
    log.info("cycle %d (%s): %d units", cycle, run_id, len(units))
    i = 0
    while i < len(units) and not rt.stopping:
        if not _hold(rt, store, settings):
            break
        unit = units[i]
        faults.step()
        rt.beat(f"{STATE_RUNNING}: cycle {cycle}, unit {i + 1}/{len(units)}")
        try:
            result = backtest.run_unit(
                store, unit.symbol, unit.timeframe, unit.strategy, run_id,
                lookback_days=settings.daemon_lookback_days or None,
            )
        except StoreLocked:
            continue  # the lock appeared mid-unit: nothing was written; redo this unit after the pause
        except Exception as exc:  # one bad unit must not end a 24/7 loop; the error rate shows in the probe
            failed += 1
            corrupt = store_fault_of(exc)
            if corrupt is not None:  # no other unit can do better: the cycle ends, the heartbeat reports it
                log.error("unit %s %s %s failed: the store is corrupt: %s", unit.symbol, unit.timeframe,
                          unit.strategy, corrupt)
                break
            if isinstance(exc, CryptoAgentError):
                log.error("unit %s %s %s failed: %s", unit.symbol, unit.timeframe, unit.strategy, exc.message)
            else:
                log.exception("unit %s %s %s failed", unit.symbol, unit.timeframe, unit.strategy)
        else:
            if result is None:
                skipped += 1
            else:
                done += 1
        i += 1
        if not rt.wait(settings.daemon_unit_pause_s):
            break
    log.info(
        "cycle %d %s: %d backtests saved, %d skipped (too few candles), %d failed, in %.1f s; peak RSS %.0f MB",
        cycle, "interrupted" if i < len(units) else "done", done, skipped, failed,
        time.monotonic() - started, peak_rss_mb(),
    )
    return corrupt


def main() -> None:
    """`python -m crypto_agent.daemon`: run the daemon with the settings from the environment, then exit."""
    run_as_program(lambda: run_daemon())


if __name__ == "__main__":
    main()
