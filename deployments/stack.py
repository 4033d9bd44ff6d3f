"""The whole stack on this machine from one command: `crypto-agent up` brings it up, `crypto-agent down` stops it.

`up` starts, in order: a Prefect server on SQLite (PREFECT_HOME inside the project home), the exchange
simulator and the local notification receiver, backfills the store for the universe, starts the paper
trader and the backtest daemon, registers the Block types and default documents, starts the one
process that runs the flows (deployments/serve.py: it creates every deployment of prefect.yaml with
its schedules and triggers), applies the automations of deployments/automations.py and starts the
heartbeat relay. Every child runs detached in its own session,
its PID and identity recorded under run/ (crypto_agent.process: never a signal to a PID that is not
the process we started). A second `up` reuses what runs and answers. In the foreground `up` waits for
Ctrl-C or SIGTERM and then stops what it started, in reverse order; `crypto-agent down` does the same
from another terminal. Prefect is imported inside the functions that talk to the API.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import psutil
from rich.console import Console

from crypto_agent import health, process
from crypto_agent.errors import ConfigError, CryptoAgentError, InputError
from crypto_agent.service import ServiceAlreadyRunning, write_atomic
from crypto_agent.settings import Settings, load_settings

PROJECT_DIR = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

# Start order; `down` and Ctrl-C stop in the reverse order.
SERVER, SIMULATOR, RECEIVER, TRADER, DAEMON, SERVE, RELAY = (
    "prefect-server", "simulator", "receiver", "trader", "backtest", "serve", "relay",
)
START_ORDER: tuple[str, ...] = (SERVER, SIMULATOR, RECEIVER, TRADER, DAEMON, SERVE, RELAY)
SERVICES = (TRADER, DAEMON)  # crypto_agent's services: they write their own pidfile and heartbeat
FOREGROUND = "up"  # the pidfile of an `up` that holds the stack in the foreground, so `down` can stop it

SERVER_READY_S = 120.0  # a fresh PREFECT_HOME migrates its database first (about 8-11 s here)
CHILD_READY_S = 60.0
SERVE_READY_S = 90.0
SERVE_STOP_GRACE_S = 30.0  # SIGTERM cancels the running flow runs, then it exits
RELAY_SETTLE_S = 2.0  # the relay has no address: alive this long after its start counts as up
UP_STOP_GRACE_S = 180.0  # `down` waits this long for a foreground `up` to stop its stack
HTTP_TIMEOUT_S = 2.0
# Environment of the parent that must not reach the stack's children: they talk to our server only.
DROPPED_ENV = ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_PROFILE")


class PortTaken(CryptoAgentError):
    """A port the stack needs is held by a process that is not part of this stack."""


class StackConflict(CryptoAgentError):
    """A part of the stack already runs, with another configuration than the one asked for."""


class StackInterrupted(CryptoAgentError):
    """Ctrl-C or SIGTERM arrived while the stack was coming up; what had started was stopped."""

    exit_code = 130


# --- what the stack is made of ---


@dataclass(frozen=True)
class StackPlan:
    """Where every part of the stack lives: settings (ports applied), the Prefect home and port, the project."""

    settings: Settings
    project_dir: Path
    prefect_home: Path
    prefect_port: int
    simulator_port: int | None  # None: the exchange is not the bundled simulator, nothing to start
    receiver_port: int | None  # None: notifications go elsewhere, nothing to start
    ui: bool = True

    @property
    def ui_url(self) -> str:
        """The Prefect UI."""
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def api_url(self) -> str:
        """The Prefect API (PREFECT_API_URL)."""
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def run_dir(self) -> Path:
        """Where pidfiles and the stack record live."""
        return Path(self.settings.run_dir)

    @property
    def record_path(self) -> Path:
        """run/stack.json: what the last `up` brought up and where."""
        return self.run_dir / "stack.json"


def _local_port(url: str) -> int | None:
    parts = urlsplit(url)
    return parts.port if parts.hostname in LOCAL_HOSTS and parts.port is not None else None


def _check_port(option: str, port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise InputError(f"{option} {port} is out of range", hint="use a port between 1 and 65535")


def plan_stack(
    *,
    prefect_port: int | None = None,
    simulator_port: int | None = None,
    receiver_port: int | None = None,
    ui: bool = True,
    project_dir: Path = PROJECT_DIR,
) -> StackPlan:
    """The plan of the stack from the settings and the port options; InputError/ConfigError on bad values."""
    for option, port in (("--prefect-port", prefect_port), ("--simulator-port", simulator_port),
                         ("--receiver-port", receiver_port)):
        _check_port(option, port)
    settings = load_settings()
    overrides: dict[str, Any] = {}
    if simulator_port is not None:
        old = settings.exchange_url
        new = f"http://{HOST}:{simulator_port}"
        overrides["exchange_url"] = new
        # Fear & Greed and FRED come from the same simulator when they pointed at the old one
        for name in ("fear_greed_url", "fred_url"):
            value = getattr(settings, name)
            if value.startswith(old):
                overrides[name] = new + value[len(old):]
    if receiver_port is not None:
        overrides["receiver_url"] = f"http://{HOST}:{receiver_port}"
    if prefect_port is not None:
        overrides["prefect_port"] = prefect_port
    if overrides:
        settings = load_settings(**overrides)
    if not (project_dir / "prefect.yaml").is_file():
        raise ConfigError(
            f"no prefect.yaml in {project_dir}",
            hint="run `crypto-agent up` from a checkout of the project (it deploys the flows of prefect.yaml)",
        )
    return StackPlan(
        settings=settings,
        project_dir=project_dir,
        prefect_home=settings.prefect_home.absolute(),
        prefect_port=settings.prefect_port,
        simulator_port=_local_port(settings.exchange_url),
        receiver_port=_local_port(settings.receiver_url),
        ui=ui,
    )


def prefect_env(plan: StackPlan) -> dict[str, str]:
    """The Prefect settings of every part of the stack: our server, our home, no telemetry, fast triggers."""
    return {
        "PREFECT_HOME": str(plan.prefect_home),
        "PREFECT_API_URL": plan.api_url,
        "PREFECT_UI_URL": plan.ui_url,
        # the UI's browser code calls this address; its default is the server's host and port settings
        # (4200), not the --port of `prefect server start`
        "PREFECT_UI_API_URL": plan.api_url,
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(plan.prefect_port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # an ISO-8601 duration: a bare number stops the server (PREFECT_NOTES)
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",
        "PREFECT_SERVER_UI_ENABLED": "true" if plan.ui else "false",
        # the serving process polls for runs every second: `prefect deployment run` starts at once
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "CRYPTO_AGENT_PROJECT_DIR": str(plan.project_dir),
    }


def child_env(plan: StackPlan) -> dict[str, str]:
    """The whole environment of a child: ours, every setting as CRYPTO_AGENT_*, the Prefect settings, the project."""
    env = process.child_env(plan.settings, prefect_env(plan))
    for name in DROPPED_ENV:
        env.pop(name, None)
    # flows/, blocks/ and deployments/ import from the project folder even when it is not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(plan.project_dir), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass(frozen=True)
class Child:
    """A process of the stack that writes no pidfile itself: its command, health check and stop grace."""

    name: str
    command: tuple[str, ...]
    port: int | None
    ready: Callable[[], bool]
    ready_timeout_s: float
    stop_grace_s: float
    what: str  # one line for the operator

    def spec(self, settings: Settings) -> process.ServiceSpec:
        """Its process-control spec (files under run/ and logs/)."""
        return process.child_spec(self.name, self.command, settings, stop_grace_s=self.stop_grace_s,
                                  start_timeout_s=self.ready_timeout_s)


def http_ok(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> bool:
    """True when GET url answers 200."""
    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def running_for(spec: process.ServiceSpec, seconds: float) -> Callable[[], bool]:
    """A readiness check for a process with no address: true once our process has lived `seconds`."""

    def check() -> bool:
        found = process.inspect(spec)
        return found.alive and found.record is not None and time.time() - found.record.create_time >= seconds

    return check


def _python_m(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", *args)


def server_child(plan: StackPlan) -> Child:
    """The Prefect server on SQLite in PREFECT_HOME, on 127.0.0.1, with its UI."""
    command = _python_m("prefect", "server", "start", "--host", HOST, "--port", str(plan.prefect_port))
    if not plan.ui:
        command += ("--no-ui",)
    return Child(SERVER, command, plan.prefect_port, lambda: http_ok(f"{plan.api_url}/health"),
                 SERVER_READY_S, plan.settings.stop_grace_s,
                 f"Prefect server (SQLite in {plan.prefect_home})")


def simulator_child(plan: StackPlan) -> Child | None:
    """The bundled exchange simulator, when the exchange URL is a 127.0.0.1 port."""
    if plan.simulator_port is None:
        return None
    url = f"http://{HOST}:{plan.simulator_port}"
    return Child(SIMULATOR, _python_m("crypto_agent.cli", "simulator", "--host", HOST,
                                      "--port", str(plan.simulator_port)),
                 plan.simulator_port, lambda: http_ok(f"{url}/api/v3/ping"), CHILD_READY_S,
                 plan.settings.stop_grace_s, "exchange simulator (Binance, Fear & Greed, FRED)")


def receiver_child(plan: StackPlan) -> Child | None:
    """The local notification receiver, when the receiver URL is a 127.0.0.1 port."""
    if plan.receiver_port is None:
        return None
    url = f"http://{HOST}:{plan.receiver_port}"
    return Child(RECEIVER, _python_m("crypto_agent.cli", "receiver", "--port", str(plan.receiver_port)),
                 plan.receiver_port, lambda: http_ok(f"{url}/health"), CHILD_READY_S,
                 plan.settings.stop_grace_s, "notification receiver (stands in for Slack)")


def serve_child(plan: StackPlan) -> Child:
    """The one process that runs every deployment's flow runs (deployments/serve.py)."""
    return Child(SERVE, _python_m("deployments.serve"), None, lambda: runner_ready(plan), SERVE_READY_S,
                 SERVE_STOP_GRACE_S, "serving process (runs the flows of every deployment)")


def relay_child(plan: StackPlan) -> Child:
    """The heartbeat relay (deployments/relay.py): the services' heartbeat files as Prefect events."""
    spec = process.child_spec(RELAY, (), plan.settings)
    return Child(RELAY, _python_m("deployments.relay"), None, running_for(spec, RELAY_SETTLE_S), CHILD_READY_S,
                 plan.settings.stop_grace_s, "heartbeat relay (heartbeat files -> Prefect events)")


# --- ports ---


def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port (we could bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def port_holder(port: int) -> str:
    """Who listens on port `port`: "PID n (command)" when the system tells, else "another process"."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    cmd = " ".join(psutil.Process(conn.pid).cmdline())[:120]
                except psutil.Error:
                    cmd = "?"
                return f"PID {conn.pid} ({cmd})"
    except psutil.Error:
        pass
    return "another process"


def ensure_port_free(child: Child) -> None:
    """PortTaken, naming the port and who holds it, when a process not of this stack listens on it."""
    if child.port is None or port_free(child.port):
        return
    setting = {SERVER: "--prefect-port (CRYPTO_AGENT_PREFECT_PORT)",
               SIMULATOR: "--simulator-port (CRYPTO_AGENT_EXCHANGE_URL)",
               RECEIVER: "--receiver-port (CRYPTO_AGENT_RECEIVER_URL)"}.get(child.name, "its port")
    raise PortTaken(
        f"port {child.port} on {HOST}, wanted by the {child.name}, is taken by {port_holder(child.port)}, "
        "which is not part of this stack",
        hint=f"stop that process, or choose another port with {setting}",
    )


# --- the stack record (run/stack.json) ---


def write_record(plan: StackPlan, parts: dict[str, dict[str, Any]]) -> None:
    """Write run/stack.json: the addresses and every part's PID, for `down`, tests and the operator."""
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(plan.record_path, json.dumps({
        "api_url": plan.api_url,
        "ui_url": plan.ui_url,
        "prefect_home": str(plan.prefect_home),
        "project_dir": str(plan.project_dir),
        "exchange_url": plan.settings.exchange_url,
        "receiver_url": plan.settings.receiver_url,
        "db_path": str(plan.settings.db_path),
        "updated_at": time.time(),
        "parts": parts,
    }, indent=2))


def read_record(settings: Settings) -> dict[str, Any] | None:
    """run/stack.json, None when there is none or it is unreadable."""
    try:
        return json.loads((Path(settings.run_dir) / "stack.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- bringing it up ---


@dataclass
class Part:
    """One part of a running stack: name, PID, whether this `up` started it (and so stops it)."""

    name: str
    pid: int | None
    started: bool
    spec: process.ServiceSpec | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"pid": self.pid, "started": self.started}


@dataclass
class Stack:
    """What one `up` holds: the plan and the parts in start order."""

    plan: StackPlan
    parts: list[Part] = field(default_factory=list)

    @property
    def started(self) -> list[Part]:
        """The parts this `up` started (and so stops)."""
        return [p for p in self.parts if p.started]

    def record(self) -> None:
        """Write run/stack.json with every part."""
        write_record(self.plan, {p.name: p.to_dict() for p in self.parts})


def _no_checkpoint() -> None:
    return None


def _wait_ready(child: Child, spec: process.ServiceSpec, timeout_s: float,
                checkpoint: Callable[[], None] = _no_checkpoint) -> bool:
    """Wait until our running child answers; False when it did not within the timeout or it is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        checkpoint()
        if not process.inspect(spec).alive:
            return False
        if child.ready():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def ensure_child(child: Child, plan: StackPlan, env: dict[str, str], out: Console, *, wait: bool = True,
                 checkpoint: Callable[[], None] = _no_checkpoint) -> Part:
    """Reuse our running, answering instance of `child`, else start it; the part.

    With wait=False a new child is only spawned and recorded (call `wait_child` later), so the slow
    Prefect server starts while the rest comes up. `checkpoint` is called while waiting (it raises
    to interrupt; the child is recorded by then, so whoever catches it can stop it).
    """
    spec = child.spec(plan.settings)
    check = process.inspect(spec)
    if check.alive:
        # the arguments decide (ports, options); the interpreter may be reached through another symlink
        if check.record is not None and check.record.cmdline[1:] != list(child.command[1:]):
            raise StackConflict(
                f"the {child.name} of this stack already runs (PID {check.pid}) as "
                f"`{' '.join(check.record.cmdline[1:])}`, not `{' '.join(child.command[1:])}`",
                hint="`crypto-agent down` first to change its port or options, or `up` with the same ones",
            )
        if _wait_ready(child, spec, child.ready_timeout_s, checkpoint):
            out.print(f"{child.name}: already running (PID {check.pid}); reused")
            return Part(child.name, check.pid, False, spec=spec)
        out.print(f"{child.name}: PID {check.pid} runs but does not answer; restarting it")
        process.stop_tree(spec)
    ensure_port_free(child)

    def ready() -> bool:
        checkpoint()
        return child.ready() if wait else True

    result = process.start_child(spec, env=env, ready=ready, cwd=plan.project_dir, timeout_s=child.ready_timeout_s)
    if wait:
        out.print(f"{child.name}: started {child.what}, PID {result.pid}, in {result.elapsed_s:.1f} s "
                  f"(log {spec.log})")
    return Part(child.name, result.pid, True, spec=spec)


def wait_child(child: Child, part: Part, out: Console, checkpoint: Callable[[], None] = _no_checkpoint) -> None:
    """Wait until a child started with wait=False answers; ServiceStartError (it is stopped) when it does not."""
    assert part.spec is not None
    started = time.monotonic()
    if not _wait_ready(child, part.spec, child.ready_timeout_s, checkpoint):
        if process.inspect(part.spec).alive:
            process.stop_tree(part.spec)
            what = f"did not answer within {child.ready_timeout_s:g} s; it was stopped"
        else:
            what = "exited before it answered"
        raise process.ServiceStartError(
            f"the {child.name} {what}",
            hint=f"its log {part.spec.log} ends with:\n{process.tail_text(part.spec.log)}",
        )
    if part.started:
        out.print(f"{child.name}: started {child.what}, PID {part.pid}, ready after "
                  f"{time.monotonic() - started:.1f} s more (log {part.spec.log})")


def ensure_service(name: str, plan: StackPlan, out: Console) -> Part:
    """Reuse the running service `name` (trader, backtest), else start it; the part."""
    settings = plan.settings
    spec = process.service_spec(name, settings)
    check = process.inspect(spec)
    if check.alive:
        report = health.probe(spec, settings)
        out.print(f"{name}: already running; reused ({report.summary})")
        return Part(name, check.pid, False, spec=spec)
    try:
        result = process.start(spec, settings)
    except ServiceAlreadyRunning:  # it came up between our look and the start
        check = process.inspect(spec)
        out.print(f"{name}: already running (PID {check.pid}); reused")
        return Part(name, check.pid, False, spec=spec)
    out.print(f"{name}: started, PID {result.pid}, first heartbeat after {result.elapsed_s:.1f} s (log {result.log})")
    return Part(name, result.pid, True, spec=spec)


def backfill(plan: StackPlan, out: Console, err: Console) -> None:
    """Bring the store up to date for the universe from the exchange, with a progress bar on a terminal."""
    from crypto_agent.cli.data import check_db_writable, progress_bar
    from crypto_agent.collector import collect
    from crypto_agent.exchange import BinanceClient
    from crypto_agent.store import Store

    settings = plan.settings
    check_db_writable(settings)
    started = time.monotonic()
    with ExitStack() as stack:
        client = stack.enter_context(BinanceClient.from_settings(settings))
        client.ping()
        store = stack.enter_context(Store(settings.database_url))
        summary = collect(
            store, client, list(settings.symbols), list(settings.timeframes), mode="update",
            initial_history_days=settings.initial_history_days, progress=progress_bar(stack, err),
        )
    per_tf = {tf: sum(n for (_, t), n in summary.written.items() if t == tf) for tf in settings.timeframes}
    out.print(
        f"store: {settings.db_path}: {summary.total} candles written for {len(settings.symbols)} symbols "
        f"({', '.join(f'{tf}: {n}' for tf, n in per_tf.items())}) in {time.monotonic() - started:.1f} s; "
        f"{len(summary.failures)} failed"
    )
    for symbol, message in summary.failures.items():
        err.print(f"warning: backfill of {symbol} failed: {message}", markup=False)


def runner_ready(plan: StackPlan) -> bool:
    """True when every deployment of prefect.yaml is READY on the server (something polls for its runs)."""
    from prefect import get_client

    wanted = deployment_names(plan.project_dir)
    try:
        with get_client(sync_client=True) as client:
            flows = {f.id: f.name for f in client.read_flows()}
            status = {f"{flows.get(d.flow_id)}/{d.name}": getattr(d.status, "value", d.status)
                      for d in client.read_deployments()}
    except httpx.HTTPError:  # the server is busy or restarting: not ready yet
        return False
    return all(status.get(name) == "READY" for name in wanted)


@functools.lru_cache(maxsize=4)
def deployment_names(project_dir: Path) -> tuple[str, ...]:
    """Every "<flow>/<deployment>" of prefect.yaml, as the serving process names them."""
    from deployments.serve import read_entries

    with _on_path(project_dir):
        return tuple(entry.full_name for entry in read_entries(project_dir))


@contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if added and str(folder) in sys.path:
            sys.path.remove(str(folder))


def register_blocks(plan: StackPlan, out: Console) -> None:
    """The Block types and default documents (escalation on the local receiver)."""
    from blocks.register import register_defaults

    done = register_defaults(plan.settings)
    out.print(f"blocks: types {', '.join(done.block_types)}; documents {', '.join(done.documents)}")


def automations(plan: StackPlan, out: Console) -> None:
    """Create or update the automations declared in code (the triggers of prefect.yaml come with the serving process)."""
    try:
        done = apply_automations(plan)
    except CryptoAgentError as exc:
        # the stack is still of use (flows run by hand and on schedule); say loudly what is missing
        out.print(f"warning: the automations of deployments/automations.py were not applied: {exc}")
        out.print("  the stack runs without those automatic recoveries until `crypto-agent up` is run again")
        return
    if done is not None:
        out.print(f"automations: {done}")


def apply_automations(plan: StackPlan) -> str | None:
    """Create or update the automations of deployments/automations.py (when it exists); what it did."""
    if not (plan.project_dir / "deployments" / "automations.py").is_file():
        return None
    from deployments.automations import apply_automations as apply

    done = apply(plan.settings, plan.project_dir)
    parts = [f"{len(names)} {what}" for what, names in
             (("created", done.created), ("updated", done.updated), ("deleted", done.deleted)) if names]
    parts += [f"not applied: {why}" for why in getattr(done, "skipped", [])]
    return "; ".join(parts) or "none declared"


def foreground_spec(settings: Settings) -> process.ServiceSpec:
    """The pidfile of an `up` that holds the stack in the foreground."""
    return process.child_spec(FOREGROUND, (), settings, stop_grace_s=UP_STOP_GRACE_S)


def claim_foreground(settings: Settings) -> bool:
    """Record this process as the `up` holding the stack; False when another live `up` already does."""
    spec = foreground_spec(settings)
    if process.inspect(spec).alive:
        return False
    me = psutil.Process()
    spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(spec.pid_record, json.dumps({
        "service": FOREGROUND, "pid": me.pid, "create_time": me.create_time(), "cmdline": me.cmdline(),
        "started_at": time.time(),
    }))
    write_atomic(spec.pidfile, f"{me.pid}\n")
    return True


def release_foreground(settings: Settings) -> None:
    """Remove this process's foreground pidfile (only if it is ours)."""
    spec = foreground_spec(settings)
    check = process.inspect(spec)
    if check.pid == os.getpid():
        for path in (spec.pidfile, spec.pid_record):
            path.unlink(missing_ok=True)


class Interrupts:
    """SIGINT, SIGTERM and SIGHUP while the stack comes up or is held: they set `event`; `checkpoint()` raises
    StackInterrupted once one came. The handler raises by itself only inside `raising()` (the backfill),
    never while a child is being spawned and recorded, so nothing started can go unrecorded."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: str | None = None
        self._raise_now = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = not self.event.is_set()
        self.received = self.received or signal.Signals(signum).name
        self.event.set()
        if first and self._raise_now:
            self._raise_now = False
            raise self._error()

    def _error(self) -> StackInterrupted:
        return StackInterrupted(f"{self.received} received while the stack came up",
                                hint="what this `up` had started was stopped; run it again to bring the stack up")

    def checkpoint(self) -> None:
        """Raise StackInterrupted if a signal came."""
        if self.event.is_set():
            raise self._error()

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Inside, a signal raises at once (for long work that starts no process)."""
        self.checkpoint()
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False


@contextmanager
def prefect_client_env(plan: StackPlan) -> Iterator[None]:
    """This process talks to the stack's server with the stack's home: environment and Prefect settings."""
    saved = {k: os.environ.get(k) for k in (*prefect_env(plan), *DROPPED_ENV, "PYTHONPATH")}
    os.environ.update(prefect_env(plan))
    for name in DROPPED_ENV:
        os.environ.pop(name, None)
    os.environ["PYTHONPATH"] = child_env(plan)["PYTHONPATH"]
    try:
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with (temporary_settings(updates={PREFECT_API_URL: plan.api_url, PREFECT_HOME: plan.prefect_home}),
              _on_path(plan.project_dir)):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bring_up(plan: StackPlan, out: Console, err: Console, interrupts: Interrupts | None = None) -> Stack:
    """Bring every part up in order, reusing what runs; on any failure stop what this call started, then raise."""
    stack = Stack(plan)
    env = child_env(plan)
    checkpoint = interrupts.checkpoint if interrupts is not None else _no_checkpoint
    plan.prefect_home.mkdir(parents=True, exist_ok=True)

    def add(name: str, start: Callable[[], Part]) -> Part:
        was_running = process.inspect(part_spec(name, plan.settings)).alive
        try:
            part = start()
        except BaseException:
            if not was_running:  # whatever it got to start is ours to stop: `stop_part` goes by its pidfile
                stack.parts.append(Part(name, None, True))
            raise
        stack.parts.append(part)
        checkpoint()
        return part

    try:
        with prefect_client_env(plan):
            server = server_child(plan)
            server_part = add(SERVER, lambda: ensure_child(server, plan, env, out, wait=False))
            if server_part.started:
                out.print(f"{SERVER}: starting (PID {server_part.pid}, home {plan.prefect_home})")
            for child in (simulator_child(plan), receiver_child(plan)):
                if child is not None:
                    add(child.name, lambda c=child: ensure_child(c, plan, env, out, checkpoint=checkpoint))
            stack.record()
            with interrupts.raising() if interrupts is not None else nullcontext():
                backfill(plan, out, err)
            for name in SERVICES:
                add(name, lambda n=name: ensure_service(n, plan, out))
            wait_child(server, server_part, out, checkpoint)
            out.print(f"{SERVER}: UI {plan.ui_url}  API {plan.api_url}")
            register_blocks(plan, out)
            checkpoint()
            # The serving process creates or updates every deployment of prefect.yaml, with its schedules
            # and triggers, as it starts; `prefect deploy` of the same deployments first would leave them
            # pointing at the work pool's pull step, which a served run cannot follow.
            serve = add(SERVE, lambda: ensure_child(serve_child(plan), plan, env, out, checkpoint=checkpoint))
            out.print(f"deployments: {len(deployment_names(plan.project_dir))} from prefect.yaml, "
                      f"served by PID {serve.pid}")
            automations(plan, out)
            checkpoint()
            add(RELAY, lambda: ensure_child(relay_child(plan), plan, env, out, checkpoint=checkpoint))
            stack.record()
    except BaseException:
        if stack.started:
            err.print("stopping what this `up` started ...")
            stop_parts(stack.started, plan.settings, out)
        raise
    return stack


# --- stopping ---


def part_spec(name: str, settings: Settings) -> process.ServiceSpec:
    """The process-control spec of a part by name (its pidfile, record and stop grace)."""
    if name in SERVICES:
        return process.service_spec(name, settings)
    if name == SERVE:
        return process.child_spec(name, (), settings, stop_grace_s=SERVE_STOP_GRACE_S)
    return process.child_spec(name, (), settings)


def stop_part(name: str, settings: Settings) -> str:
    """Stop one part of the stack by its pidfile (ours only: never a stranger's PID); one line saying how."""
    spec = part_spec(name, settings)
    # SIGTERM first: the serving process then cancels its flow runs cleanly (SIGINT would leave them RUNNING)
    try:
        result = process.stop_tree(spec)
    except process.NotOurProcess as exc:
        if name in SERVICES:
            raise
        # our child is gone and its PID now belongs to another process: signal nothing, drop the stale files
        process.clean_state(spec)
        return f"{name}: not signalled, its PID is another process now ({exc.message}); stale pidfile removed"
    if not result.was_running:
        return f"{name}: was not running"
    return f"{name}: stopped PID {result.pid} with {result.signal} in {result.elapsed_s:.1f} s"


def stop_parts(parts: list[Part], settings: Settings, out: Console) -> list[str]:
    """Stop `parts` in the reverse of the start order; the problems met (a part is never skipped for another's)."""
    problems = []
    for part in sorted(parts, key=lambda p: START_ORDER.index(p.name), reverse=True):
        try:
            out.print(stop_part(part.name, settings))
        except CryptoAgentError as exc:
            problems.append(f"{part.name}: {exc}")
            out.print(f"[red]{part.name}: {exc.message}[/red]")
    return problems


def bring_down(settings: Settings, out: Console) -> list[str]:
    """Stop the whole stack: a foreground `up` first (it stops its parts), then every part left, in reverse order."""
    problems = []
    up_spec = foreground_spec(settings)
    check = process.inspect(up_spec)
    if check.alive:
        out.print(f"up: asking the foreground `crypto-agent up` (PID {check.pid}) to stop its stack")
        try:
            result = process.stop(up_spec)
            out.print(f"up: PID {result.pid} stopped in {result.elapsed_s:.1f} s")
        except CryptoAgentError as exc:
            problems.append(f"up: {exc}")
    problems += stop_parts([Part(name, None, True) for name in START_ORDER], settings, out)
    if not problems:
        (Path(settings.run_dir) / "stack.json").unlink(missing_ok=True)
    return problems


def summary_lines(stack: Stack) -> list[str]:
    """What the operator needs after `up`: the addresses, the env lines for another terminal, how to stop."""
    plan = stack.plan
    s = plan.settings
    lines = [
        "",
        "the stack is up:",
        f"  Prefect UI      {plan.ui_url}" if plan.ui else "  Prefect UI      off (--no-ui)",
        f"  Prefect API     {plan.api_url}   (home {plan.prefect_home})",
    ]
    if plan.simulator_port is not None:
        lines.append(f"  exchange        {s.exchange_url}   (bundled simulator)")
    else:
        lines.append(f"  exchange        {s.exchange_url}")
    if plan.receiver_port is not None:
        lines.append(f"  notifications   {s.receiver_url}/messages   (local receiver)")
    lines += [
        f"  store           {s.db_path}",
        f"  logs            {s.logs_dir}",
        "  processes       " + ", ".join(f"{p.name} {p.pid}" + ("" if p.started else " (reused)")
                                      for p in stack.parts),
        "",
        "from another terminal:",
        f"  export PREFECT_API_URL={plan.api_url}",
        f"  export PREFECT_HOME={plan.prefect_home}",
        "  prefect deployment ls",
        "  prefect deployment run integrity-check/quick",
        "  crypto-agent status --service backtest",
    ]
    return lines


def run_up(plan: StackPlan, *, detach: bool, out: Console, err: Console) -> int:
    """`crypto-agent up`: bring the stack up; with detach return, else hold it until Ctrl-C/SIGTERM and stop it."""
    started = time.monotonic()
    with Interrupts() as interrupts:
        stack = bring_up(plan, out, err, interrupts)
        elapsed = time.monotonic() - started
        for line in summary_lines(stack):
            out.print(line, markup=False, highlight=False)
        out.print(f"up in {elapsed:.1f} s")
        if detach:
            out.print("detached: `crypto-agent down` stops it all")
            return 0
        if not claim_foreground(plan.settings):
            out.print("another `crypto-agent up` holds this stack in the foreground; Ctrl-C there or "
                      "`crypto-agent down` stops it")
            return 0
        try:
            reused = [p.name for p in stack.parts if not p.started]
            out.print("Ctrl-C (or SIGTERM, or `crypto-agent down`) stops what this `up` started"
                      + (f"; it leaves running what it reused: {', '.join(reused)}" if reused else ""))
            watch(stack, interrupts.event, out)
            out.print(f"{interrupts.received}: stopping the stack ...")
            problems = stop_parts(stack.started, plan.settings, out)
            if not problems and len(stack.started) == len(stack.parts):
                plan.record_path.unlink(missing_ok=True)
        finally:
            release_foreground(plan.settings)
    out.print("stopped" if not problems else f"stopped, with problems: {'; '.join(problems)}")
    return 0 if not problems else 1


def watch(stack: Stack, interrupted: threading.Event, out: Console) -> None:
    """Hold the foreground until interrupted; say once when a child of the stack is gone."""
    told: set[str] = set()
    while not interrupted.wait(2.0):
        for part in stack.parts:
            if part.spec is None or part.name in told or part.name in SERVICES:
                continue  # the services are the recovery flows' business (they restart them)
            if not process.inspect(part.spec).alive:
                told.add(part.name)
                out.print(f"warning: {part.name} (PID {part.pid}) is gone; its log: {part.spec.log}")
