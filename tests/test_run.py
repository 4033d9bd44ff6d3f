"""The README's main command, `crypto-agent run`, on embedded defaults in a temporary home."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from crypto_agent.simulator import Simulator

CLI = [sys.executable, "-m", "crypto_agent.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(home: Path, url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CRYPTO_AGENT_HOME": str(home), "CRYPTO_AGENT_EXCHANGE_URL": url,
           "CRYPTO_AGENT_INITIAL_HISTORY_DAYS": "4"}
    env.pop("CRYPTO_AGENT_CONFIG", None)
    return subprocess.run([*CLI, "run", *args], env=env, cwd=home, capture_output=True, text=True, timeout=timeout)


def test_run_starts_the_simulator_backfills_the_universe_and_reports_ok(tmp_path: Path) -> None:
    result = run_cli(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stderr
    assert "started the bundled simulator" in result.stdout
    assert "data quality: OK" in result.stdout
    with sqlite3.connect(tmp_path / "db" / "crypto_agent.db") as conn:
        symbols_h1 = conn.execute("SELECT COUNT(DISTINCT symbol) FROM ohlcv_h1").fetchone()[0]
        symbols_h4 = conn.execute("SELECT COUNT(DISTINCT symbol) FROM ohlcv_h4").fetchone()[0]
        rows_h1 = conn.execute("SELECT COUNT(*) FROM ohlcv_h1").fetchone()[0]
    assert symbols_h1 == symbols_h4 == 60
    assert rows_h1 >= 60 * 4 * 24 - 60  # four days of hourly candles, the open one excluded


def test_run_reuses_an_exchange_that_already_answers_and_fails_on_a_gapped_one(tmp_path: Path) -> None:
    with Simulator(port=0, history_days=10) as sim:
        now_ms = int(__import__("time").time() * 1000)
        sim.set_faults(gaps=[{"symbol": "BTCUSDT", "interval": None,
                              "start_ms": now_ms - 30 * 3_600_000, "end_ms": now_ms + 3_600_000}])
        result = run_cli(tmp_path, sim.url)
    assert "answers; using it" in result.stdout
    assert result.returncode == 1, result.stdout
    assert "BTCUSDT" in result.stdout and "data quality: FAILED" in result.stdout


def test_run_refuses_an_exchange_it_cannot_stand_in_for_and_writes_nothing(tmp_path: Path) -> None:
    # No port: the simulator is never started in place of such a URL (as for a remote exchange).
    result = run_cli(tmp_path, "http://127.0.0.1", timeout=60)
    assert result.returncode != 0
    assert "does not answer" in result.stderr
    assert not (tmp_path / "db").exists()
