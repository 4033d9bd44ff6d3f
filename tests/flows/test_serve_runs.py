"""deployments/serve.py as a real process on the Prefect test server: a flow run starts forked from the warm
forkserver it names (or spawned fresh with flow_run_start=spawn), with the run's own context, and SIGTERM
cancels a running flow run and takes the forkserver down with the serving process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prefect import get_client
from prefect.deployments import run_deployment
from prefect.settings import get_current_settings

PROJECT_DIR = Path(__file__).resolve().parents[2]

FLOWS = '''
import json, os, time
from prefect import flow, runtime


@flow(name="where-am-i")
def where_am_i(out: str) -> None:
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "flow_run_id": str(runtime.flow_run.id),
                   "marker": os.environ.get("SERVE_TEST_MARKER")}, f)


@flow(name="sleeper")
def sleeper(out: str) -> None:
    with open(out, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
'''

YAML = '''
deployments:
- name: probe
  entrypoint: serveprobe/probe_flows.py:where_am_i
- name: probe
  entrypoint: serveprobe/probe_flows.py:sleeper
'''


class Served:
    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc, self.log = proc, log

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (m := re.search(pattern, self.text())) is not None:
                return m
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}:\n{self.text()}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in the serve log within {timeout} s:\n{self.text()}")


def start_serve(tmp_path: Path, start: str) -> Served:
    package = tmp_path / "project" / "serveprobe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "probe_flows.py").write_text(textwrap.dedent(FLOWS), encoding="utf-8")
    (tmp_path / "project" / "prefect.yaml").write_text(YAML, encoding="utf-8")
    env = os.environ | {
        "PREFECT_API_URL": str(get_current_settings().api.url), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "CRYPTO_AGENT_FLOW_RUN_START": start, "CRYPTO_AGENT_HOME": str(tmp_path / "home"),
        "SERVE_TEST_MARKER": "from-serve", "PYTHONPATH": str(PROJECT_DIR),
    }
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deployments.serve", "--project-dir", str(tmp_path / "project")],
                                cwd=PROJECT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    return Served(proc, log)


@pytest.fixture
def stop() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.terminate()
            try:
                s.proc.wait(30)
            except subprocess.TimeoutExpired:
                s.proc.kill()


def run_probe(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "where.json"
    run = run_deployment("where-am-i/probe", parameters={"out": str(out)}, timeout=120)
    assert run.state is not None and run.state.is_completed(), run.state
    found = json.loads(out.read_text(encoding="utf-8"))
    assert found["flow_run_id"] == str(run.id)  # the run's own context reached the process
    assert found["marker"] == "from-serve"  # and the serving process's environment
    return found


@pytest.mark.timeout(300)
def test_a_flow_run_forks_from_the_warm_forkserver_and_sigterm_stops_it_all(tmp_path: Path, stop: list[Served]) -> None:
    served = start_serve(tmp_path, "fork")
    stop.append(served)
    forkserver = int(served.wait_for(r"forkserver pid (\d+)").group(1))
    served.wait_for(r"serving: ")
    assert psutil.Process(forkserver).ppid() == served.proc.pid
    found = run_probe(tmp_path)
    assert found["ppid"] == forkserver and found["pid"] != served.proc.pid

    # a running flow run, then SIGTERM to the serving process: the run is cancelled, nothing is left behind
    pidfile = tmp_path / "sleeper.pid"
    run = run_deployment("sleeper/probe", parameters={"out": str(pidfile)}, timeout=0)
    deadline = time.monotonic() + 90
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    sleeper = int(pidfile.read_text(encoding="utf-8"))
    assert psutil.Process(sleeper).ppid() == forkserver
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0, served.text()
    _gone, alive = psutil.wait_procs([psutil.Process(p) for p in (forkserver, sleeper) if psutil.pid_exists(p)], 30)
    assert not alive, f"left running after serve stopped: {alive}"
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run.id).state
    assert state is not None and not state.is_running(), state  # cancelled, not left RUNNING


@pytest.mark.timeout(300)
def test_flow_run_start_spawn_starts_a_fresh_interpreter_from_the_serving_process(tmp_path: Path,
                                                                                  stop: list[Served]) -> None:
    served = start_serve(tmp_path, "spawn")
    stop.append(served)
    served.wait_for(r"serving: ")
    assert "forkserver" not in served.text()
    found = run_probe(tmp_path)
    assert found["ppid"] == served.proc.pid
