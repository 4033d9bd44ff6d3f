"""End-to-end recovery tests: one rehearsal stack (deployments/rehearsal.py) for the module, on a real
Prefect server started here (its own home and port), real processes, real faults."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
# flows/, blocks/ and deployments/ sit beside crypto_agent/ at the top of the project.
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from deployments.rehearsal import Rehearsal


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of these tests."""
    config.addinivalue_line("markers", "e2e: end to end against a real Prefect server and real processes (minutes)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rehearsal]:
    """The rehearsal stack: server, serving process, relay, simulator, receiver, trader and daemon in a tmp home."""
    for name in ("CRYPTO_AGENT_CONFIG", "CRYPTO_AGENT_HOME", "CRYPTO_AGENT_DAEMON_FAULT"):
        os.environ.pop(name, None)
    rehearsal = Rehearsal(tmp_path_factory.mktemp("e2e"))
    rehearsal.start()
    try:
        yield rehearsal
    finally:
        rehearsal.close()
