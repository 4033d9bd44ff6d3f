"""The pieces `crypto-agent up` is made of, without a Prefect server: process control of children that write no
pidfile themselves (start_child, stop_tree), the plan of ports and addresses, and a port held by a stranger."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from crypto_agent import process
from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.settings import Settings, load_settings

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from deployments import stack  # noqa: E402 (importable once the project directory is on sys.path)

SLEEP = ("/bin/sleep", "300")


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan reads the environment: keep the developer's settings out."""
    for name in list(os.environ):
        if name.startswith("CRYPTO_AGENT_"):
            monkeypatch.delenv(name)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings whose run/ and logs/ are in tmp_path."""
    return load_settings(home=tmp_path, stop_grace_s=5)


def _gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_started_child_is_recorded_as_ours_every_time(settings: Settings) -> None:
    # Popen returns a moment before the kernel publishes the new command line; the record must not catch it empty
    for _ in range(20):
        spec = process.child_spec("sleeper", SLEEP, settings)
        started = process.start_child(spec, env={}, ready=lambda: True)
        record = json.loads(spec.pid_record.read_text())
        assert record["cmdline"] == list(SLEEP)
        check = process.inspect(spec)
        assert check.state is process.Liveness.OURS and check.pid == started.pid
        stopped = process.stop_tree(spec)
        assert stopped.was_running and stopped.signal == "SIGTERM"
        assert not spec.pidfile.exists() and not spec.pid_record.exists()


def test_a_second_start_of_a_running_child_is_refused(settings: Settings) -> None:
    spec = process.child_spec("sleeper", SLEEP, settings)
    first = process.start_child(spec, env={}, ready=lambda: True)
    try:
        with pytest.raises(process.ServiceAlreadyRunning):
            process.start_child(spec, env={}, ready=lambda: True)
        assert process.inspect(spec).pid == first.pid
    finally:
        process.stop_tree(spec)


def test_a_child_that_exits_before_it_is_ready_is_reported_with_its_log(settings: Settings) -> None:
    spec = process.child_spec("failing", (sys.executable, "-c", "print('no such config'); raise SystemExit(3)"),
                              settings)
    with pytest.raises(process.ServiceStartError) as failed:
        process.start_child(spec, env={}, ready=lambda: False, timeout_s=30)
    assert "exited with code 3" in failed.value.message
    assert "no such config" in (failed.value.hint or "")
    assert not spec.pidfile.exists() and not spec.pid_record.exists()


def test_a_child_never_ready_is_killed_at_the_timeout(settings: Settings) -> None:
    spec = process.child_spec("silent", SLEEP, settings)
    with pytest.raises(process.ServiceStartError, match=r"not ready within 0\.5 s"):
        process.start_child(spec, env={}, ready=lambda: False, timeout_s=0.5)
    assert not spec.pidfile.exists()
    assert not [p for p in psutil.Process().children() if _cmdline(p) == list(SLEEP)]


def _cmdline(proc: psutil.Process) -> list[str]:
    """Its command line; [] for a child already gone or a zombie (another test's, not yet reaped)."""
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def test_stop_tree_also_stops_what_the_child_left_behind(settings: Settings) -> None:
    # the shell exits on SIGTERM and would orphan its sleep; stop_tree takes the sleep down too
    spec = process.child_spec("shell", ("/bin/sh", "-c", "sleep 300 & wait"), settings)
    process.start_child(spec, env={}, ready=lambda: True)
    deadline = time.monotonic() + 10
    while not (children := process.inspect(spec).process.children(recursive=True)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.stop_tree(spec, grace_s=5)
    assert all(_gone(c) for c in children)


def test_a_pidfile_naming_a_stranger_is_never_signalled(settings: Settings) -> None:
    stranger = subprocess.Popen(SLEEP)
    try:
        spec = process.child_spec("simulator", (), settings)
        spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
        spec.pidfile.write_text(f"{stranger.pid}\n")
        spec.pid_record.write_text(json.dumps({"service": "simulator", "pid": stranger.pid, "create_time": 1.0,
                                               "cmdline": list(SLEEP), "started_at": 1.0}))
        with pytest.raises(process.NotOurProcess):
            process.stop_tree(spec)
        # `down` drops the stale files and signals nothing
        line = stack.stop_part("simulator", settings)
        assert "not signalled" in line
        assert stranger.poll() is None
        assert not spec.pidfile.exists()
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize("name", ["backtest", "trader", "Bad Name", ""])
def test_child_names_exclude_the_services_and_odd_characters(settings: Settings, name: str) -> None:
    with pytest.raises(CryptoAgentError, match="invalid child process name"):
        process.child_spec(name, SLEEP, settings)


def test_the_plan_moves_fear_greed_and_fred_with_the_simulator(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    monkeypatch.setenv("CRYPTO_AGENT_HOME", str(tmp_path))
    plan = stack.plan_stack(prefect_port=4321, simulator_port=9001, receiver_port=9002)
    assert plan.settings.exchange_url == "http://127.0.0.1:9001"
    assert plan.settings.fear_greed_url == "http://127.0.0.1:9001/fng/"
    assert plan.settings.fred_url == "http://127.0.0.1:9001/fred"
    assert plan.settings.receiver_url == "http://127.0.0.1:9002"
    assert plan.api_url == "http://127.0.0.1:4321/api"
    assert plan.prefect_home == tmp_path / ".prefect"
    env = stack.child_env(plan)
    assert env["PREFECT_HOME"] == str(tmp_path / ".prefect")
    assert env["PREFECT_UI_API_URL"] == plan.api_url  # else the UI's browser code calls port 4200
    assert env["CRYPTO_AGENT_EXCHANGE_URL"] == "http://127.0.0.1:9001"


def test_a_remote_exchange_starts_no_simulator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRYPTO_AGENT_HOME", str(tmp_path))
    monkeypatch.setenv("CRYPTO_AGENT_EXCHANGE_URL", "https://api.binance.com")
    plan = stack.plan_stack()
    assert plan.simulator_port is None and stack.simulator_child(plan) is None
    assert plan.receiver_port == 8766


def test_a_bad_port_option_is_an_input_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRYPTO_AGENT_HOME", str(tmp_path))
    with pytest.raises(InputError, match="--prefect-port 70000 is out of range"):
        stack.plan_stack(prefect_port=70000)


def test_a_port_held_by_a_stranger_is_named_with_its_holder(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("CRYPTO_AGENT_HOME", str(tmp_path))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert not stack.port_free(port)
        plan = stack.plan_stack(receiver_port=port)
        child = stack.receiver_child(plan)
        assert child is not None
        with pytest.raises(stack.PortTaken) as taken:
            stack.ensure_port_free(child)
    assert f"port {port} on 127.0.0.1" in taken.value.message
    assert f"PID {psutil.Process().pid}" in taken.value.message
    assert "--receiver-port" in (taken.value.hint or "")
    assert stack.port_free(port)


def test_down_with_nothing_running_stops_nothing(settings: Settings) -> None:
    lines: list[str] = []

    class Out:
        def print(self, text: str, **_: object) -> None:
            lines.append(text)

    assert stack.bring_down(settings, Out()) == []  # type: ignore[arg-type]
    assert lines == [f"{name}: was not running" for name in reversed(stack.START_ORDER)]


def test_only_serves_the_deployments_named_and_refuses_an_unknown_one(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("CRYPTO_AGENT_HOME", str(tmp_path))
    every = stack.plan_stack()
    assert "health-monitor/scheduled" in every.served and stack.serve_child(every).command[-1] == "deployments.serve"
    wanted = ["health-monitor/scheduled", "recover-daemon-crash/auto", "health-monitor/scheduled"]
    plan = stack.plan_stack(only=wanted)
    assert plan.only == plan.served == ("health-monitor/scheduled", "recover-daemon-crash/auto")
    command = stack.serve_child(plan).command
    assert command[command.index("--only") + 1:] == plan.only
    with pytest.raises(InputError, match=r"--only nightly/never: no such deployment in prefect\.yaml"):
        stack.plan_stack(only=["nightly/never"])
