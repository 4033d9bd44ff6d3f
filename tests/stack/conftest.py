"""End-to-end tests of the whole stack, started as the README says: `crypto-agent up --detach` as a real
subprocess, on free ports, in a temporary home, with a small universe and a short history.

One stack serves the session (the browser test too); the test that runs `crypto-agent down` goes last.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

CRYPTO_AGENT = str(Path(sys.executable).parent / "crypto-agent")
STACK_SYMBOLS = "BTCUSDT,ETHUSDT,SOLUSDT"
UP_TIMEOUT_S = 300.0
DOWN_TIMEOUT_S = 240.0
LAST = "test_down_stops_every_process_and_keeps_the_store"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of these tests."""
    config.addinivalue_line(
        "markers", "stack: end to end: the whole stack as `crypto-agent up` starts it (real server and processes)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The test that stops the stack runs after every other test that uses it."""
    last = [item for item in items if item.name == LAST and "tests/stack" in str(item.path)]
    for item in last:
        items.remove(item)
        items.append(item)


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
    return subprocess.run([CRYPTO_AGENT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)


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


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The whole stack, up for the session; stopped at the end if the down test did not run."""
    home = tmp_path_factory.mktemp("stack-home")
    ports = free_port(), free_port(), free_port()
    env = stack_env(home, *ports)
    started = time.monotonic()
    up = run_cli(["up", "--detach"], env, UP_TIMEOUT_S, cwd=home)
    elapsed = time.monotonic() - started
    running = None
    try:
        assert up.returncode == 0, f"`crypto-agent up --detach` failed:\n{up.stdout}\n{up.stderr}"
        record = json.loads((home / "run" / "stack.json").read_text())
        running = RunningStack(home, env, *ports, up=up, up_seconds=up_seconds(up.stdout), record=record)
        running.seen_pids = running.pids()
        print(f"\n`crypto-agent up --detach` from cold: {up_seconds(up.stdout):.1f} s ({elapsed:.1f} s wall)")
        yield running
    finally:
        if running is None or running.down is None:
            run_cli(["down"], env, DOWN_TIMEOUT_S, cwd=home)
        _kill_leftovers(home)


def _kill_leftovers(home: Path) -> None:
    """Last resort of the fixture: processes whose ownership record under run/ still matches are killed."""
    for record_path in (home / "run").glob("*.pid.json"):
        try:
            record = json.loads(record_path.read_text())
            proc = psutil.Process(record["pid"])
            if abs(proc.create_time() - record["create_time"]) < 0.05 and proc.cmdline() == record["cmdline"]:
                proc.kill()
        except (OSError, ValueError, KeyError, psutil.Error):
            continue
