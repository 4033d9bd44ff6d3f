"""Shared by the service tests: a tmp home with short limits, a tiny real store, and a process keeper
that kills (by the PID it got, never by name) whatever a test started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from crypto_agent import process
from crypto_agent.process import ServiceSpec, StartResult
from crypto_agent.settings import Settings, load_settings
from crypto_agent.store import Store
from crypto_agent.universe import TIMEFRAMES

HOUR_MS = TIMEFRAMES["1h"].ms

# Short limits and pauses so a test sees a service cycle, go stale or stop within seconds.
FAST: dict[str, Any] = {
    "symbols": ["BTCUSDT", "ETHUSDT"],
    "timeframes": ["1h"],
    "heartbeat_interval_s": 0.2,
    "heartbeat_max_age_s": 3.0,
    "daemon_unit_pause_s": 0.05,
    "daemon_cycle_pause_s": 0.5,
    "trader_cycle_s": 0.3,
    "probe_cpu_sample_s": 0.3,
    "stop_grace_s": 10.0,
    "start_timeout_s": 60.0,
}


def make_settings(home: Path, create_store: bool = True, **overrides: Any) -> Settings:
    """Settings rooted at a tmp home, with FAST defaults; the (empty) store created unless told not to.

    Created here, so a test reading the store never races a service creating the same new file.
    """
    settings = load_settings(home=home, **{**FAST, **overrides})
    if create_store:
        Store(settings.database_url).close()
    return settings


def synthetic_candles(n: int, trend: float, now_ms: int | None = None) -> list[tuple]:
    """n closed H1 candles ending at the last full hour; close grows by `trend` per candle (0.01 = +1 %)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    last_open = now_ms // HOUR_MS * HOUR_MS - HOUR_MS
    out = []
    price = 100.0
    for i in range(n):
        t = last_open - (n - 1 - i) * HOUR_MS
        price *= 1.0 + trend + (0.002 if i % 2 else -0.002)
        out.append((t, price, price * 1.01, price * 0.99, price, 10.0, t + HOUR_MS - 1, price * 10, 100))
    return out


def seed_store(settings: Settings, trends: dict[str, float] | None = None, n: int = 150) -> None:
    """A tiny store: n H1 candles per symbol (BTCUSDT rising, ETHUSDT falling by default)."""
    trends = trends or {"BTCUSDT": 0.01, "ETHUSDT": -0.01}
    with Store(settings.database_url) as store:
        for symbol, trend in trends.items():
            store.upsert_candles(symbol, "1h", synthetic_candles(n, trend))


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; its value. Fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class Keeper:
    """Starts services and plain processes for a test and kills every one of them at the end, by PID."""

    def __init__(self) -> None:
        self._instances: list[tuple[int, float]] = []
        self._popens: list[subprocess.Popen] = []

    def start(self, spec: ServiceSpec, settings: Settings, env: dict[str, str] | None = None, **kw: Any) -> StartResult:
        """process.start, remembering the instance for the cleanup."""
        result = process.start(spec, settings, env=env, **kw)
        self.adopt(result.pid)
        return result

    def adopt(self, pid: int) -> None:
        """Remember a process (by PID and create time) to kill at the end."""
        try:
            self._instances.append((pid, psutil.Process(pid).create_time()))
        except psutil.NoSuchProcess:
            pass

    def popen(self, args: list[str], **kw: Any) -> subprocess.Popen:
        """A plain child process, killed and reaped at the end."""
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kw)
        self._popens.append(p)
        self.adopt(p.pid)
        return p

    def sleeper(self) -> subprocess.Popen:
        """An unrelated live process: `sleep 300`."""
        return self.popen(["sleep", "300"])

    def cleanup(self) -> None:
        """Kill what is still running of what we started (the same instance only), and reap our children."""
        for pid, create_time in self._instances:
            try:
                proc = psutil.Process(pid)
                if abs(proc.create_time() - create_time) < 0.05:
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        for p in self._popens:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid, _ in self._instances:
            popen = process._CHILDREN.pop(pid, None)
            if popen is not None:
                try:
                    popen.wait(10)
                except subprocess.TimeoutExpired:
                    pass


@pytest.fixture
def keeper():
    """A Keeper whose processes are killed when the test ends, pass or fail."""
    k = Keeper()
    yield k
    k.cleanup()


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def read_lines(path: Path) -> list[str]:
    """The lines of a text file, [] when it does not exist."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def run_cli(args: list[str], settings: Settings, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run `crypto-agent <args>` as a real process with `settings` in its environment."""
    exe = Path(sys.executable).with_name("crypto-agent")
    return subprocess.run(
        [str(exe), *args], env=process.child_env(settings), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, check=False,
    )


def is_alive(p: subprocess.Popen) -> bool:
    """Whether a child we started still runs."""
    return p.poll() is None


__all__ = [
    "FAST", "Keeper", "dead_pid", "is_alive", "keeper", "make_settings", "read_lines", "run_cli",
    "seed_store", "synthetic_candles", "wait_until",
]
