"""What the stack is made of and where it lives: the part names and their order, the plan (settings with the
ports applied, the Prefect home, the deployments served), the environment of every child, run/stack.json."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from crypto_agent import process
from crypto_agent.errors import ConfigError, CryptoAgentError, InputError
from crypto_agent.service import write_atomic
from crypto_agent.settings import Settings, load_settings

PROJECT_DIR = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

# Start order; `down` and Ctrl-C stop in the reverse order.
SERVER, SIMULATOR, RECEIVER, TRADER, DAEMON, SERVE, RELAY, KEEPER, LITESTREAM = (
    "prefect-server", "simulator", "receiver", "trader", "backtest", "serve", "relay", "keeper", "litestream",
)
START_ORDER: tuple[str, ...] = (SERVER, SIMULATOR, RECEIVER, TRADER, DAEMON, LITESTREAM, RELAY, SERVE, KEEPER)
# What the keeper (deployments/keeper.py) restarts when it dies; it starts last and `down` stops it first.
KEPT = (SERVER, SIMULATOR, RECEIVER, LITESTREAM, SERVE, RELAY)
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
    only: tuple[str, ...] = ()  # the "<flow>/<deployment>"s served; () serves every one of prefect.yaml

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

    @property
    def served(self) -> tuple[str, ...]:
        """The deployments the serving process serves: those of --only, else every one of prefect.yaml."""
        return self.only or deployment_names(self.project_dir)


def _local_port(url: str) -> int | None:
    parts = urlsplit(url)
    return parts.port if parts.hostname in LOCAL_HOSTS and parts.port is not None else None


def _check_port(option: str, port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise InputError(f"{option} {port} is out of range", hint="use a port between 1 and 65535")


def _check_only(only: tuple[str, ...], project_dir: Path) -> None:
    known = deployment_names(project_dir)
    unknown = [name for name in only if name not in known]
    if unknown:
        raise InputError(f"--only {', '.join(unknown)}: no such deployment in prefect.yaml",
                         hint=f"name <flow>/<deployment>, one of: {', '.join(known)}")


def plan_stack(
    *,
    prefect_port: int | None = None,
    simulator_port: int | None = None,
    receiver_port: int | None = None,
    ui: bool = True,
    only: tuple[str, ...] | list[str] = (),
    project_dir: Path = PROJECT_DIR,
) -> StackPlan:
    """The plan of the stack from the settings and the options; InputError/ConfigError on bad values."""
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
    only = tuple(dict.fromkeys(only))
    if only:
        _check_only(only, project_dir)
    return StackPlan(
        settings=settings,
        project_dir=project_dir,
        prefect_home=settings.prefect_home.absolute(),
        prefect_port=settings.prefect_port,
        simulator_port=_local_port(settings.exchange_url),
        receiver_port=_local_port(settings.receiver_url),
        ui=ui,
        only=only,
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
        # concurrency leases on disk (PREFECT_HOME/concurrency_leases), not in the server's memory: a recovery
        # interrupted by a server restart never leaves its slots taken forever (Prefect issue 17415)
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
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
              on_path(plan.project_dir)):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def on_path(folder: Path) -> Iterator[None]:
    """`folder` on sys.path inside (flows/, blocks/ and deployments/ import from the project folder)."""
    added = str(folder) not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        if added and str(folder) in sys.path:
            sys.path.remove(str(folder))


@functools.lru_cache(maxsize=4)
def deployment_names(project_dir: Path) -> tuple[str, ...]:
    """Every "<flow>/<deployment>" of prefect.yaml, as the serving process names them."""
    from deployments.serve import read_entries

    with on_path(project_dir):
        return tuple(entry.full_name for entry in read_entries(project_dir))


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
        "only": list(plan.only),
        "updated_at": time.time(),
        "parts": parts,
    }, indent=2))


def read_record(settings: Settings) -> dict[str, Any] | None:
    """run/stack.json, None when there is none or it is unreadable."""
    try:
        record: dict[str, Any] = json.loads((Path(settings.run_dir) / "stack.json").read_text(encoding="utf-8"))
        return record
    except (OSError, ValueError):
        return None
