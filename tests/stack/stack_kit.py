"""Helpers of the stack tests: free ports, the stack's environment, `crypto-agent` and `prefect` as real
subprocesses, the Prefect client on the stack's API, and what prefect.yaml declares."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

PROJECT_DIR = Path(__file__).resolve().parents[2]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

CRYPTO_AGENT = str(Path(sys.executable).parent / "crypto-agent")
PREFECT = str(Path(sys.executable).parent / "prefect")
STACK_SYMBOLS = "BTCUSDT,ETHUSDT,SOLUSDT"
UP_TIMEOUT_S = 240.0
DOWN_TIMEOUT_S = 240.0
FLOW_RUN_TIMEOUT_S = 120.0
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    """A port nothing listens on at the moment, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stack_env(home: Path, prefect_port: int, simulator_port: int, receiver_port: int) -> dict[str, str]:
    """The environment of `crypto-agent` commands on that stack: nobody's config, our ports, a small universe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTO_AGENT_", "PREFECT_"))}
    sim = f"http://127.0.0.1:{simulator_port}"
    env.update({
        "CRYPTO_AGENT_HOME": str(home),
        "CRYPTO_AGENT_SYMBOLS": STACK_SYMBOLS,
        "CRYPTO_AGENT_INITIAL_HISTORY_DAYS": "10",
        "CRYPTO_AGENT_DAEMON_LOOKBACK_DAYS": "10",
        "CRYPTO_AGENT_PREFECT_PORT": str(prefect_port),
        "CRYPTO_AGENT_EXCHANGE_URL": sim,
        "CRYPTO_AGENT_FEAR_GREED_URL": f"{sim}/fng/",
        "CRYPTO_AGENT_FRED_URL": f"{sim}/fred",
        "CRYPTO_AGENT_RECEIVER_URL": f"http://127.0.0.1:{receiver_port}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })
    return env


def run_cli(args: list[str], env: dict[str, str], timeout_s: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `crypto-agent <args>` as a real subprocess; its output, whatever its exit code."""
    return subprocess.run([CRYPTO_AGENT, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@dataclass
class RunningStack:
    """A stack brought up by `crypto-agent up --detach` for the tests."""

    home: Path
    env: dict[str, str]
    prefect_port: int
    simulator_port: int
    receiver_port: int
    up: subprocess.CompletedProcess
    up_seconds: float
    record: dict[str, Any]
    down: subprocess.CompletedProcess | None = None
    seen_pids: dict[str, int] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """PREFECT_API_URL of the stack."""
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def ui_url(self) -> str:
        """The Prefect UI of the stack."""
        return f"http://127.0.0.1:{self.prefect_port}"

    def read_record(self) -> dict[str, Any]:
        """run/stack.json as it is now."""
        return json.loads((self.home / "run" / "stack.json").read_text())

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


def up_seconds(output: str) -> float:
    """The "up in N s" figure `up` prints."""
    found = re.search(r"up in ([0-9.]+) s", output)
    return float(found.group(1)) if found else float("nan")



@contextmanager
def api(stack: RunningStack) -> Iterator[Any]:
    """A sync Prefect client on the stack's API."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        yield client


def prefect_yaml() -> dict[str, Any]:
    """The project's prefect.yaml."""
    return yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())


def expected_deployments() -> dict[str, list[str]]:
    """"<flow>/<deployment>" -> its cron schedules, from prefect.yaml (flow names from the entrypoints)."""
    from deployments.stack import deployment_names

    entries = prefect_yaml()["deployments"]
    names = deployment_names(PROJECT_DIR)
    return {name: sorted(s["cron"] for s in entry.get("schedules") or []) for name, entry in zip(names, entries)}


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
