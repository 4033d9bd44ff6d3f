"""Rehearsals end to end: a stack started as the README says (`crypto-agent up --detach`, free ports, a temporary
home, a small universe), then `crypto-agent chaos all`: every runbook incident injected into it, recovered by the
automations alone, verified, and the MTTR table printed; then `crypto-agent down`.

The stack's settings are tuned through CRYPTO_AGENT_* so the drills take seconds, not the runbook's minutes:
short heartbeats and grace periods, a 9 s CPU spike window. On a 2-core machine the drills' own flow runs (and
whatever else runs there) compete with the CPU-burning daemon, which then gets well under a core: the daemon
runs un-niced, its normal work is paced down (0.5 s between units, about 5 % CPU) and the CPU limit is 20 %.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from crypto_agent.chaos import DRILLS
from tests.stack_kit import PREFECT, UP_TIMEOUT_S, RunningStack, run_cli, start_stack

pytestmark = [pytest.mark.stack, pytest.mark.slow]

CHAOS_TIMEOUT_S = 900.0  # `chaos all` as a subprocess; each of its waits is capped by --max-wait
MAX_WAIT_S = "240"
FAST_STACK: dict[str, Any] = {
    "heartbeat_interval_s": 1,
    "heartbeat_max_age_s": 10,
    "heartbeat_missing_s": 10,
    "crash_restart_grace_s": 2,
    "stop_grace_s": 3,
    "cpu_spike_minutes": 0.15,
    "cpu_max_pct": 20,
    "daemon_niceness": 0,
    "daemon_unit_pause_s": 0.5,
    "probe_cpu_sample_s": 1,
}
TABLE_ROW = re.compile(r"^(?P<name>[a-z-]+)\s+(?P<runbook>\d)\. .*?\s(?P<mttr>[0-9.]+ (?:s|min))\s+(?P<eta>\d+) m\s+"
                       r"(?P<verdict>within ETA|OVER ETA|NOT RECOVERED)$")


@pytest.fixture(scope="module")
def drilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A stack of its own, tuned for fast drills; `crypto-agent down` at the end."""
    running = start_stack(tmp_path_factory.mktemp("chaos-home"), settings=FAST_STACK)
    try:
        yield running
    finally:
        running.close()  # `crypto-agent down`, then whatever is left of the home is killed
        down = running.down
        assert down is not None and down.returncode == 0, down and down.stdout + down.stderr


def incidents_of(home: Path) -> list[tuple]:
    """(id, scenario, status, outcome) of every incident of the stack's log."""
    with closing(sqlite3.connect(home / "db" / "incidents.db")) as conn:
        return conn.execute("SELECT id, scenario, status, outcome FROM incidents ORDER BY id").fetchall()


@pytest.mark.timeout(UP_TIMEOUT_S + CHAOS_TIMEOUT_S + 60)
def test_chaos_all_recovers_every_runbook_incident_and_prints_the_mttr_table(drilled: RunningStack) -> None:
    started = time.monotonic()
    done = run_cli(["chaos", "all", "--max-wait", MAX_WAIT_S], drilled.env, CHAOS_TIMEOUT_S, cwd=drilled.home)
    print(done.stdout, done.stderr, f"\n`crypto-agent chaos all`: {time.monotonic() - started:.0f} s", sep="\n")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr
    rows = {m["name"]: m for m in (TABLE_ROW.match(line) for line in done.stdout.splitlines()) if m}
    assert sorted(rows) == sorted(DRILLS), f"MTTR table rows: {sorted(rows)}"
    for name, row in rows.items():
        assert int(row["runbook"]) == DRILLS[name].runbook
        assert int(row["eta"]) == DRILLS[name].eta_min
        assert row["verdict"] == "within ETA", row.group(0)
    # each drill printed its timeline and where to look in the UI
    for phase in ("injected", "detected", "recovered", "verified"):
        assert done.stdout.count(f"  {phase} ") >= len(DRILLS), phase
    assert done.stdout.count(f"{drilled.ui_url}/runs/flow-run/") >= len(DRILLS)
    assert "crypto-agent service resume backtest" in done.stdout
    # the incident log agrees: every scenario of the runbook was recovered, none is left open
    log = incidents_of(drilled.home)
    recovered = {scenario for _, scenario, status, outcome in log if (status, outcome) == ("resolved", "recovered")}
    assert {"daemon-crash", "process-hang", "stale-data", "db-corruption", "persistent-failures"} <= recovered, log
    assert not [row for row in log if row[2] == "open"], log
    # `all` resumed the backtest the rollback paused
    assert not (drilled.home / "run" / "backtest.paused").exists()
    status = run_cli(["status", "--service", "backtest"], drilled.env, 60)
    assert status.returncode == 0, status.stdout + status.stderr


@pytest.mark.timeout(300)
def test_a_drill_nothing_recovers_fails_with_exit_1_and_says_what_was_missing(drilled: RunningStack) -> None:
    prefect_env = drilled.prefect_env()
    automations = ["crypto-agent/heartbeat-missing", "recover-daemon-crash/auto: service dead"]

    def automation(verb: str, name: str) -> None:
        done = run_prefect([verb, name], prefect_env)
        assert done.returncode == 0, done.stdout + done.stderr

    # what the README tells an operator: pause the automations that would recover a dead daemon
    for name in automations:
        automation("pause", name)
    try:
        done = run_cli(["chaos", "daemon-killed", "--max-wait", "25"], drilled.env, 180, cwd=drilled.home)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "not detected within 25 s: no daemon-crash incident was opened" in done.stderr
        assert "heartbeat relay" in done.stdout
    finally:
        for name in automations:
            automation("resume", name)
        # the daemon stays dead with its recoveries paused: an operator starts it by hand
        run_cli(["service", "start", "backtest"], drilled.env, 120)
    status = run_cli(["status", "--service", "backtest"], drilled.env, 60)
    assert status.returncode == 0, status.stdout + status.stderr


def run_prefect(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`prefect automation <args>` from another terminal, as the README says."""
    return subprocess.run([PREFECT, "automation", *args], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
