"""`crypto-agent up` in the foreground, as an operator runs it: Ctrl-C stops everything it started, in reverse
order, and leaves no process behind."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.stack_kit import CRYPTO_AGENT, UP_TIMEOUT_S, free_port, stack_env

pytestmark = [pytest.mark.stack, pytest.mark.slow]

STOP_TIMEOUT_S = 120.0
STOP_ORDER = ["keeper", "serve", "relay", "litestream", "backtest", "trader", "receiver", "simulator", "prefect-server"]


def test_ctrl_c_stops_everything_up_started_in_reverse_order(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port(), free_port(), free_port())
    up = subprocess.Popen([CRYPTO_AGENT, "up", "--no-ui"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    holding = threading.Event()

    def read() -> None:
        for line in up.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C"):
                holding.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while not holding.wait(0.5):
            assert up.poll() is None, f"`crypto-agent up` exited with {up.returncode}:\n" + "\n".join(lines)
            assert time.monotonic() < deadline, "`crypto-agent up` not up in time:\n" + "\n".join(lines)
        parts = json.loads((tmp_path / "run" / "stack.json").read_text())["parts"]
        procs = {name: psutil.Process(part["pid"]) for name, part in parts.items()}
        assert set(procs) == set(STOP_ORDER)
        assert (tmp_path / "run" / "up.pid").read_text().strip() == str(up.pid)
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        assert up.wait(STOP_TIMEOUT_S) == 0, "\n".join(lines)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    reader.join(10)
    stopped = [line.split(":")[0] for line in lines if ": stopped PID" in line]
    assert stopped == STOP_ORDER, "\n".join(lines)
    deadline = time.monotonic() + 10
    left = [name for name, p in procs.items() if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [name for name, p in procs.items() if _alive(p)]
    assert not left, f"left running: {left}"
    assert not list((tmp_path / "run").glob("*.pid")), "pidfiles left behind"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
