"""End-to-end tests of the whole stack, started as the README says: `crypto-agent up --detach` as a real
subprocess, on free ports, in a temporary home, with a small universe and a short history (tests/stack_kit.py).

One stack serves the session (the browser test too); the test that runs `crypto-agent down` goes last.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
# flows/, blocks/, deployments/ and tests/ sit beside crypto_agent/ at the top of the project.
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from tests.stack_kit import RunningStack, start_stack, sweep  # noqa: E402

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
    """The whole stack (every deployment, the UI), up for the session; stopped at the end unless the down test ran."""
    home = tmp_path_factory.mktemp("stack-home")
    running = start_stack(home, ui=True)
    print(f"\n`crypto-agent up --detach` from cold: {running.up_seconds:.1f} s ({running.up_wall_s:.1f} s wall)")
    try:
        yield running
    finally:
        if running.down is None:
            running.close()
        sweep(home)
