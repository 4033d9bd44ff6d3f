"""Helpers of the recovery flow tests: fast service settings, the incident of a run, a store filled from the
simulator once per module, and ways to damage a real SQLite file."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for service_kit

from flow_kit import TEST_SYMBOLS, flow_run_events
from prefect.events.schemas.events import ReceivedEvent
from service_kit import Keeper, wait_until

from crypto_agent import holds, incidents, process
from crypto_agent.collector import collect
from crypto_agent.exchange import BinanceClient
from crypto_agent.incidents import Incident
from crypto_agent.receiver import Receiver
from crypto_agent.settings import Settings, load_settings
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store

# Short limits, so a service is started, found stale, stopped and confirmed within seconds.
FAST_SERVICES: dict[str, Any] = {
    "heartbeat_interval_s": 0.2,
    "heartbeat_max_age_s": 3.0,
    "daemon_unit_pause_s": 0.2,
    "daemon_cycle_pause_s": 1.0,
    "daemon_lookback_days": 30,
    "trader_cycle_s": 0.5,
    "probe_cpu_sample_s": 0.3,
    "stop_grace_s": 3.0,
    "start_timeout_s": 60.0,
    "crash_restart_grace_s": 0.0,
}

__all__ = ["Keeper", "wait_until"]


def event(name: str, resource: str, **payload: Any) -> dict[str, Any]:
    """A triggering event as the automation passes it to a recovery flow."""
    payload.setdefault("detected_at", time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
    return {"id": f"test-{name}-{time.monotonic_ns()}", "event": name,
            "occurred": payload["detected_at"], "resource": resource, "payload": payload}


def incident_of(cfg: Settings, result: dict[str, Any]) -> Incident:
    """The incident a recovery flow's summary names."""
    with incidents.open_incident_store(cfg) as log:
        return incidents.get(log, result["incident_id"])


def all_incidents(cfg: Settings) -> list[Incident]:
    """Every incident of the log, newest first."""
    with incidents.open_incident_store(cfg) as log:
        return incidents.list_incidents(log)


def events_of(flow_run_id: Any, name: str, count: int, timeout_s: float = 30.0) -> list[ReceivedEvent]:
    """The events called `name` a flow run emitted, once `count` of them have arrived (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = flow_run_events(flow_run_id, name, timeout_s=max(0.0, deadline - time.monotonic()))
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.25)


def steps(inc: Incident) -> list[str]:
    """The incident's action steps in order."""
    return [a["step"] for a in inc.actions]


def action(inc: Incident, step: str) -> dict[str, Any]:
    """The last action of a step."""
    found = [a for a in inc.actions if a["step"] == step]
    assert found, f"no action {step!r} in {steps(inc)}"
    return found[-1]


def messages(inbox: Receiver, level: str) -> list[dict[str, Any]]:
    """The bodies the receiver got for a level (subject, body, ...)."""
    return [m["body"] for m in inbox.messages(f"/{level}")]


def crash_loop(keeper: Keeper, cfg: Settings, service: str = "backtest") -> None:
    """A service started, crashed (recorded as process control records it), started again and killed: the
    crash about to be recovered is the 2nd of a loop, which the restart policy backs off."""
    spec = process.service_spec(service, cfg)
    kill_and_wait(keeper.start(spec, cfg).pid)
    with Store(cfg.database_url) as store:
        process.clean_state(spec, store=store)  # records the first crash
    kill_and_wait(keeper.start(spec, cfg).pid)


def died_of_the_store(cfg: Settings, service: str = "backtest") -> str:
    """Append to the service's log the line a service writes when it dies of a corrupt store; that line."""
    spec = process.service_spec(service, cfg)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    line = (f"{stamp}.000Z CRITICAL {service}[4242]: {service} service crashed: "
            "(sqlite3.DatabaseError) database disk image is malformed")
    spec.log.parent.mkdir(parents=True, exist_ok=True)
    with spec.log.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    return line


def stop_services(cfg: Settings) -> None:
    """Stop what a recovery started in this home (our PIDs only), and lift any pause."""
    for name in ("backtest", "trader"):
        spec = process.service_spec(name, cfg)
        try:
            process.stop(spec, grace_s=2.0)
        except process.NotOurProcess:
            pass
        holds.release_hold(spec)


def running_pid(cfg: Settings, service: str) -> int | None:
    """The PID of our live service, None when it does not run."""
    check = process.inspect(process.service_spec(service, cfg))
    return check.pid if check.alive else None


def kill_and_wait(pid: int) -> None:
    """SIGKILL a process we started and wait until it is gone (or a zombie)."""
    proc = psutil.Process(pid)
    proc.send_signal(signal.SIGKILL)
    wait_until(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, 10, "the kill")


def fill_store(db_path: Path, sim: Simulator, symbols: list[str], days: int) -> None:
    """Fill a store with the simulator's candles (H1 and H4), then fold the WAL into the file."""
    with Store(f"sqlite:///{db_path}") as store, BinanceClient(sim.url) as client:
        summary = collect(store, client, symbols, ["1h", "4h"], mode="update", initial_history_days=days)
        assert summary.ok, summary.failures
    checkpoint(db_path)


def checkpoint(db_path: Path) -> None:
    """Fold the WAL into the database file (nobody else may have it open)."""
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def copy_db(template: Path, cfg: Settings) -> Path:
    """Put a copy of a template database at the settings' db_path."""
    Path(cfg.db_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, cfg.db_path)
    return Path(cfg.db_path)


def leaf_page(db_path: Path, name: str) -> int:
    """A leaf page (not the first) of a table or index, from SQLite's dbstat."""
    conn = sqlite3.connect(db_path)
    try:
        row = conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno "
                           "LIMIT 1 OFFSET 1", (name,)).fetchone()
    finally:
        conn.close()
    assert row is not None, f"{name} has fewer than two leaf pages"
    return int(row[0])


def smash_page(db_path: Path, page: int) -> bytes:
    """Overwrite the start of a page with garbage; the page's bytes afterwards."""
    conn = sqlite3.connect(db_path)
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with db_path.open("r+b") as f:
        f.seek((page - 1) * size)
        f.write(b"\x0d\x00\x00\x00\x10" + b"\xff" * 300)
        f.seek((page - 1) * size)
        return f.read(size)


def rows(db_path: Path, sql: str) -> list[tuple]:
    """Rows of a read-only query on a database file."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def execute(db_path: Path, sql: str, params: tuple = ()) -> None:
    """One write to a database file."""
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        conn.execute(sql, params)
        conn.commit()
    finally:
        conn.close()


def add_result(db_path: Path, run_id: str, created_ms: int) -> None:
    """One backtest_results row, to tell which state of the store a restore brought back."""
    execute(db_path, "INSERT INTO backtest_results (run_id, strategy, params, symbol, timeframe, period_start, "
            "period_end, candles, fee_bps, total_return, max_drawdown, trades, exposure, created_at) VALUES "
            "(?, 'sma_cross', '{}', 'BTCUSDT', '1h', 0, 1, 10, 1.0, 0.1, -0.1, 3, 0.5, ?)", (run_id, created_ms))


def settings_of(overrides: dict[str, Any]) -> Settings:
    """The Settings a flow run builds from these overrides."""
    return load_settings(**overrides)


Make = Callable[..., dict[str, Any]]


@pytest.fixture(name="env")
def filled_env(settings_for: Make, simulator: Simulator) -> Iterator[dict[str, Any]]:
    """Overrides of a tmp home whose store holds 60 days of the simulator's candles; services stopped after."""
    overrides = settings_for(simulator, **FAST_SERVICES)
    cfg = settings_of(overrides)
    fill_store(Path(cfg.db_path), simulator, TEST_SYMBOLS, 60)
    yield overrides
    stop_services(cfg)
