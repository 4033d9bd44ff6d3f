"""Flow tests: one Prefect test server for the session, the real simulator and receiver on 127.0.0.1,
a real SQLite store in tmp_path."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[2]
# flows/, blocks/ and deployments/ sit beside crypto_agent/ at the top of the project.
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))
# No network: without this the test server logs a telemetry error at start.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from flow_kit import TEST_HISTORY_DAYS, TEST_SYMBOLS  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from crypto_agent.receiver import Receiver  # noqa: E402
from crypto_agent.settings import load_settings  # noqa: E402
from crypto_agent.simulator import Simulator  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[None]:
    """One Prefect test server (SQLite in a temp folder) for every flow test."""
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def receiver(prefect_server: None) -> Iterator[Receiver]:
    """The local webhook receiver, with the default escalation block pointing at it."""
    from blocks.register import register_defaults

    with Receiver(port=0) as r:
        register_defaults(load_settings(receiver_url=r.url), fred_api_key=None)
        yield r


@pytest.fixture
def inbox(receiver: Receiver) -> Receiver:
    """The receiver, emptied for this test."""
    receiver.clear()
    receiver.respond_with(200)
    return receiver


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    """A Binance-compatible simulator (plus Fear & Greed and FRED) on a free port, for the test symbols."""
    with Simulator(port=0, symbols=TEST_SYMBOLS, seed=7, history_days=TEST_HISTORY_DAYS + 10) as sim:
        yield sim


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Settings overrides (the flows' `settings` parameter) for a store in tmp_path and a simulator."""

    def make(sim: Simulator | None = None, **extra: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "home": str(tmp_path),
            "symbols": list(TEST_SYMBOLS),
            "initial_history_days": TEST_HISTORY_DAYS,
            "request_retries": 1,
            "retry_backoff_s": 0.05,
        }
        if sim is not None:
            values.update(
                exchange_url=sim.url, fear_greed_url=f"{sim.url}/fng/", fred_url=f"{sim.url}/fred"
            )
        values.update(extra)
        return values

    return make


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flows read the environment: keep the developer's config and keys out of the tests."""
    for name in ("CRYPTO_AGENT_CONFIG", "CRYPTO_AGENT_FRED_API_KEY", "CRYPTO_AGENT_HOME"):
        monkeypatch.delenv(name, raising=False)
