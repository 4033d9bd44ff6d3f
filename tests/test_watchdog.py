"""The watchdog against real HTTP servers on 127.0.0.1, real processes and a real store."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import text

from crypto_agent import process, watchdog
from crypto_agent.receiver import Receiver
from crypto_agent.settings import Settings
from crypto_agent.store import Store
from crypto_agent.watchdog import AlertDecision, Check, CheckState, WatchdogReport

try:
    from service_kit import keeper, make_settings, run_cli
except ImportError:  # tests/ became a package
    from tests.service_kit import keeper, make_settings, run_cli  # noqa: F401

NOW = 1_800_000_000.0


def free_port() -> int:
    """A port nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """The project's webhook receiver on a free port: it stands in for the webhooks and, at /health, for an API."""
    with Receiver(port=0, log_path=tmp_path / "receiver.jsonl") as r:
        yield r


def settings_for(tmp_path: Path, receiver: Receiver) -> Settings:
    """Settings of a tmp home whose receiver is the test's and whose Prefect port has nothing on it."""
    return make_settings(tmp_path, receiver_url=receiver.url, prefect_port=free_port())


def start_part(name: str, settings: Settings, keeper) -> int:
    """A real child process recorded as the stack's part `name` (run/<name>.pid and .pid.json); its PID."""
    spec = process.child_spec(name, (sys.executable, "-c", "import time; time.sleep(120)"), settings)
    result = process.start_child(spec, env={"PATH": "/usr/bin:/bin"}, ready=lambda: True)
    keeper.adopt(result.pid)
    return result.pid


def add_sample(settings: Settings, at: float) -> None:
    """One probe sample, as a health-monitor round records it."""
    with Store(settings.database_url) as store, store.engine.begin() as conn:
        conn.execute(text("INSERT INTO probe_samples (service, checked_at, status, alive, zombie, reasons)"
                          " VALUES ('trader', :at, 'HEALTHY', 1, 0, '')"), {"at": int(at * 1000)})


class TestPrefectApi:
    def test_a_200_is_up(self, receiver: Receiver) -> None:
        check = watchdog.check_prefect_api(receiver.url)
        assert check == Check("prefect-api", CheckState.UP, f"{receiver.url}/health answered 200")

    def test_an_error_status_is_down(self, receiver: Receiver) -> None:
        check = watchdog.check_prefect_api(receiver.url + "/api")
        assert check.state is CheckState.DOWN and check.detail == f"{receiver.url}/api/health answered HTTP 404"

    def test_nothing_listening_is_down(self) -> None:
        url = f"http://127.0.0.1:{free_port()}/api"
        check = watchdog.check_prefect_api(url, timeout_s=2)
        assert check.state is CheckState.DOWN and check.detail.startswith(f"{url}/health unreachable (ConnectError")

    def test_a_server_that_never_answers_is_down_within_the_timeout(self) -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(5)  # accepts connections into the backlog, never reads or answers
            url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
            started = time.monotonic()
            check = watchdog.check_prefect_api(url, timeout_s=0.5)
            assert time.monotonic() - started < 3
        assert check.detail == f"{url}/health did not answer within 0.5 s"

    def test_the_default_api_is_the_local_server_unless_prefect_api_url_is_set(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        settings = make_settings(tmp_path, prefect_port=4321)
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
        assert watchdog.prefect_api_url(settings) == "http://127.0.0.1:4321/api"
        monkeypatch.setenv("PREFECT_API_URL", "https://prefect.example/api")
        assert watchdog.prefect_api_url(settings) == "https://prefect.example/api"


class TestParts:
    def test_a_running_part_is_up_and_a_killed_one_down(self, tmp_path: Path, keeper) -> None:
        settings = make_settings(tmp_path)
        pid = start_part("serve", settings, keeper)
        assert watchdog.check_part("serve", settings) == Check("serve", CheckState.UP, f"running, PID {pid}")
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        process.reap_children()
        check = watchdog.check_part("serve", settings)
        assert check.state is CheckState.DOWN and check.detail.startswith("not running (Process ")

    def test_no_pidfile_is_down(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path)
        assert watchdog.check_part("relay", settings) == Check("relay", CheckState.DOWN, "not running (No PID file)")

    def test_a_pidfile_naming_a_stranger_is_down(self, tmp_path: Path, keeper) -> None:
        settings = make_settings(tmp_path)
        stranger = keeper.sleeper()
        spec = process.child_spec("relay", (), settings)
        spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
        spec.pidfile.write_text(f"{stranger.pid}\n")
        check = watchdog.check_part("relay", settings)
        assert check.state is CheckState.DOWN and "names another process" in check.detail


class TestMonitorTick:
    def test_a_recent_round_is_up_an_old_one_down(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path)
        add_sample(settings, NOW - 100)
        assert watchdog.check_monitor_tick(settings.db_path, 660, NOW) == Check(
            "monitor-tick", CheckState.UP, "last round 100 s ago")
        check = watchdog.check_monitor_tick(settings.db_path, 60, NOW)
        assert check.state is CheckState.DOWN
        assert check.detail.startswith("the health monitor's last round was 100 s ago (limit 60 s)")

    def test_no_round_yet_is_down(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path)
        assert watchdog.check_monitor_tick(settings.db_path, now=NOW).detail == \
            "the health monitor has recorded no round yet"

    def test_an_unreadable_store_is_down_not_a_traceback(self, tmp_path: Path) -> None:
        settings = make_settings(tmp_path, create_store=False)
        settings.db_path.parent.mkdir(parents=True)
        settings.db_path.write_bytes(b"garbage" * 1000)
        check = watchdog.check_monitor_tick(settings.db_path, now=NOW)
        assert check.state is CheckState.DOWN and "file is not a database" in check.detail
        missing = watchdog.check_monitor_tick(tmp_path / "none.db", now=NOW)
        assert missing.state is CheckState.DOWN and "does not exist" in missing.detail


def report(*failing: str, at: float = NOW) -> WatchdogReport:
    """A report where the named checks are DOWN and prefect-api is UP."""
    checks = [Check(n, CheckState.DOWN, "x") for n in failing] + [Check("prefect-api", CheckState.UP, "ok")]
    return WatchdogReport(tuple(checks), at)


class TestDecideAlert:
    def test_healthy_and_never_told_posts_nothing(self) -> None:
        assert watchdog.decide_alert(report(), None) == AlertDecision(False, "", "healthy")

    def test_a_new_failure_is_posted(self) -> None:
        assert watchdog.decide_alert(report("serve"), None) == AlertDecision(True, "down", "down: serve")

    def test_the_same_failure_is_not_posted_again_before_realert(self) -> None:
        state = {"failing": ["serve"], "told_at": NOW - 60}
        decision = watchdog.decide_alert(report("serve"), state, realert_s=3600)
        assert decision == AlertDecision(False, "", "already told 60 s ago: serve")

    def test_the_same_failure_is_posted_again_after_realert(self) -> None:
        state = {"failing": ["serve"], "told_at": NOW - 5 * 3600}
        assert watchdog.decide_alert(report("serve"), state, realert_s=4 * 3600) == AlertDecision(
            True, "down", "still down after 5.0 h: serve")

    def test_a_change_in_what_fails_is_posted(self) -> None:
        state = {"failing": ["serve"], "told_at": NOW - 60}
        assert watchdog.decide_alert(report("serve", "relay"), state).reason == "down: relay, serve"

    def test_a_recovery_is_posted(self) -> None:
        state = {"failing": ["relay", "serve"], "told_at": NOW - 60}
        assert watchdog.decide_alert(report(), state) == AlertDecision(True, "recovered",
                                                                     "recovered: relay, serve up again")


class TestWatch:
    def test_everything_down_tells_l2_once_then_again_after_realert(self, tmp_path: Path, receiver: Receiver) -> None:
        settings = settings_for(tmp_path, receiver)
        run = watchdog.watch(settings, timeout_s=2, now=NOW)
        assert run.report.failing == ["keeper", "monitor-tick", "prefect-api", "relay", "serve"]
        assert run.exit_code == 1 and [d.ok for d in run.deliveries] == [True]
        [message] = receiver.messages("/l2")
        body = message["body"]
        assert body["level"] == "l2"
        assert body["subject"].endswith(": keeper, monitor-tick, prefect-api, relay, serve DOWN")
        assert "serve: DOWN: not running (No PID file)" in body["body"] and "`crypto-agent up`" in body["body"]
        assert body["text"].startswith(body["subject"]) and body["watchdog"]["healthy"] is False

        again = watchdog.watch(settings, timeout_s=2, now=NOW + 60)
        assert not again.decision.post and again.exit_code == 1 and len(receiver.messages("/l2")) == 1
        later = watchdog.watch(settings, timeout_s=2, realert_s=3600, now=NOW + 3700)
        assert later.decision.reason.startswith("still down after 1.0 h") and len(receiver.messages("/l2")) == 2

    def test_back_up_posts_the_recovery_and_exits_zero(self, tmp_path: Path, receiver: Receiver, keeper) -> None:
        settings = settings_for(tmp_path, receiver)
        now = time.time()
        assert watchdog.watch(settings, api_url=receiver.url, timeout_s=2, now=now).exit_code == 1
        for part in watchdog.PARTS:
            start_part(part, settings, keeper)
        add_sample(settings, now)
        run = watchdog.watch(settings, api_url=receiver.url, timeout_s=2, now=now + 5)
        assert run.report.healthy and run.exit_code == 0, run.report.message
        assert run.decision == AlertDecision(True, "recovered",
                                             "recovered: keeper, monitor-tick, relay, serve up again")
        assert receiver.messages("/l2")[-1]["body"]["subject"].endswith(run.decision.reason)
        quiet = watchdog.watch(settings, api_url=receiver.url, timeout_s=2, now=now + 10)
        assert not quiet.decision.post and len(receiver.messages("/l2")) == 2

    def test_an_alert_no_webhook_took_exits_3_and_is_tried_again(self, tmp_path: Path, receiver: Receiver) -> None:
        settings = settings_for(tmp_path, receiver)
        receiver.respond_with(500)
        dead = f"http://127.0.0.1:{free_port()}/hook"
        run = watchdog.watch(settings, timeout_s=2, webhooks=[dead], now=NOW)
        assert run.exit_code == 3
        assert (run.deliveries[0].ok, run.deliveries[0].detail) == (False, "HTTP 500")
        assert run.deliveries[1].url == dead and not run.deliveries[1].ok
        receiver.respond_with(200)
        retry = watchdog.watch(settings, timeout_s=2, now=NOW + 60)
        assert retry.decision.post and retry.exit_code == 1 and retry.deliveries[0].ok

    def test_extra_webhooks_get_the_same_message(self, tmp_path: Path, receiver: Receiver) -> None:
        settings = settings_for(tmp_path, receiver)
        watchdog.watch(settings, timeout_s=2, webhooks=[f"{receiver.url}/devops?token=secret"], now=NOW)
        assert [m["path"] for m in receiver.messages()] == ["/l2", "/devops"]
        assert receiver.messages("/devops")[0]["body"]["subject"] == receiver.messages("/l2")[0]["body"]["subject"]

    def test_no_alert_only_looks(self, tmp_path: Path, receiver: Receiver) -> None:
        settings = settings_for(tmp_path, receiver)
        run = watchdog.watch(settings, timeout_s=2, alert=False, now=NOW)
        assert run.exit_code == 1 and run.deliveries == [] and receiver.messages() == []
        assert not watchdog.state_path(settings).exists()

    def test_the_state_file_says_what_was_told(self, tmp_path: Path, receiver: Receiver) -> None:
        settings = settings_for(tmp_path, receiver)
        watchdog.watch(settings, timeout_s=2, parts=("serve",), now=NOW)
        state = json.loads(watchdog.state_path(settings).read_text())
        assert state["failing"] == ["monitor-tick", "prefect-api", "serve"] and state["told_at"] == NOW
        watchdog.state_path(settings).write_text("{broken")
        assert watchdog.watch(settings, timeout_s=2, parts=("serve",), now=NOW + 1).decision.post


class TestCommand:
    def test_the_command_exits_non_zero_and_tells_l2(self, tmp_path: Path, receiver: Receiver) -> None:
        settings = settings_for(tmp_path, receiver)
        done = run_cli(["watchdog", "--json", "--timeout", "2"], settings)
        assert done.returncode == 1, done.stderr
        out = json.loads(done.stdout)
        assert out["healthy"] is False and out["alert"]["post"] is True and out["deliveries"][0]["ok"] is True
        assert len(receiver.messages("/l2")) == 1

    def test_the_command_exits_zero_when_all_is_up(self, tmp_path: Path, receiver: Receiver, keeper) -> None:
        settings = settings_for(tmp_path, receiver)
        for part in watchdog.PARTS:
            start_part(part, settings, keeper)
        add_sample(settings, time.time())
        done = run_cli(["watchdog", "--api-url", receiver.url], settings)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "serve: UP: running, PID" in done.stdout and "alert: not posted (healthy)" in done.stdout

    def test_part_none_checks_only_the_api_and_the_monitor(self, tmp_path: Path, receiver: Receiver) -> None:
        settings = settings_for(tmp_path, receiver)
        add_sample(settings, time.time())
        done = run_cli(["watchdog", "--api-url", receiver.url, "--part", "none"], settings)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "serve" not in done.stdout and "relay" not in done.stdout
        assert "alert: not posted (healthy)" in done.stdout
