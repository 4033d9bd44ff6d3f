"""The whole stack from one command: `crypto-agent up --detach`, everything answers, a deployment runs from
another terminal, a second `up` reuses it all, `crypto-agent down` leaves no process and the store intact."""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import httpx
import psutil
import pytest

from tests.stack_kit import (
    PROJECT_DIR,
    RunningStack,
    api,
    deployments_by_name,
    expected_deployments,
    free_port,
    prefect_yaml,
    run_cli,
    run_deployment,
    stack_env,
    up_seconds,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def automation_names(stack: RunningStack) -> list[str]:
    """The names of every automation on the stack's server (duplicates kept)."""
    with api(stack) as client:
        return sorted(a.name for a in client.read_automations())


def test_up_prints_where_everything_is(stack: RunningStack) -> None:
    out = stack.up.stdout
    assert f"Prefect UI      {stack.ui_url}" in out
    assert f"export PREFECT_API_URL={stack.api_url}" in out
    assert f"export PREFECT_HOME={stack.home / '.prefect'}" in out
    assert up_seconds(out) > 0
    assert stack.record["api_url"] == stack.api_url


def test_server_simulator_and_receiver_answer(stack: RunningStack) -> None:
    assert httpx.get(f"{stack.api_url}/health", timeout=10).json() is True
    assert httpx.get(f"http://127.0.0.1:{stack.simulator_port}/api/v3/ping", timeout=10).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{stack.receiver_port}/health", timeout=10).json()["status"] == "ok"
    # the server's database is inside the project home, not the user's profile
    assert (stack.home / ".prefect" / "prefect.db").is_file()


@pytest.mark.parametrize("service", ["trader", "backtest"])
def test_services_are_healthy(stack: RunningStack, service: str) -> None:
    done = run_cli(["status", "--service", service], stack.env, 60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEALTHY" in done.stdout


def test_the_store_was_backfilled(stack: RunningStack) -> None:
    assert re.search(r"store: .*: \d+ candles written for 3 symbols", stack.up.stdout)
    done = run_cli(["check-integrity"], stack.env, 60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_deployment_of_prefect_yaml_exists_with_its_schedules(stack: RunningStack) -> None:
    found = deployments_by_name(stack)
    for name, crons in expected_deployments().items():
        assert name in found, f"{name} not deployed; found {sorted(found)}"
        assert sorted(s.schedule.cron for s in found[name].schedules) == crons, name
        assert str(getattr(found[name].status, "value", found[name].status)) == "READY", name


def test_every_automation_exists(stack: RunningStack) -> None:
    # whatever the repository declares: the triggers of prefect.yaml, and deployments/automations.py
    expected = []
    for entry in prefect_yaml()["deployments"]:
        for i, trigger in enumerate(entry.get("triggers") or [], start=1):
            expected.append(trigger.get("name") or f"{entry['name']}__automation_{i}")
    expected += declared_code_automations(stack)
    with api(stack) as client:
        found = client.read_automations()
    names = sorted(a.name for a in found)
    for name in expected:
        assert name in names, f"automation {name!r} missing; found {names}"
    assert all(a.enabled for a in found), [a.name for a in found if not a.enabled]
    assert len(names) == len(set(names)), f"duplicate automations: {names}"


def declared_code_automations(stack: RunningStack) -> list[str]:
    """The names of the automations deployments/automations.py declares (built against the stack's server)."""
    if not (PROJECT_DIR / "deployments" / "automations.py").is_file():
        return []
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from crypto_agent.settings import load_settings
    from deployments.automations import desired_automations

    with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
        wanted, not_buildable = desired_automations(load_settings(home=stack.home), PROJECT_DIR)
    return [a.name for a in wanted] + list(not_buildable)


def test_a_deployment_runs_from_another_terminal(stack: RunningStack) -> None:
    run = run_deployment(stack, "integrity-check/quick")
    assert run.state_type.value == "COMPLETED", f"{run.state_name}: {run.state and run.state.message}"


def test_a_second_up_reuses_everything(stack: RunningStack) -> None:
    deployments_before = sorted(deployments_by_name(stack))
    automations_before = automation_names(stack)
    pids_before = stack.pids()
    started = time.monotonic()
    again = run_cli(["up", "--detach"], stack.env, 300)
    elapsed = time.monotonic() - started
    assert again.returncode == 0, again.stdout + again.stderr
    print(f"\nsecond `crypto-agent up --detach` (warm): {up_seconds(again.stdout):.1f} s ({elapsed:.1f} s wall)")
    for name in ("prefect-server", "simulator", "receiver", "trader", "backtest", "serve"):
        assert re.search(rf"^{name}: already running.*reused", again.stdout, re.MULTILINE), f"{name}:\n{again.stdout}"
    restarted = [line for line in again.stdout.splitlines() if line.startswith(("prefect-server:", "serve:"))]
    assert "started" not in " ".join(restarted)
    assert stack.pids() == pids_before
    servers = [p for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] and "server" in p.info["cmdline"] and str(stack.prefect_port) in p.info["cmdline"]]
    assert len(servers) == 1
    assert sorted(deployments_by_name(stack)) == deployments_before
    assert automation_names(stack) == automations_before


def test_up_frees_the_recovery_slots_no_recovery_holds(stack: RunningStack) -> None:
    """A recovery cancelled by a `down`, then a server restart that lost its leases, left a slot taken: the next
    `up` frees it, so the next recovery of that resource does not wait for a ghost (issue 10)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    name = "recovery-crypto-agent.service.backtest-daemon"
    with api(stack) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 1
    again = run_cli(["up", "--detach"], stack.env, 300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"freed orphaned slots of {name}" in again.stdout, again.stdout
    with api(stack) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


def test_a_port_held_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = stack_env(tmp_path, port, free_port(), free_port())
        done = run_cli(["up", "--detach"], env, 120)
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1" in done.stderr
    assert "is not part of this stack" in done.stderr
    assert f"PID {psutil.Process().pid}" in done.stderr  # it names who holds the port: this test
    assert not list((tmp_path / "run").glob("*.pid")), "nothing may be left started"


def candle_count(db_path: Path) -> int:
    """Rows of ohlcv_h1 and ohlcv_h4, read-only."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)) as conn:
        return sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("ohlcv_h1", "ohlcv_h4"))


def test_down_stops_every_process_and_keeps_the_store(stack: RunningStack) -> None:
    db_path = stack.home / "db" / "crypto_agent.db"
    candles = candle_count(db_path)
    procs: dict[str, psutil.Process] = {}
    for name, pid in stack.pids().items():
        try:
            proc = psutil.Process(pid)
            procs[name] = proc
            for child in proc.children(recursive=True):  # flow runs of the serving process, if any
                procs[f"{name}/child {child.pid}"] = child
        except psutil.NoSuchProcess:
            pass
    assert {"prefect-server", "simulator", "receiver", "trader", "backtest", "litestream", "serve", "relay",
            "keeper"} <= set(procs)  # Litestream replicates the store as a part of the stack (issue 12)
    stack.down = run_cli(["down"], stack.env, 240)
    assert stack.down.returncode == 0, stack.down.stdout + stack.down.stderr
    left = [f"{name} PID {p.pid}" for name, p in procs.items() if _alive(p)]
    assert not left, f"left running after down: {left}\n{stack.down.stdout}"
    assert not list((stack.home / "run").glob("*.pid")), "pidfiles left behind"
    integrity = run_cli(["check-integrity", "--full"], stack.env, 120)
    assert integrity.returncode == 0, integrity.stdout + integrity.stderr
    assert candle_count(db_path) >= candles > 0


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
