"""More than one machine, as far as one machine can show it: a Prefect server on a real PostgreSQL (Debian's
postgresql package, started here as an unprivileged user on 127.0.0.1 and a free port), the project deployed
to it with `crypto-agent deploy`, and two process workers on the same work pool sharing one store. Two runs
of the same recovery started at once are run by the workers, but the recovery happens once: one incident
(the second run is absorbed by it, `incidents.open_or_join`), one restart of the daemon, and the recovery's
global concurrency limit lives on the PostgreSQL-backed server that every worker shares.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from crypto_agent import process
from crypto_agent.receiver import Receiver
from crypto_agent.settings import load_settings
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store
from tests.stack_kit import CRYPTO_AGENT, PREFECT, PROJECT_DIR, free_port

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(900)]

POOL = "crypto-agent-pool"
RECOVERY = "recover-daemon-crash/auto"
WORKERS = ("host-a", "host-b")
SERVER_READY_S = 180.0
RUNS_END_S = 240.0


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (initdb, pg_ctl), None when not installed."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` until true; AssertionError naming `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        time.sleep(0.5)


@dataclass
class Postgres:
    """A PostgreSQL cluster in a temporary folder, on 127.0.0.1."""

    bin: Path
    folder: Path
    port: int
    user: str | None  # the OS user that runs it (initdb refuses root)

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the prefect database, as PREFECT_API_DATABASE_CONNECTION_URL takes it."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"

    def run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """One of its binaries, as its user."""
        return subprocess.run([str(self.bin / args[0]), *args[1:]], user=self.user, capture_output=True, text=True,
                              timeout=timeout_s, check=False, cwd=self.folder)


@contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """initdb, pg_ctl start on a free port, CREATE DATABASE prefect; stopped and removed afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server binaries are not installed: `apt-get install -y postgresql` "
                    "(Debian's package; .ci/run installs it)")
    user = None
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
            user = "postgres"
        except KeyError:
            pytest.skip("running as root with no `postgres` user to run initdb as (Debian's package creates it)")
    folder = Path(tempfile.mkdtemp(prefix="crypto-agent-pg-"))
    if user:
        shutil.chown(folder, user=user)
    pg = Postgres(bin_dir, folder, free_port(), user)
    done = pg.run("initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    assert done.returncode == 0, done.stdout + done.stderr
    done = pg.run("pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "postgres.log"), "-w", "-t", "60",
                  "-o", f"-h 127.0.0.1 -p {pg.port} -k {folder} -F", "start")
    assert done.returncode == 0, done.stdout + done.stderr + (folder / "postgres.log").read_text()
    try:
        done = pg.run("createdb", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "prefect")
        assert done.returncode == 0, done.stdout + done.stderr
        yield pg
    finally:
        pg.run("pg_ctl", "-D", str(folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def background(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """A long-running child (server, worker) with its output in `log`; SIGTERM, then SIGKILL, at the end."""
    with log.open("ab") as out:
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 cwd=PROJECT_DIR)
    try:
        yield child
    finally:
        try:
            tree = psutil.Process(child.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
        for proc in tree:
            if proc.is_running():
                proc.kill()


@dataclass
class Cluster:
    """The multi-machine setup: PostgreSQL, the Prefect server on it, the shared home, the workers' logs."""

    pg: Postgres
    api_url: str
    env: dict[str, str]
    home: Path
    worker_logs: dict[str, Path]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """PostgreSQL, a Prefect server on it, the project deployed, two workers on one pool, one shared store."""
    with postgres_cluster() as pg, Simulator(port=0) as sim, Receiver(port=0) as receiver:
        tmp = tmp_path_factory.mktemp("multi-machine")
        home = tmp / "shared-home"  # the store every worker sees: one machine's disk here
        port = free_port()
        api_url = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CRYPTO_AGENT_", "PREFECT_"))}
        env.update({
            "PREFECT_API_URL": api_url,
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PYTHONPATH": str(PROJECT_DIR),
            "CRYPTO_AGENT_HOME": str(home),
            "CRYPTO_AGENT_SYMBOLS": "BTCUSDT,ETHUSDT",
            "CRYPTO_AGENT_INITIAL_HISTORY_DAYS": "5",
            "CRYPTO_AGENT_DAEMON_LOOKBACK_DAYS": "5",
            "CRYPTO_AGENT_EXCHANGE_URL": sim.url,
            "CRYPTO_AGENT_RECEIVER_URL": receiver.url,
            "CRYPTO_AGENT_HEARTBEAT_INTERVAL_S": "1",
            # the first recovery holds the restart this long after the daemon's start: the second run
            # arrives while the first is still at work
            "CRYPTO_AGENT_CRASH_RESTART_GRACE_S": "15",
        })
        server_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": pg.url}
        server_env.pop("PREFECT_API_URL")
        server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                      "--no-ui"]
        with background(server_cmd, server_env, tmp / "prefect-server.log") as server:
            wait_until(lambda: server.poll() is None and _answers(f"{api_url}/health"), SERVER_READY_S,
                       "the Prefect server on PostgreSQL answering")
            for args in (["collect", "--mode=update"], ["blocks-register"], ["deploy"]):
                done = subprocess.run([CRYPTO_AGENT, *args], env=env, capture_output=True, text=True, timeout=600,
                                      check=False)
                assert done.returncode == 0, f"crypto-agent {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
            # no health monitor here to start a third recovery of the dead daemon on its own (its cron may fire)
            done = subprocess.run([PREFECT, "automation", "pause", "recover-daemon-crash/auto: service dead"], env=env,
                                  capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
            logs = {name: tmp / f"worker-{name}.log" for name in WORKERS}
            with background([PREFECT, "worker", "start", "--pool", POOL, "--name", WORKERS[0]], env,
                            logs[WORKERS[0]]), \
                    background([PREFECT, "worker", "start", "--pool", POOL, "--name", WORKERS[1]], env,
                               logs[WORKERS[1]]):
                wait_until(lambda: _workers_online(api_url) >= set(WORKERS), 120, "both workers polling the pool")
                yield Cluster(pg, api_url, env, home, logs)
                services = load_settings(home=home)
                for name in ("backtest", "trader"):
                    process.stop(process.service_spec(name, services), grace_s=5)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _workers_online(api_url: str) -> set[str]:
    try:
        resp = httpx.post(f"{api_url}/work_pools/{POOL}/workers/filter", json={}, timeout=5)
        return {w["name"] for w in resp.json() if w.get("status") == "ONLINE"}
    except (httpx.HTTPError, ValueError):
        return set()


def test_the_prefect_server_keeps_its_state_in_postgresql(cluster: Cluster) -> None:
    done = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(cluster.pg.port), "-U", "postgres", "-d", "prefect",
                           "-At", "-c", "SELECT count(*) FROM deployment"], capture_output=True, text=True, timeout=60,
                          check=False) if shutil.which("psql") else None
    deployments = httpx.post(f"{cluster.api_url}/deployments/filter", json={}, timeout=10).json()
    names = {d["name"] for d in deployments}
    assert {"auto", "daily", "scheduled"} <= names
    if done is not None:  # the rows are in PostgreSQL itself, not in a SQLite file of PREFECT_HOME
        assert done.returncode == 0, done.stderr
        assert int(done.stdout.strip()) == len(deployments)
    assert not list(Path(cluster.env["PREFECT_HOME"]).glob("*.db"))


def test_two_workers_on_one_pool_run_one_recovery_once(cluster: Cluster) -> None:
    settings = load_settings(home=cluster.home)
    spec = process.service_spec("backtest", settings)
    # the 2nd crash of a loop: the restart policy backs the restart off (restart_backoff_base_s), so the two
    # runs overlap however fast the first one would restart a first crash
    process.start(spec, settings)
    first = process.owned_process(spec)
    first.kill()
    first.wait(10)
    with Store(settings.database_url) as store:
        process.clean_state(spec, store=store)  # records the first crash, as a recovery does
    process.start(spec, settings)
    killed = process.owned_process(spec)
    killed.kill()
    killed.wait(10)
    started_before = _service_events(cluster.home, "started")
    # two operators (or an automation and an operator) start the same recovery at the same moment
    runs = []
    for _ in range(2):
        done = subprocess.run([PREFECT, "deployment", "run", RECOVERY, "-p", "service=backtest"], env=cluster.env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append(re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1))
    wait_until(lambda: all(_state(cluster.api_url, r) in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs),
               RUNS_END_S, "both recovery runs ending")
    assert [_state(cluster.api_url, r) for r in runs] == ["COMPLETED", "COMPLETED"]
    # both workers may reach for the same run; the server lets exactly one have it (the other's submission is
    # aborted: "This run is in a PENDING state and cannot transition to a PENDING state")
    ran_by = {r: _ran_by(cluster, r) for r in runs}
    print(f"\nrecovery runs and the workers that ran them: {ran_by}")
    assert all(len(workers) == 1 for workers in ran_by.values()), ran_by
    # the recovery happened once: one incident, the other run absorbed by it, one restart of the daemon
    with closing(sqlite3.connect(cluster.home / "db" / "incidents.db")) as conn:
        found = conn.execute("SELECT scenario, status, outcome, events_absorbed, actions FROM incidents").fetchall()
    assert len(found) == 1, found
    scenario, status, outcome, absorbed, actions = found[0]
    assert (scenario, status, outcome, absorbed) == ("daemon-crash", "resolved", "recovered", 1)
    assert "absorbed" in [action["step"] for action in json.loads(actions)]
    assert _service_events(cluster.home, "started") == started_before + 1
    assert process.inspect(spec).alive and process.inspect(spec).pid != killed.pid
    # the lock that serialises them is the server's, in PostgreSQL, shared by every worker
    limit = httpx.get(f"{cluster.api_url}/v2/concurrency_limits/recovery-crypto-agent.service.backtest-daemon",
                      timeout=10)
    assert limit.status_code == 200 and limit.json()["limit"] == 1, limit.text


def _ran_by(cluster: Cluster, flow_run_id: str) -> list[str]:
    """The workers that submitted a flow run and were not told by the server to abort."""
    ran = []
    for name, log in cluster.worker_logs.items():
        text = log.read_text(errors="replace")
        aborted = f"Aborted submission of flow run '{flow_run_id}'" in text
        if f"submitting flow run '{flow_run_id}'" in text and not aborted:
            ran.append(name)
    return ran


def _state(api_url: str, flow_run_id: str) -> str:
    return httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=10).json()["state"]["type"]


def _service_events(home: Path, kind: str) -> int:
    with closing(sqlite3.connect(home / "db" / "crypto_agent.db")) as conn:
        return conn.execute("SELECT count(*) FROM service_events WHERE service = 'backtest' AND kind = ?",
                            (kind,)).fetchone()[0]
