"""The parts of the stack and their process control: the children that write no pidfile themselves (server,
simulator, receiver, serving process, relay), the two services, their ports, and starting or stopping one."""

from __future__ import annotations

import functools
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from rich.console import Console

from crypto_agent import health, process
from crypto_agent.errors import CryptoAgentError
from crypto_agent.service import ServiceAlreadyRunning
from crypto_agent.settings import Settings
from deployments.stack.plan import (
    CHILD_READY_S,
    HOST,
    HTTP_TIMEOUT_S,
    KEEPER,
    LITESTREAM,
    RECEIVER,
    RELAY,
    RELAY_SETTLE_S,
    SERVE,
    SERVE_READY_S,
    SERVE_STOP_GRACE_S,
    SERVER,
    SERVER_READY_S,
    SERVICES,
    SIMULATOR,
    START_ORDER,
    PortTaken,
    StackConflict,
    StackPlan,
    write_record,
)


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
    environment: Callable[[dict[str, str]], dict[str, str]] | None = None  # its env from the stack's, if not that

    def env(self, stack_env: dict[str, str]) -> dict[str, str]:
        """The environment it starts with."""
        return stack_env if self.environment is None else self.environment(stack_env)

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
    """The one process that runs the flow runs of every deployment (deployments/serve.py), or of --only's."""
    command = _python_m("deployments.serve")
    if plan.only:
        command += ("--only", *plan.only)
    what = "serving process (runs the flows of " + (
        f"{len(plan.only)} deployments: --only)" if plan.only else "every deployment)")
    return Child(SERVE, command, None, lambda: runner_ready(plan), SERVE_READY_S, SERVE_STOP_GRACE_S, what)


def relay_child(plan: StackPlan) -> Child:
    """The heartbeat relay (deployments/relay.py): the services' heartbeat files as Prefect events."""
    spec = process.child_spec(RELAY, (), plan.settings)
    return Child(RELAY, _python_m("deployments.relay"), None, running_for(spec, RELAY_SETTLE_S), CHILD_READY_S,
                 plan.settings.stop_grace_s, "heartbeat relay (heartbeat files -> Prefect events)")


def litestream_child(plan: StackPlan) -> Child | None:
    """Litestream replicating the store to its replica (crypto_agent/replica.py), when replication is on."""
    from crypto_agent import replica

    if not replica.available(plan.settings):
        return None
    spec = process.child_spec(LITESTREAM, (), plan.settings)
    target = plan.settings.replica_url or str(plan.settings.replica_dir)
    return Child(LITESTREAM, replica.replicate_command(plan.settings), None, running_for(spec, RELAY_SETTLE_S),
                 CHILD_READY_S, plan.settings.stop_grace_s,
                 f"Litestream (the store replicated to {target} every {plan.settings.replica_sync_interval_s:g} s)",
                 functools.partial(replica.litestream_env, plan.settings))


def keeper_child(plan: StackPlan) -> Child:
    """The keeper (deployments/keeper.py): restarts a part of the stack that dies, with a backoff, and tells L2."""
    spec = process.child_spec(KEEPER, (), plan.settings)
    command = _python_m("deployments.keeper") + (() if plan.ui else ("--no-ui",))
    if plan.only:
        command += ("--only", *plan.only)
    return Child(KEEPER, command, None, running_for(spec, RELAY_SETTLE_S), CHILD_READY_S, plan.settings.stop_grace_s,
                 "stack keeper (restarts a dead server, simulator, receiver, serving process or relay)")


def runner_ready(plan: StackPlan) -> bool:
    """True when every deployment served is READY on the server (something polls for its runs)."""
    from prefect import get_client

    wanted = plan.served
    try:
        with get_client(sync_client=True) as client:
            flows = {f.id: f.name for f in client.read_flows()}
            status = {f"{flows.get(d.flow_id)}/{d.name}": getattr(d.status, "value", d.status)
                      for d in client.read_deployments()}
    except httpx.HTTPError:  # the server is busy or restarting: not ready yet
        return False
    return all(status.get(name) == "READY" for name in wanted)


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


# --- a running stack ---


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


def no_checkpoint() -> None:
    """The checkpoint of a bring-up nothing interrupts."""
    return None


def _wait_ready(child: Child, spec: process.ServiceSpec, timeout_s: float,
                checkpoint: Callable[[], None] = no_checkpoint) -> bool:
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
                 checkpoint: Callable[[], None] = no_checkpoint) -> Part:
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

    result = process.start_child(spec, env=child.env(env), ready=ready, cwd=plan.project_dir,
                                 timeout_s=child.ready_timeout_s)
    if wait:
        out.print(f"{child.name}: started {child.what}, PID {result.pid}, in {result.elapsed_s:.1f} s "
                  f"(log {spec.log})")
    return Part(child.name, result.pid, True, spec=spec)


def wait_child(child: Child, part: Part, out: Console, checkpoint: Callable[[], None] = no_checkpoint) -> None:
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
