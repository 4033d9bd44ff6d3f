"""The one test kit of a running stack, started exactly as an operator starts it: `crypto-agent up --detach` as a
real subprocess (free ports, a temporary home, a small universe, settings as CRYPTO_AGENT_* in its environment),
stopped with `crypto-agent down`. Used by tests/stack, tests/e2e and bench/bench_recovery.py.

- Bring-up: `stack_env`, `start_stack` (any configuration), `start_rehearsal` (the runbook rehearsal: the
  monitor and the five recoveries served, short limits, two good backups); `RunningStack.close()` runs
  `down` and reports any process of the home left behind.
- Observing: `wait`, `probe`, `pid`, `incidents`, `closed_incident`, `messages` (the receiver's log),
  `flow_runs`, `run_monitor`, `send_event` (a flapping monitor), the Prefect client `api`.
- Faults are crypto_agent.faults' (the one catalogue): `faults.kill(stack.settings, "backtest")`, ...
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import psutil
import yaml

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from crypto_agent import backup, health, incidents, process  # noqa: E402
from crypto_agent.health import HealthStatus, ProbeReport  # noqa: E402
from crypto_agent.incidents import Incident  # noqa: E402
from crypto_agent.settings import Settings, load_settings  # noqa: E402
from crypto_agent.store import check_integrity  # noqa: E402
from deployments.stack import part_spec  # noqa: E402
from flows.events import MONITOR_DEPLOYMENT  # noqa: E402

T = TypeVar("T")
HOST = "127.0.0.1"
CRYPTO_AGENT = str(Path(sys.executable).parent / "crypto-agent")
PREFECT = str(Path(sys.executable).parent / "prefect")
STACK_SYMBOLS = "BTCUSDT,ETHUSDT,SOLUSDT"
UP_TIMEOUT_S = 240.0
DOWN_TIMEOUT_S = 240.0
FLOW_RUN_TIMEOUT_S = 120.0
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# What a rehearsal serves (`up --only`): the monitor and the five recoveries, so no nightly job and no
# window guard fires by the clock in the middle of it.
REHEARSAL_DEPLOYMENTS = (
    MONITOR_DEPLOYMENT,
    "recover-daemon-crash/auto",
    "recover-stale-data/auto",
    "recover-db-corruption/auto",
    "recover-process-hang/auto",
    "rollback-persistent-failures/auto",
)
REHEARSAL_SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")
# Limits short enough to rehearse in seconds what the runbook counts in minutes.
REHEARSAL_SETTINGS: dict[str, Any] = {
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


class StackKitError(RuntimeError):
    """The stack did not come up, or a wait ran out."""


def free_port() -> int:
    """A port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def settings_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """Settings as the CRYPTO_AGENT_<FIELD> environment variables `crypto-agent` reads (lists comma-separated)."""
    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)

    return {f"CRYPTO_AGENT_{name.upper()}": text(value) for name, value in settings.items()}


def stack_env(home: Path, prefect_port: int, simulator_port: int, receiver_port: int,
              settings: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The environment of `crypto-agent` commands on that stack: nobody's config, our ports, a small universe
    (STACK_SYMBOLS, 10 days), then `settings` (by field name) over those."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTO_AGENT_", "PREFECT_"))}
    sim = f"http://{HOST}:{simulator_port}"
    env.update({
        "CRYPTO_AGENT_HOME": str(home),
        "CRYPTO_AGENT_SYMBOLS": STACK_SYMBOLS,
        "CRYPTO_AGENT_INITIAL_HISTORY_DAYS": "10",
        "CRYPTO_AGENT_DAEMON_LOOKBACK_DAYS": "10",
        "CRYPTO_AGENT_PREFECT_PORT": str(prefect_port),
        "CRYPTO_AGENT_EXCHANGE_URL": sim,
        "CRYPTO_AGENT_FEAR_GREED_URL": f"{sim}/fng/",
        "CRYPTO_AGENT_FRED_URL": f"{sim}/fred",
        "CRYPTO_AGENT_RECEIVER_URL": f"http://{HOST}:{receiver_port}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })
    env.update(settings_env(settings or {}))
    return env


def settings_of(env: Mapping[str, str]) -> Settings:
    """The settings the stack's processes see: the CRYPTO_AGENT_* of `env`, none of this process's own."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("CRYPTO_AGENT_")}
    try:
        for name in saved:
            del os.environ[name]
        os.environ.update({k: v for k, v in env.items() if k.startswith("CRYPTO_AGENT_")})
        return load_settings()
    finally:
        for name in [k for k in os.environ if k.startswith("CRYPTO_AGENT_")]:
            del os.environ[name]
        os.environ.update(saved)


def run_cli(args: list[str], env: dict[str, str], timeout_s: float,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `crypto-agent <args>` as a real subprocess; its output, whatever its exit code."""
    return subprocess.run([CRYPTO_AGENT, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)


def up_seconds(output: str) -> float:
    """The "up in N s" figure `up` prints."""
    found = re.search(r"up in ([0-9.]+) s", output)
    return float(found.group(1)) if found else float("nan")


@dataclass
class RunningStack:
    """A stack brought up by `crypto-agent up --detach` for the tests."""

    home: Path
    env: dict[str, str]
    prefect_port: int
    simulator_port: int
    receiver_port: int
    up: subprocess.CompletedProcess[str]
    up_seconds: float
    record: dict[str, Any]
    down: subprocess.CompletedProcess[str] | None = None
    seen_pids: dict[str, int] = field(default_factory=dict)
    up_wall_s: float = 0.0

    # --- where it is ---

    @property
    def api_url(self) -> str:
        """PREFECT_API_URL of the stack."""
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def ui_url(self) -> str:
        """The Prefect UI of the stack."""
        return f"http://{HOST}:{self.prefect_port}"

    @cached_property
    def settings(self) -> Settings:
        """The settings of every part of the stack."""
        return settings_of(self.env)

    def read_record(self) -> dict[str, Any]:
        """run/stack.json as it is now."""
        record: dict[str, Any] = json.loads((self.home / "run" / "stack.json").read_text())
        return record

    def prefect_env(self) -> dict[str, str]:
        """The environment of a `prefect` command from another terminal, as `up` says."""
        return {**self.env, "PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.home / ".prefect")}

    def pids(self) -> dict[str, int]:
        """Every PID the stack recorded: the parts of stack.json and the pidfiles under run/."""
        found = {name: part["pid"] for name, part in self.read_record()["parts"].items() if part.get("pid")}
        for pidfile in (self.home / "run").glob("*.pid"):
            text = pidfile.read_text().strip()
            if text.isdigit():
                found.setdefault(pidfile.stem, int(text))
        return found

    # --- waiting and looking ---

    def alive(self, part: str) -> bool:
        """Whether our process of a part (prefect-server, serve, relay, trader, ...) runs."""
        return process.inspect(part_spec(part, self.settings)).alive

    def wait(self, predicate: Callable[[], T], timeout_s: float, what: str, *, alive: str | None = None,
             every_s: float = 0.25) -> T:
        """Poll until predicate() is truthy; its value. StackKitError at the timeout, or when part `alive` is gone."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if alive is not None and not self.alive(alive):
                raise StackKitError(f"{alive} is gone while waiting for {what}; its log ends with:\n{self.tail(alive)}")
            if time.monotonic() > deadline:
                raise StackKitError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(every_s)

    def tail(self, part: str, lines: int = 40) -> str:
        """The end of a part's log (prefect-server, serve, relay, simulator, receiver, trader, backtest)."""
        return process.tail_text(part_spec(part, self.settings).log, lines)

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
        """What the receiver got, from its log (on /l1, /l2, /l3 when `level` is given), at or after `since` (ISO)."""
        try:
            lines = self.settings.receiver_log.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        got = []
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:  # the line being written
                continue
            if (level is None or message.get("path") == f"/{level}") and (
                    since is None or message["received_at"] >= since):
                got.append(message)
        return got

    def integrity_ok(self) -> bool:
        """Whether PRAGMA quick_check of the live database says ok."""
        try:
            return check_integrity(self.settings.db_path).ok
        except Exception:  # noqa: BLE001 (a file being replaced by a restore cannot be checked this instant)
            return False

    # --- Prefect ---

    @contextmanager
    def using_api(self) -> Iterator[None]:
        """Inside, this process's Prefect client (get_client, run_deployment, automations) talks to the stack."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def flow_runs(self, flow_name: str) -> list[Any]:
        """The flow runs of a flow, newest first."""
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName
        from prefect.client.schemas.sorting import FlowRunSort

        with api(self) as client:
            return list(client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                              sort=FlowRunSort.START_TIME_DESC, limit=50))

    def approve_rollback(self, timeout_s: float, by: str = "the on-call lead", approve: bool = True) -> str:
        """Answer the rollback's gate as a person does in the UI (the paused run's form, then Resume); its run id."""
        from prefect.flow_runs import resume_flow_run

        def paused() -> Any:
            return next((r for r in self.flow_runs("rollback-persistent-failures")
                         if r.state is not None and r.state.is_paused()), None)

        run = self.wait(paused, timeout_s, "the rollback to wait at its approval gate", alive="serve")
        with self.using_api():
            resume_flow_run(run.id, run_input={"approve": approve, "by": by, "note": "answered by the test"})
        return str(run.id)

    def run_monitor(self, wait_s: float = 0.0, parameters: dict[str, Any] | None = None) -> str:
        """Run the health monitor now, as its schedule would (through its deployment); the flow run id.

        With wait_s, return once that run has ended (StackKitError after wait_s); `parameters` as
        `prefect deployment run --param` would give them (settings overrides of this round, for one).
        """
        from prefect.deployments import run_deployment

        with self.using_api():
            run_id = run_deployment(MONITOR_DEPLOYMENT, parameters=parameters or {}, timeout=0).id
        if wait_s:
            def ended() -> bool:
                with api(self) as client:
                    state = client.read_flow_run(run_id).state
                return state is not None and state.is_final()
            self.wait(ended, wait_s, "the health monitor's run to end", alive="serve")
        return str(run_id)

    def send_event(self, name: str, resource_id: str, payload: dict[str, Any], times: int = 1) -> None:
        """Send an event `times` times straight to the stack's server, as a flapping monitor would."""
        import asyncio

        from prefect.events.clients import PrefectEventsClient
        from prefect.events.schemas.events import Event

        async def send() -> None:
            async with PrefectEventsClient(api_url=self.api_url) as client:
                for _ in range(times):
                    await client.emit(Event(event=name, resource={"prefect.resource.id": resource_id},
                                            payload={**payload, "detected_at": datetime.now(UTC).isoformat()}))

        asyncio.run(send())

    # --- acting as an operator would ---

    def start_service(self, service: str) -> int:
        """`crypto-agent service start <service>`; its PID."""
        done = run_cli(["service", "start", service], self.env, 120, cwd=self.home)
        if done.returncode != 0:
            raise StackKitError(f"`service start {service}` failed: {done.stderr.strip()[-2000:]}")
        pid = self.pid(service)
        if pid is None:
            raise StackKitError(f"{service} is not running after its start")
        return pid

    def seed_backups(self, days_ago: tuple[int, ...] = (2, 1)) -> list[str]:
        """Take good backups of the live store dated `days_ago` back (the 48 h one a rollback needs, yesterday's
        a restore needs); their names."""
        now = datetime.now(UTC)
        return [backup.create(self.settings.db_path, self.settings.backup_dir, now=now - timedelta(days=d)).name
                for d in days_ago]

    def stop_part(self, part: str) -> int | None:
        """Stop one part by its pidfile (SIGTERM, SIGKILL after its grace); None when it did not run, 0 when it
        exited on SIGTERM within its grace, else -9."""
        result = process.stop_tree(part_spec(part, self.settings))
        if not result.was_running:
            return None
        if result.exit_code is not None:
            return result.exit_code
        return 0 if result.signal == "SIGTERM" else -signal.SIGKILL

    def close(self) -> list[str]:
        """`crypto-agent down`, then kill any process whose environment names this home; what was left (a clean
        stack leaves nothing: [])."""
        left = []
        if self.down is None:
            self.down = run_cli(["down"], self.env, DOWN_TIMEOUT_S, cwd=self.home)
            if self.down.returncode != 0:
                left.append(f"`crypto-agent down` exited {self.down.returncode}: {self.down.stderr.strip()[-500:]}")
        return left + sweep(self.home)


def sweep(home: Path) -> list[str]:
    """Kill what is left of a stack: any process whose environment names `home`, or whose ownership record under
    run/ still matches; their descriptions."""
    left: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("CRYPTO_AGENT_HOME") == str(home) and proc.status() != psutil.STATUS_ZOMBIE:
                left[proc.pid] = proc
        except psutil.Error:
            continue
    for record_path in (home / "run").glob("*.pid.json"):
        try:
            record = json.loads(record_path.read_text())
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["create_time"]) < 0.05 and proc.cmdline() == record["cmdline"]:
                left.setdefault(proc.pid, proc)
        except (OSError, ValueError, KeyError, psutil.Error):
            continue
    told = []
    for proc in left.values():
        try:
            told.append(f"PID {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(left.values()), timeout=10)
    return told


def start_stack(home: Path, *, settings: Mapping[str, Any] | None = None, only: tuple[str, ...] = (),
                ui: bool = False, timeout_s: float = UP_TIMEOUT_S,
                before_up: Callable[[Settings], None] | None = None) -> RunningStack:
    """`crypto-agent up --detach` in `home` on free ports, with `settings` over stack_env's; the running stack.

    `before_up` gets the stack's settings before `up` runs (to prepare its home). StackKitError, with what
    `up` printed, when it fails; whatever it started is stopped then.
    """
    home.mkdir(parents=True, exist_ok=True)
    ports = free_port(), free_port(), free_port()
    env = stack_env(home, *ports, settings)
    if before_up is not None:
        before_up(settings_of(env))
    args = ["up", "--detach"] + ([] if ui else ["--no-ui"]) + [a for name in only for a in ("--only", name)]
    started = time.monotonic()
    try:
        up = run_cli(args, env, timeout_s, cwd=home)
    except subprocess.TimeoutExpired as exc:
        run_cli(["down"], env, DOWN_TIMEOUT_S, cwd=home)
        sweep(home)
        raise StackKitError(f"`crypto-agent {' '.join(args)}` not done within {timeout_s:g} s:\n{exc.stdout}") from None
    wall = time.monotonic() - started
    (home / "up.out").write_text(up.stdout + up.stderr, encoding="utf-8")  # for whoever reads a failure
    if up.returncode != 0:
        sweep(home)
        raise StackKitError(f"`crypto-agent {' '.join(args)}` failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
    record = json.loads((home / "run" / "stack.json").read_text())
    running = RunningStack(home, env, *ports, up=up, up_seconds=up_seconds(up.stdout), record=record, up_wall_s=wall)
    running.seen_pids = running.pids()
    return running


def start_rehearsal(home: Path, *, symbols: tuple[str, ...] = REHEARSAL_SYMBOLS, history_days: int = 20,
                    settings: Mapping[str, Any] | None = None, timeout_s: float = UP_TIMEOUT_S,
                    before_up: Callable[[Settings], None] | None = None,
                    also_serve: tuple[str, ...] = ()) -> RunningStack:
    """The runbook rehearsal: `up --only` the monitor and the five recoveries (and `also_serve`), REHEARSAL_SETTINGS,
    a small universe of `history_days`, then two good backups (2 days and 1 day old) for the restore and the
    rollback."""
    wanted = {"symbols": list(symbols), "initial_history_days": history_days, "daemon_lookback_days": 0,
              **REHEARSAL_SETTINGS, **(settings or {})}
    stack = start_stack(home, settings=wanted, only=(*REHEARSAL_DEPLOYMENTS, *also_serve), timeout_s=timeout_s,
                        before_up=before_up)
    try:
        stack.seed_backups()
    except BaseException:
        stack.close()
        raise
    return stack


# --- Prefect from the test process, prefect.yaml ---


@contextmanager
def api(stack: RunningStack) -> Iterator[Any]:
    """A sync Prefect client on the stack's API."""
    from prefect import get_client

    with stack.using_api(), get_client(sync_client=True) as client:
        yield client


def prefect_yaml() -> dict[str, Any]:
    """The project's prefect.yaml."""
    loaded: dict[str, Any] = yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())
    return loaded


def expected_deployments() -> dict[str, list[str]]:
    """"<flow>/<deployment>" -> its cron schedules, from prefect.yaml (flow names from the entrypoints)."""
    from deployments.stack import deployment_names

    entries = prefect_yaml()["deployments"]
    names = deployment_names(PROJECT_DIR)
    return {name: sorted(s["cron"] for s in entry.get("schedules") or [])
            for name, entry in zip(names, entries, strict=True)}


def deployments_by_name(stack: RunningStack) -> dict[str, Any]:
    """Every deployment on the stack's server as "<flow>/<deployment>"."""
    with api(stack) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}": d for d in client.read_deployments()}


def run_deployment(stack: RunningStack, name: str) -> Any:
    """`prefect deployment run <name>` from another terminal (PREFECT_API_URL as `up` printed it); the flow run,
    once it ended (bounded)."""
    done = subprocess.run([PREFECT, "deployment", "run", name], env=stack.prefect_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert found, done.stdout
    flow_run_id = UUID(found.group(1))
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    with api(stack) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state_type is not None and run.state_type.value in TERMINAL:
                return run
            assert time.monotonic() < deadline, f"flow run {flow_run_id} of {name} still {run.state_name}"
            time.sleep(0.5)
