"""End-to-end tests of the whole stack, started as the README says: `crypto-agent up --detach` as a real
subprocess, on free ports, in a temporary home, with a small universe and a short history.

One stack serves the session (the browser test too); the test that runs `crypto-agent down` goes last.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from stack_kit import (
    DOWN_TIMEOUT_S,
    UP_TIMEOUT_S,
    RunningStack,
    free_port,
    run_cli,
    stack_env,
    up_seconds,
)

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
