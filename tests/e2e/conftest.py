"""End-to-end recovery tests: one rehearsal stack for the module, brought up as an operator does
(`crypto-agent up --detach --only <the monitor and the five recoveries>` in a temporary home, on free ports,
with the short limits of tests/stack_kit.py's REHEARSAL_SETTINGS), real processes, real faults."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
# flows/, blocks/, deployments/ and tests/ sit beside crypto_agent/ at the top of the project.
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from tests.stack_kit import RunningStack, start_rehearsal  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of these tests."""
    config.addinivalue_line("markers", "e2e: end to end against a real Prefect server and real processes (minutes)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """The rehearsal stack: server, simulator, receiver, trader, daemon, serving process and relay in a tmp home."""
    for name in ("CRYPTO_AGENT_CONFIG", "CRYPTO_AGENT_HOME", "CRYPTO_AGENT_DAEMON_FAULT"):
        os.environ.pop(name, None)
    started = time.monotonic()
    running = start_rehearsal(tmp_path_factory.mktemp("e2e"))
    print(f"\nrehearsal `crypto-agent up --detach`: {running.up_seconds:.1f} s ({running.up_wall_s:.1f} s wall), "
          f"ready with its backups after {time.monotonic() - started:.1f} s")
    try:
        yield running
    finally:
        running.close()
