"""A throwaway local stack to rehearse the runbook's faults on: the end-to-end tests and bench_recovery use it.

Everything on 127.0.0.1 in one temporary home: a real Prefect server (`prefect server start --no-ui`,
its own PREFECT_HOME, proactive triggers evaluated every second), the exchange simulator and the
notification receiver (threads of this process), a store filled from the simulator with two good
backups (yesterday's and the 48 h one), the escalation blocks, one serving process
(deployments/serve.py) for the health monitor and the five recoveries with their prefect.yaml
triggers, the automations of deployments/automations.py, the heartbeat relay, the trader and the
daemon (started by a CLI subprocess, so they are nobody's child here).

Faults are injected with the methods below; `wait()` polls, bounded, until the automation alone has
brought things back. `close()` stops every part (SIGTERM first, ours only), then looks for any process
whose environment names this home, kills it and returns its description: a clean run returns [].
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from crypto_agent import backup, health, incidents, process
from crypto_agent.collector import collect
from crypto_agent.errors import CryptoAgentError
from crypto_agent.exchange import BinanceClient
from crypto_agent.health import HealthStatus, ProbeReport
from crypto_agent.incidents import Incident
from crypto_agent.receiver import Receiver
from crypto_agent.settings import Settings, load_settings
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store, check_integrity

PROJECT_DIR = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
T = TypeVar("T")

# What the rehearsal serves: the monitor and the five recoveries (no nightly jobs, no window guard
# firing by the clock in the middle of a rehearsal).
DEPLOYMENTS = (
    "health-monitor/scheduled",
    "recover-daemon-crash/auto",
    "recover-stale-data/auto",
    "recover-db-corruption/auto",
    "recover-process-hang/auto",
    "rollback-persistent-failures/auto",
)
MONITOR_DEPLOYMENT = "health-monitor/scheduled"

# Limits short enough to rehearse in seconds what the runbook counts in minutes.
FAST_SETTINGS: dict[str, Any] = {
    "heartbeat_interval_s": 1.0,
    "heartbeat_max_age_s": 20.0,  # the runbook's limit (120 s), shortened; over heartbeat_missing_s, as there
    "heartbeat_missing_s": 10.0,
    "relay_poll_s": 0.5,
    "relay_tick_s": 4.0,
    "crash_restart_grace_s": 0.0,
    "stop_grace_s": 5.0,
    "start_timeout_s": 60.0,
    "probe_cpu_sample_s": 0.3,
    "daemon_unit_pause_s": 0.1,
    "daemon_cycle_pause_s": 30.0,
    "trader_cycle_s": 10.0,
    "request_retries": 2,
    "retry_backoff_s": 0.1,
}
SERVER_READY_S = 120.0
SERVE_READY_S = 180.0
STOP_WAIT_S = 30.0


class RehearsalError(CryptoAgentError):
    """The rehearsal stack did not come up, or a wait ran out."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Rehearsal:
    """The local stack in `home`; use as a context manager (or start() then close())."""

    home: Path
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")
    history_days: int = 20
    extra_settings: dict[str, Any] = field(default_factory=dict)
    deployments: tuple[str, ...] = DEPLOYMENTS
    pad_db_mb: int = 0  # grow the store to about this size with old candles of symbols outside the universe
    simulator: Simulator | None = field(init=False, default=None)
    receiver: Receiver | None = field(init=False, default=None)
    settings: Settings = field(init=False)
    prefect_port: int = field(init=False, default=0)
    _procs: dict[str, subprocess.Popen] = field(init=False, default_factory=dict)
    _descendants: list[psutil.Process] = field(init=False, default_factory=list)
    _prefect_context: Any = field(init=False, default=None)

    # --- bring up ---

    @property
    def api_url(self) -> str:
        """The Prefect API of the rehearsal's server."""
        return f"http://{HOST}:{self.prefect_port}/api"

    def settings_overrides(self) -> dict[str, Any]:
        """The settings of every part, as overrides (what the flows' `settings` parameter would take)."""
        assert self.simulator is not None and self.receiver is not None
        sim = self.simulator.url
        return {
            "home": str(self.home), "symbols": list(self.symbols), "initial_history_days": self.history_days,
            "exchange_url": sim, "fear_greed_url": f"{sim}/fng/", "fred_url": f"{sim}/fred",
            "receiver_url": self.receiver.url, **FAST_SETTINGS, **self.extra_settings,
        }

    def env(self) -> dict[str, str]:
        """The environment of every child: every setting as CRYPTO_AGENT_*, our Prefect server and home, the project."""
        env = process.child_env(self.settings, {
            "PREFECT_HOME": str(self.home / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # an ISO-8601 duration: a bare number stops the server
            "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "CRYPTO_AGENT_PROJECT_DIR": str(PROJECT_DIR),
            "PYTHONPATH": str(PROJECT_DIR),
        })
        for name in ("PREFECT_API_KEY", "PREFECT_PROFILE", "CRYPTO_AGENT_CONFIG", "CRYPTO_AGENT_DAEMON_FAULT"):
            env.pop(name, None)
        return env

    def start(self) -> Rehearsal:
        """Bring every part up; on a failure, stop what was started and raise RehearsalError."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self.home.mkdir(parents=True, exist_ok=True)
        self.simulator = Simulator(port=0, symbols=list(self.symbols), seed=7, history_days=self.history_days + 10)
        self.simulator.start()
        self.receiver = Receiver(port=0, log_path=self.home / "logs" / "receiver.jsonl").start()
        self.prefect_port = free_port()
        self.settings = load_settings(**self.settings_overrides())
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                       "--port", str(self.prefect_port), "--no-ui"])
        self.seed_store()  # while the server migrates its database
        self.wait(lambda: _http_ok(f"{self.api_url}/health"), SERVER_READY_S, "the Prefect server to answer",
                  alive="prefect-server")
        self._prefect_context = temporary_settings(updates={PREFECT_API_URL: self.api_url})
        self._prefect_context.__enter__()
        from blocks.register import register_defaults

        register_defaults(self.settings)
        self._spawn("serve", [sys.executable, "-m", "deployments.serve", "--only", *self.deployments])
        self.wait(self._served, SERVE_READY_S, "every deployment to be served", alive="serve")
        from deployments.automations import apply_automations

        apply_automations(self.settings, PROJECT_DIR)
        for service in ("trader", "backtest"):
            self.start_service(service)
        self._spawn("relay", [sys.executable, "-m", "deployments.relay"])

    def seed_store(self) -> None:
        """Fill the store from the simulator and take the two backups a restore and a rollback need."""
        now = datetime.now(UTC)
        with Store(self.settings.database_url) as store, BinanceClient.from_settings(self.settings) as client:
            collect(store, client, list(self.symbols), list(self.settings.timeframes),
                    initial_history_days=self.history_days)
        if self.pad_db_mb:
            pad_store(self.settings.db_path, self.pad_db_mb)
        for days in (2, 1):
            backup.create(self.settings.db_path, self.settings.backup_dir, now=now - timedelta(days=days))

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.home / "logs" / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=PROJECT_DIR, env=self.env(), start_new_session=True)
        finally:
            log.close()
        self._procs[name] = proc
        return proc

    def _served(self) -> bool:
        from prefect import get_client

        try:
            with get_client(sync_client=True) as client:
                flows = {f.id: f.name for f in client.read_flows()}
                status = {f"{flows.get(d.flow_id)}/{d.name}": getattr(d.status, "value", d.status)
                          for d in client.read_deployments()}
        except Exception:  # the server is busy: not yet
            return False
        return all(status.get(name) == "READY" for name in self.deployments)

    def start_service(self, service: str) -> int:
        """Start a service through the CLI in a subprocess (so it is not our child); its PID."""
        done = subprocess.run([sys.executable, "-m", "crypto_agent.cli", "service", "start", service],
                              env=self.env(), cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise RehearsalError(f"`service start {service}` failed: {done.stderr.strip()[-2000:]}")
        check = process.inspect(process.service_spec(service, self.settings))
        if not check.alive or check.pid is None:
            raise RehearsalError(f"{service} is not running after its start: {check.reason}")
        return check.pid

    # --- observing ---

    def wait(self, predicate: Callable[[], T], timeout_s: float, what: str, *, alive: str | None = None,
             every_s: float = 0.25) -> T:
        """Poll until predicate() is truthy; its value. RehearsalError at the timeout, or when `alive` exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if alive is not None and self._procs[alive].poll() is not None:
                raise RehearsalError(f"{alive} exited (code {self._procs[alive].returncode}) while waiting for "
                                     f"{what}; its log: {self.home / 'logs' / (alive + '.log')}\n{self.tail(alive)}")
            if time.monotonic() > deadline:
                raise RehearsalError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(every_s)

    def tail(self, name: str, lines: int = 40) -> str:
        """The end of a part's log (prefect-server, serve, relay) or a service's."""
        path = self.home / "logs" / f"{name}.log"
        if name in ("backtest", "trader"):
            path = process.service_spec(name, self.settings).log
        return process.tail_text(path, lines)

    def probe(self, service: str) -> ProbeReport:
        """The health probe of a service, now."""
        return health.probe(service, self.settings)

    def pid(self, service: str) -> int | None:
        """The PID of our live service, None when it does not run."""
        check = process.inspect(process.service_spec(service, self.settings))
        return check.pid if check.alive else None

    def healthy_other_than(self, service: str, old_pid: int | None) -> ProbeReport | None:
        """The service's probe when it is HEALTHY with another PID than `old_pid`, else None."""
        report = self.probe(service)
        return report if report.status is HealthStatus.HEALTHY and report.pid != old_pid else None

    def incidents(self) -> list[Incident]:
        """Every incident recorded so far, newest first."""
        store = incidents.open_incident_store(self.settings)
        try:
            return incidents.list_incidents(store)
        finally:
            store.close()

    def closed_incident(self, scenario: str, after_ms: int) -> Incident | None:
        """The first incident of `scenario` opened after `after_ms` and closed (not open), else None."""
        found = [i for i in self.incidents() if i.scenario == scenario and i.opened_at >= after_ms and not i.is_open]
        return min(found, key=lambda i: i.opened_at) if found else None

    def messages(self, level: str | None = None, since: str | None = None) -> list[dict[str, Any]]:
        """What the receiver got (on /l1, /l2, /l3 when `level` is given), received at or after `since` (ISO)."""
        assert self.receiver is not None
        got = self.receiver.messages(f"/{level}" if level else None)
        return [m for m in got if since is None or m["received_at"] >= since]

    def run_monitor(self, wait_s: float = 0.0) -> str:
        """Run the health monitor now, as its schedule would (through its deployment); the flow run id.

        With wait_s, return once that run has ended (RehearsalError after wait_s).
        """
        from prefect import get_client
        from prefect.deployments import run_deployment

        run_id = run_deployment(MONITOR_DEPLOYMENT, timeout=0).id
        if wait_s:
            def ended() -> bool:
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(run_id).state
                return state is not None and state.is_final()
            self.wait(ended, wait_s, "the health monitor's run to end", alive="serve")
        return str(run_id)

    def flow_runs(self, flow_name: str) -> list[Any]:
        """The flow runs of a flow, newest first."""
        from prefect import get_client
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.client.schemas.sorting import FlowRunSort

        with get_client(sync_client=True) as client:
            return list(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                              sort=FlowRunSort.START_TIME_DESC, limit=50))

    def integrity_ok(self) -> bool:
        """Whether PRAGMA quick_check of the live database says ok."""
        try:
            return check_integrity(self.settings.db_path).ok
        except Exception:  # a file being replaced by a restore cannot be checked this instant
            return False

    def send_event(self, name: str, resource_id: str, payload: dict[str, Any], times: int = 1) -> None:
        """Send an event `times` times straight to the rehearsal's server, as a flapping monitor would."""
        import asyncio

        from prefect.events.clients import PrefectEventsClient
        from prefect.events.schemas.events import Event

        async def send() -> None:
            async with PrefectEventsClient(api_url=self.api_url) as client:
                for _ in range(times):
                    await client.emit(Event(event=name, resource={"prefect.resource.id": resource_id},
                                            payload={**payload, "detected_at": datetime.now(UTC).isoformat()}))

        asyncio.run(send())

    # --- faults ---

    def kill(self, service: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send `sig` to our live service (ownership checked); its PID."""
        proc = process.owned_process(process.service_spec(service, self.settings))
        proc.send_signal(sig)
        return proc.pid

    def make_stale(self, symbols: list[str], hours: float) -> int:
        """Delete the newest `hours` of candles of `symbols` (both timeframes), like missed updates; rows deleted."""
        cutoff = int((time.time() - hours * 3600) * 1000)
        marks = ",".join("?" * len(symbols))
        with sqlite3.connect(self.settings.db_path, timeout=30) as conn:
            return sum(conn.execute(f"DELETE FROM {table} WHERE symbol IN ({marks}) AND timestamp >= ?",
                                    (*symbols, cutoff)).rowcount for table in ("ohlcv_h1", "ohlcv_h4"))

    def corrupt_page(self, attempts: int = 20) -> int:
        """Overwrite the start of a page in the middle of the live database (WAL folded in first); the page.

        A free page holds nothing that a check reads, so pages next to the middle are tried until
        quick_check reports the damage.
        """
        path = self.settings.db_path
        with sqlite3.connect(path, timeout=30) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
        middle = pages // 2
        for page in sorted(range(2, pages + 1), key=lambda p: abs(p - middle))[:attempts]:
            with path.open("r+b") as f:
                f.seek((page - 1) * page_size)
                f.write(b"\xff" * 64)
                f.flush()
                os.fsync(f.fileno())
            if not self.integrity_ok():
                return page
        raise RehearsalError(f"{attempts} overwritten pages of {path} and quick_check still says ok")

    # --- stopping ---

    def stop_part(self, name: str, timeout_s: float = STOP_WAIT_S) -> int | None:
        """SIGTERM one part we spawned (the serving process cancels its flow runs), SIGKILL after the timeout."""
        proc = self._procs.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                self._descendants.extend(psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def close(self) -> list[str]:
        """Stop everything (relay, serving process, services, server, simulator, receiver); what was left and killed."""
        for name in ("relay", "serve"):
            self.stop_part(name)
        if getattr(self, "settings", None) is not None:
            for service in ("backtest", "trader"):
                spec = process.service_spec(service, self.settings)
                try:
                    process.stop(spec)
                except CryptoAgentError:
                    pass  # a stranger's PID in the pidfile: never signalled; the sweep below reports it
        self.stop_part("prefect-server")
        if self._prefect_context is not None:
            self._prefect_context.__exit__(None, None, None)
            self._prefect_context = None
        if self.simulator is not None:
            self.simulator.stop()
        if self.receiver is not None:
            self.receiver.stop()
        return self.sweep()

    def sweep(self) -> list[str]:
        """Kill what is left of this rehearsal: a process whose environment names its home; their descriptions."""
        home = str(self.home)
        left = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.pid == os.getpid():
                continue
            try:
                if proc.environ().get("CRYPTO_AGENT_HOME") != home or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                left.append(proc)
            except psutil.Error:
                continue
        for proc in left + [p for p in self._descendants if _alive(p)]:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        return [f"PID {p.pid}: {' '.join(p.info.get('cmdline') or [])[:200]}" for p in left]

    def __enter__(self) -> Rehearsal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


PAD_START_MS = 1_300_000_000_000 // 3_600_000 * 3_600_000  # 2011: older than any backup, never resynced


def pad_store(db_path: Path, target_mb: int, per_symbol: int = 50_000) -> int:
    """Grow the database to about target_mb MB with H1 candles of made-up symbols (X00000USDT ...); rows written."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=60)
    try:
        sql = "INSERT OR IGNORE INTO ohlcv_h1 VALUES (?,?,?,?,?,?,?,?,?,?)"
        rows = n = 0
        while db_path.stat().st_size < target_mb * 1_000_000:
            symbol, price = f"X{n:05d}USDT", 100.0 + n
            conn.execute("BEGIN")
            conn.executemany(sql, (
                (symbol, PAD_START_MS + i * 3_600_000, price + i % 7, price + 1 + i % 5, price - 1, price + i % 3,
                 1000.0 + i % 97, PAD_START_MS + i * 3_600_000 + 3_599_999, 123456.7 + i, 100 + i % 50)
                for i in range(per_symbol)
            ))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            rows += per_symbol
            n += 1
        return rows
    finally:
        conn.close()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False
