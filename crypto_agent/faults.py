"""The one catalogue of faults of a running stack (no Prefect): what the chaos drills, e2e tests and the bench inject.

Each fault acts on the stack found through the settings and returns an Injection (at, what, pid, count):

    kill(settings, service, sig=signal.SIGKILL)        signal our service (SIGKILL, SIGTERM, ...), ownership checked
    stop(settings, service)                            SIGSTOP: alive, but no heartbeat and no work
    continue_stopped(settings, service) -> bool        SIGCONT when it is stopped (a stop's cleanup)
    restart_with_fault(settings, fault, service=DAEMON)  restart with CRYPTO_AGENT_DAEMON_FAULT=fault
    hang(settings, after_steps=2)                      the daemon restarted with hang-after:N (SIGTERM ignored)
    burn_cpu(settings)                                 the daemon restarted with burn-cpu
    grow_memory(settings, mb_per_s=50.0, max_mb=None)  the daemon restarted with grow-memory:M
    crash_after(settings, steps=2)                     the daemon restarted with crash-after:N
    restart_clean(settings, service=DAEMON)            restart without any fault (a restart fault's cleanup)
    fault_of(settings, service=DAEMON) -> str | None   the fault our running service was started with
    corrupt_pages(settings, table="ohlcv_h1", pages=1) overwrite leaf pages of the live file (WAL folded in first)
    truncate_db(settings, keep=0.5)                    cut the live file to that share of its pages
    delete_candles(settings, symbols, hours, timeframes=None)  the newest `hours` gone: stale data
    gap(settings, symbol, candles, hours_ago, timeframe_name="1h")  a hole for the continuity check
    exchange(settings, mode, **opts)                   the simulator's faults: "down" (503, for_s), "refuse"
                                                       (for_s), "429" (count, retry_after_s), "418" (for_s),
                                                       "malformed" (count), "slow" (seconds)
    clear_exchange(settings)                           the simulator serves again, without any fault
    clear(settings) -> list[str]                       undo what can be undone (SIGCONT, clean restart, simulator)

Services are found through their pidfiles and signalled only after crypto_agent.process's ownership
check (a stranger's PID is never touched: NotOurProcess); the store's damage is refused while a
recovery holds its lock; the simulator's faults go through its local /_sim/ HTTP API.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from sqlalchemy import delete

from crypto_agent import process
from crypto_agent.daemon import FAULT_ENV, FAULT_MAX_MB_ENV, parse_fault
from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.recovery import CLEAN_START_ENV
from crypto_agent.schema import metadata
from crypto_agent.settings import Settings
from crypto_agent.store import Store, check_integrity
from crypto_agent.storelock import lock_path
from crypto_agent.universe import timeframe

DAEMON = "backtest"
TRADER = "trader"
SERVICES = (TRADER, DAEMON)
SIM_TIMEOUT_S = 5.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# The WAL is folded into the file before a page is damaged, so the damaged page is the one SQLite reads.
CHECKPOINT_BUSY_MS = 30_000
TRUNCATE_BUSY_MS = 2_000  # then PASSIVE: a reader that never lets go (Litestream) is not waited for
EXCHANGE_MODES = ("down", "refuse", "429", "418", "malformed", "slow")


class FaultError(CryptoAgentError):
    """A fault cannot be injected here (no stack, not our process, no simulator, the store locked)."""


@dataclass(frozen=True)
class Injection:
    """A fault put in place: when, what was done (one line for a timeline), the process hit, how many rows/pages."""

    at: float  # epoch seconds
    what: str
    pid: int | None = None
    count: int | None = None


# --- services ---


def kill(settings: Settings, service: str, sig: signal.Signals = signal.SIGKILL) -> Injection:
    """Send `sig` to our live service (ownership record checked; psutil re-checks the create time as it sends).

    NotOurProcess when the pidfile names another process, ServiceNotRunning when nothing runs; nothing is sent then.
    """
    spec = process.service_spec(service, settings)
    proc = process.owned_process(spec)
    proc.send_signal(sig)
    return Injection(time.time(), f"{sig.name} sent to the {service} service, PID {proc.pid} "
                     f"(ours: checked against {spec.pid_record.name})", proc.pid)


def stop(settings: Settings, service: str) -> Injection:
    """SIGSTOP our service: alive, but no heartbeat and no work (continue_stopped undoes it)."""
    return kill(settings, service, signal.SIGSTOP)


def continue_stopped(settings: Settings, service: str) -> bool:
    """SIGCONT our service when it is stopped; True if sent."""
    try:
        proc = process.owned_process(process.service_spec(service, settings))
        if proc.status() != psutil.STATUS_STOPPED:
            return False
        proc.send_signal(signal.SIGCONT)
        return True
    except (CryptoAgentError, psutil.Error):
        return False


def restart_with_fault(settings: Settings, fault: str, service: str = DAEMON,
                       env: dict[str, str] | None = None) -> Injection:
    """Restart our service (SIGTERM, then start) with CRYPTO_AGENT_DAEMON_FAULT=fault; ConfigError for a bad fault."""
    parse_fault(fault)
    spec = process.service_spec(service, settings)
    stopped, started = process.restart(spec, settings, env={**(env or {}), FAULT_ENV: fault})
    before = f"stopped PID {stopped.pid} with {stopped.signal}, " if stopped.was_running else ""
    return Injection(time.time(), f"{service} restarted with {FAULT_ENV}={fault}: {before}started PID "
                     f"{started.pid}", started.pid)


def hang(settings: Settings, after_steps: int = 2) -> Injection:
    """The daemon restarted to hang in its main loop after N steps: no heartbeat, SIGTERM ignored."""
    return restart_with_fault(settings, f"hang-after:{after_steps}")


def burn_cpu(settings: Settings) -> Injection:
    """The daemon restarted to spin the CPU in its main loop, heart-beating."""
    return restart_with_fault(settings, "burn-cpu")


def grow_memory(settings: Settings, mb_per_s: float = 50.0, max_mb: float | None = None) -> Injection:
    """The daemon restarted to grow its resident memory by mb_per_s MB a second (up to max_mb), heart-beating."""
    env = {FAULT_MAX_MB_ENV: f"{max_mb:g}"} if max_mb is not None else None
    return restart_with_fault(settings, f"grow-memory:{mb_per_s:g}", env=env)


def crash_after(settings: Settings, steps: int = 2) -> Injection:
    """The daemon restarted to die at once (exit 70, pidfile left behind) after N steps."""
    return restart_with_fault(settings, f"crash-after:{steps}")


def restart_clean(settings: Settings, service: str = DAEMON) -> Injection:
    """Restart our service without any injected fault (the cleanup of a restart fault that was not recovered)."""
    spec = process.service_spec(service, settings)
    stopped, started = process.restart(spec, settings, env=dict(CLEAN_START_ENV))
    return Injection(time.time(), f"{service} restarted without the fault: PID {started.pid}" + (
        f" (PID {stopped.pid} stopped with {stopped.signal})" if stopped.was_running else ""), started.pid)


def fault_of(settings: Settings, service: str = DAEMON) -> str | None:
    """The fault our running service was started with (from its environment), None without one or when not running."""
    try:
        proc = process.owned_process(process.service_spec(service, settings))
        return proc.environ().get(FAULT_ENV) or None
    except (CryptoAgentError, psutil.Error):
        return None


# --- the store ---


def _store(settings: Settings) -> Store:
    """The live store, to delete candles from; FaultError when it is missing or a recovery holds it."""
    db = _damageable(settings)
    return Store(settings.database_url or f"sqlite:///{db}", create=False)


def _damageable(settings: Settings) -> Path:
    """The live database file a fault may damage; FaultError when it is missing or a recovery holds it."""
    db = Path(settings.db_path)
    if not db.is_file():
        raise FaultError(f"no database at {db}", hint="bring the stack up first: `crypto-agent up`")
    if lock_path(db).exists():
        raise FaultError(f"{lock_path(db)} exists: a recovery holds the store",
                         hint="wait until it ends (`crypto-agent incidents --open`), then inject again")
    return db


def _fold_wal(db: Path) -> tuple[int, int, sqlite3.Connection]:
    """Checkpoint the WAL into the file (TRUNCATE; PASSIVE when a reader holds it back); (busy, page_size, the open
    connection). Litestream holds a read transaction on the store all the time: a TRUNCATE waits out its whole busy
    timeout for nothing, while PASSIVE folds in every frame up to Litestream's mark at once (issue 12)."""
    conn = sqlite3.connect(db, timeout=CHECKPOINT_BUSY_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout={TRUNCATE_BUSY_MS}")
    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    if busy:
        busy = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0]
    conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
    return int(busy), int(conn.execute("PRAGMA page_size").fetchone()[0]), conn


def corrupt_pages(settings: Settings, table: str = "ohlcv_h1", pages: int = 1) -> Injection:
    """Overwrite the b-tree header of `pages` leaf pages of `table` in the live file, after folding the WAL in.

    FaultError when the damage does not show in quick_check (it never should).
    """
    db = _damageable(settings)
    busy, page_size, conn = _fold_wal(db)
    try:
        try:
            leaves = [int(r[0]) for r in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno LIMIT ?",
                (table, pages + 1))]
            found = leaves[1:] if len(leaves) > pages else leaves  # past the first leaf, when the table has more
        except sqlite3.OperationalError:  # SQLite built without dbstat: the table's root page will do
            found = [int(r[0]) for r in conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))]
    finally:
        conn.close()
    if not found:
        raise FaultError(f"table {table} has no page to damage in {db}", hint="is the store filled? `crypto-agent up`")
    with db.open("r+b") as f:
        for page in found:
            f.seek((page - 1) * page_size)
            # a garbage b-tree page header and cell pointers: SQLite can no longer read the page
            f.write(b"\x0d\x00\x00\x00\x10" + b"\xff" * 300)
        f.flush()
        os.fsync(f.fileno())
    check = check_integrity(db)
    if check.ok:
        raise FaultError(f"page(s) {', '.join(map(str, found))} of {db} were overwritten but quick_check still "
                         f"passes (checkpoint busy={busy}: the page may live in the WAL)",
                         hint="inject again when the services are idle")
    where = f"page {found[0]}" if len(found) == 1 else f"{len(found)} pages ({found[0]}-{found[-1]})"
    return Injection(time.time(), f"{where} ({table}, {page_size} bytes) of {db.name} overwritten; "
                     f"quick_check now says: {check.problems[0][:120]}", count=len(found))


def truncate_db(settings: Settings, keep: float = 0.5) -> Injection:
    """Cut the live database file (WAL folded in first) to `keep` of its pages, as a full disk or a bad copy would."""
    if not 0 < keep < 1:
        raise InputError(f"keep={keep!r} must be between 0 and 1 (the share of the file that stays)")
    db = _damageable(settings)
    busy, page_size, conn = _fold_wal(db)
    conn.close()
    pages = db.stat().st_size // page_size
    kept = max(1, int(pages * keep))
    os.truncate(db, kept * page_size)
    return Injection(time.time(), f"{db.name} truncated from {pages} to {kept} pages of {page_size} bytes "
                     f"(checkpoint busy={busy})", count=pages - kept)


def delete_candles(settings: Settings, symbols: Iterable[str], hours: float, timeframes: Iterable[str] | None = None,
                   now: float | None = None) -> Injection:
    """Delete the candles of the last `hours` of `symbols` (every timeframe of the settings unless named): stale data.

    Its count is the number of candles deleted.
    """
    symbols = list(symbols)
    names = list(settings.timeframes if timeframes is None else timeframes)
    since_ms = int(((time.time() if now is None else now) - hours * 3600) * 1000)
    gone = 0
    with _store(settings) as store, store.engine.begin() as conn:
        for name in names:
            table = metadata.tables[timeframe(name).table]
            gone += conn.execute(delete(table).where(table.c.symbol.in_(symbols),
                                                     table.c.timestamp >= since_ms)).rowcount
    return Injection(time.time(), f"deleted the newest {hours:g} h of {'/'.join(names)} candles of "
                     f"{', '.join(symbols)} ({gone} candles)", count=gone)


def gap(settings: Settings, symbol: str, candles: int, hours_ago: float, timeframe_name: str = "1h",
        now: float | None = None) -> Injection:
    """Delete `candles` consecutive candles of one series from `hours_ago` back (a hole for the continuity check)."""
    tf = timeframe(timeframe_name)
    start_ms = (int(((time.time() if now is None else now) - hours_ago * 3600) * 1000) // tf.ms) * tf.ms
    end_ms = start_ms + candles * tf.ms
    table = metadata.tables[tf.table]
    with _store(settings) as store, store.engine.begin() as conn:
        gone = conn.execute(delete(table).where(table.c.symbol == symbol, table.c.timestamp >= start_ms,
                                                table.c.timestamp < end_ms)).rowcount
    first = datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
    return Injection(time.time(), f"deleted {gone} consecutive {timeframe_name} candles of {symbol} from "
                     f"{first} UTC (continuity allows {settings.max_gap_candles})", count=gone)


# --- the simulator's fault API ---


@dataclass(frozen=True)
class SimulatorControl:
    """The bundled exchange simulator's control plane (/_sim/), local only."""

    base_url: str

    @classmethod
    def of(cls, settings: Settings) -> SimulatorControl:
        """The simulator the settings' exchange_url points at; FaultError when it is not a local one."""
        url = settings.exchange_url.rstrip("/")
        if urlsplit(url).hostname not in LOCAL_HOSTS:
            raise FaultError(
                f"exchange_url {url} is not the bundled simulator on this machine: its faults cannot be injected",
                hint="run the exchange drills on the stack `crypto-agent up` starts (exchange on 127.0.0.1)",
            )
        return cls(url)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            resp = httpx.request(method, f"{self.base_url}{path}", json=body, timeout=SIM_TIMEOUT_S)
        except httpx.HTTPError as exc:
            raise FaultError(f"the simulator at {self.base_url} does not answer {method} {path}: {exc}",
                             hint="is the stack up? `crypto-agent up`") from None
        if resp.status_code != 200:
            raise FaultError(f"the simulator refused {method} {path}: HTTP {resp.status_code} {resp.text[:200]}",
                             hint="its log is logs/simulator.log")
        answer: dict[str, Any] = resp.json()
        return answer

    def faults(self) -> dict[str, Any]:
        """The faults in force."""
        return self._call("GET", "/_sim/faults")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Merge fault settings (down, slow_s, storm_429, retry_after_s, ban_418_s, malformed, gaps)."""
        return self._call("POST", "/_sim/faults", faults)

    def down(self, mode: str = "503", for_s: float | None = None) -> dict[str, Any]:
        """Answer 503 (or refuse connections) to every market request, for `for_s` seconds when given."""
        return self._call("POST", "/_sim/down", {"mode": mode, "for_s": for_s})

    def heal(self) -> None:
        """Serve again, without any fault."""
        self._call("POST", "/_sim/up")
        self._call("DELETE", "/_sim/faults")


def exchange(settings: Settings, mode: str, **opts: Any) -> Injection:
    """Make the local simulator misbehave: "down" (503; for_s), "refuse" (for_s, needed), "429" (count=3,
    retry_after_s=1), "418" (for_s=60), "malformed" (count=1) or "slow" (seconds=2); InputError for another mode."""
    sim = SimulatorControl.of(settings)
    if mode in ("down", "refuse"):
        for_s = opts.get("for_s")
        if mode == "refuse" and for_s is None:
            raise InputError("the exchange fault 'refuse' needs for_s", hint="nothing else could bring it back")
        sim.down("503" if mode == "down" else "refuse", for_s)
        how = "answers 503" if mode == "down" else "refuses connections"
        what = f"{how} {f'for {for_s:g} s' if for_s is not None else 'until cleared'} ({sim.base_url}/_sim/down)"
    elif mode == "429":
        count, retry = int(opts.get("count", 3)), int(opts.get("retry_after_s", 1))
        sim.set_faults(storm_429=count, retry_after_s=retry)
        what = f"answers the next {count} requests with 429, Retry-After {retry} s (API throttle)"
    elif mode == "418":
        for_s = float(opts.get("for_s", 60.0))
        sim.set_faults(ban_418_s=for_s)
        what = f"answers every request with 418 (IP ban) for {for_s:g} s"
    elif mode == "malformed":
        count = int(opts.get("count", 1))
        sim.set_faults(malformed=count)
        what = f"truncates the next {count} klines bodies (status 200, malformed JSON)"
    elif mode == "slow":
        seconds = float(opts.get("seconds", 2.0))
        sim.set_faults(slow_s=seconds)
        what = f"adds {seconds:g} s of latency to every response"
    else:
        raise InputError(f"unknown exchange fault {mode!r}", hint=f"use one of: {', '.join(EXCHANGE_MODES)}")
    return Injection(time.time(), f"the exchange simulator {what}")


def clear_exchange(settings: Settings) -> Injection:
    """The local simulator serves again, without any fault."""
    sim = SimulatorControl.of(settings)
    sim.heal()
    return Injection(time.time(), f"the exchange simulator serves again, without faults ({sim.base_url})")


def clear(settings: Settings) -> list[str]:
    """Undo every fault that can be undone (SIGCONT a stopped service, restart a faulty daemon clean, heal the
    simulator); what was done. Damage to the store is a recovery's to repair."""
    done: list[str] = []
    for service in SERVICES:
        if continue_stopped(settings, service):
            done.append(f"SIGCONT sent to the stopped {service} service")
    if fault_of(settings, DAEMON):
        done.append(restart_clean(settings, DAEMON).what)
    try:
        done.append(clear_exchange(settings).what)
    except FaultError:
        pass  # no local simulator, or it does not answer: nothing to clear there
    return done
