"""The keeper's decisions (crypto_agent.keeper): a dead part restarted at once, a crash loop backed off and
told a few times, not at every restart; a part that stayed up long enough starts a new streak."""

from __future__ import annotations

from crypto_agent import keeper


def test_a_first_death_is_restarted_at_once_and_told() -> None:
    h = keeper.PartHistory("serve", started_at=1000.0)
    d = keeper.decide(h, 5000.0)
    assert d.restart and d.wait_s == 0 and d.tell and "at once" in d.reason


def test_a_crash_loop_backs_off_doubling_to_the_cap_and_is_told_at_the_first_third_and_hourly() -> None:
    h = keeper.PartHistory("serve")
    now = 0.0
    waits, tells = [], []
    for _ in range(10):
        d = keeper.decide(h, now)
        if not d.restart:
            waits.append(round(d.wait_s, 3))
            now += d.wait_s
            d = keeper.decide(h, now)
        assert d.restart
        tells.append(d.tell)
        keeper.restarted(h, now, d.tell)
        now += 0.1  # it dies again 0.1 s after each start
    assert waits == [0.9, 1.9, 3.9, 7.9, 15.9, 31.9, 59.9, 59.9, 59.9]
    assert tells == [True, False, True, False, False, False, False, False, False, False]
    assert h.streak == 10
    # an hour after the last tell, a death in the same loop is told again
    h.dead_since = None
    later = keeper.decide(h, (h.told_at or 0) + keeper.RETELL_S + 1)
    assert later.tell


def test_a_part_alive_past_the_reset_starts_a_new_streak() -> None:
    h = keeper.PartHistory("relay")
    keeper.restarted(h, 0.0, True)
    keeper.restarted(h, 1.0, False)
    keeper.seen_alive(h, 100.0)
    assert h.streak == 2  # not long enough
    keeper.seen_alive(h, 1.0 + keeper.RESET_AFTER_S)
    assert h.streak == 0
    d = keeper.decide(h, 2000.0)
    assert d.restart and d.wait_s == 0


# --- the keeper process's loop (deployments/keeper.py) on real processes ---

import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402
import pytest  # noqa: E402

from crypto_agent import process  # noqa: E402
from crypto_agent.receiver import Receiver  # noqa: E402
from crypto_agent.service import write_atomic  # noqa: E402
from deployments import keeper as keeper_process  # noqa: E402
from deployments.stack.parts import Child  # noqa: E402
from deployments.stack.plan import PROJECT_DIR, StackPlan  # noqa: E402

try:
    from service_kit import make_settings
    from stack_kit import free_port
except ImportError:  # tests/ became a package
    from tests.service_kit import make_settings
    from tests.stack_kit import free_port

SLEEPER = (sys.executable, "-c", "import time; time.sleep(120)")


def plan_for(home: Path, receiver_url: str = "http://127.0.0.1:9/") -> StackPlan:
    settings = make_settings(home, receiver_url=receiver_url, prefect_port=free_port())
    return StackPlan(settings=settings, project_dir=PROJECT_DIR, prefect_home=home / ".prefect",
                     prefect_port=settings.prefect_port, simulator_port=None, receiver_port=None)


def keeping_a_sleeper(home: Path, name: str = "relay") -> keeper_process.Keeper:
    """A keeper of one part, a real `python -c sleep` started the way `up` starts a child."""
    kept = keeper_process.Keeper(plan_for(home), emit_events=False)
    kept.children = {name: Child(name, SLEEPER, None, lambda: True, 10.0, 5.0, "a sleeper")}
    kept.histories = {name: keeper.PartHistory(name)}
    kept.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return kept


@pytest.fixture
def reaped():
    """PIDs to kill at the end of the test (the keeper's restarts too)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


class TestKeeperLoop:
    def test_a_killed_part_is_restarted_and_a_second_death_waits_out_its_backoff(self, tmp_path: Path, reaped) -> None:
        kept = keeping_a_sleeper(tmp_path)
        spec = kept.children["relay"].spec(kept.plan.settings)
        first = process.start_child(spec, env=kept.env, ready=lambda: True).pid
        reaped.append(first)
        assert kept.look("relay", time.time()) == "alive"
        os.kill(first, signal.SIGKILL)
        psutil.Process(first).wait(5)
        assert kept.look("relay", time.time()) == "suspect"  # confirmed at the next look
        assert kept.look("relay", time.time()) == "restarted"
        second = process.inspect(spec).pid
        reaped.append(second)
        assert second != first and process.inspect(spec).alive
        os.kill(second, signal.SIGKILL)
        psutil.Process(second).wait(5)
        assert kept.look("relay", time.time()) == "suspect"
        assert kept.look("relay", time.time()) == "waiting"  # death 2 in a row: 1 s after its last start
        time.sleep(keeper.BASE_S)
        assert kept.look("relay", time.time()) == "restarted"
        reaped.append(process.inspect(spec).pid)
        assert kept.histories["relay"].streak == 2 and kept.restarts == 2

    def test_a_stop_caught_between_the_exit_and_its_clean_up_is_not_a_death(self, tmp_path: Path, reaped) -> None:
        kept = keeping_a_sleeper(tmp_path)
        spec = kept.children["relay"].spec(kept.plan.settings)
        pid = process.start_child(spec, env=kept.env, ready=lambda: True).pid
        os.kill(pid, signal.SIGTERM)  # what a stop does first; its clean-up of the pidfile comes a moment later
        psutil.Process(pid).wait(5)
        assert kept.look("relay", time.time()) == "suspect"
        process.clean_state(spec)  # the stop's clean-up
        assert kept.look("relay", time.time()) == "stopped" and kept.restarts == 0

    def test_a_part_stopped_on_purpose_is_left_alone(self, tmp_path: Path, reaped) -> None:
        kept = keeping_a_sleeper(tmp_path)
        spec = kept.children["relay"].spec(kept.plan.settings)
        reaped.append(process.start_child(spec, env=kept.env, ready=lambda: True).pid)
        assert process.stop(spec).was_running
        for _ in range(5):
            assert kept.look("relay", time.time()) == "stopped"
        assert process.inspect(spec).pid is None and kept.restarts == 0

    def test_a_pidfile_naming_a_stranger_is_dropped_the_stranger_untouched_the_part_restarted(
        self, tmp_path: Path, reaped
    ) -> None:
        kept = keeping_a_sleeper(tmp_path)
        spec = kept.children["relay"].spec(kept.plan.settings)
        mine = process.start_child(spec, env=kept.env, ready=lambda: True).pid
        os.kill(mine, signal.SIGKILL)
        psutil.Process(mine).wait(5)
        stranger = psutil.Popen(["sleep", "60"])
        reaped.append(stranger.pid)
        while not stranger.cmdline():  # the exec publishes its arguments a moment after the fork
            time.sleep(0.01)
        write_atomic(spec.pidfile, f"{stranger.pid}\n")  # as if the dead part's PID were reused
        assert process.inspect(spec).state is process.Liveness.FOREIGN
        assert kept.look("relay", time.time()) == "suspect"
        assert kept.look("relay", time.time()) == "restarted"
        new = process.inspect(spec)
        reaped.append(new.pid)
        assert new.alive and new.pid not in (mine, stranger.pid)
        assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE

    def test_a_restart_that_fails_is_counted_and_backs_off(self, tmp_path: Path) -> None:
        kept = keeping_a_sleeper(tmp_path)
        kept.children["relay"] = Child("relay", (sys.executable, "-c", "raise SystemExit(3)"), None, lambda: False,
                                       10.0, 5.0, "exits at once")
        spec = kept.children["relay"].spec(kept.plan.settings)
        spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(spec.pidfile, "999999\n")  # a part that died: its pidfile names no process
        assert kept.look("relay", time.time()) == "suspect"
        assert kept.look("relay", time.time()) == "failed"
        assert not spec.pidfile.exists()  # the failed start left no pidfile, yet the part is not "stopped"
        assert kept.look("relay", time.time()) == "waiting" and kept.restarts == 0
        time.sleep(keeper.BASE_S)
        assert kept.look("relay", time.time()) == "failed" and kept.histories["relay"].streak == 2


class TestTeller:
    def test_with_no_prefect_api_l2_is_told_straight_through_the_webhook(self, tmp_path: Path) -> None:
        from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        with Receiver(port=0, log_path=tmp_path / "receiver.jsonl") as receiver, temporary_settings(
                updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
            teller = keeper_process.Teller(plan_for(tmp_path, receiver.url))
            teller.tell(keeper_process.Told("serve", "[crypto-agent] stack part serve died: restarted (PID 1)", "b"))
            teller.close(timeout_s=60)
            [(message, how)] = teller.sent
            assert how.startswith("webhook (the block failed: cannot load the escalation block")
            [got] = receiver.messages("/l2")
            assert got["body"]["subject"] == message.subject and got["body"]["keeper"] == {"part": "serve"}

    def test_a_message_no_one_takes_is_tried_again_until_someone_does(self, tmp_path: Path) -> None:
        from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

        port = free_port()
        with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api",
                                         PREFECT_CLIENT_MAX_RETRIES: 0}):
            teller = keeper_process.Teller(plan_for(tmp_path, f"http://127.0.0.1:{port}"))
            teller.tell(keeper_process.Told("receiver", "[crypto-agent] stack part receiver died", "b"))
            time.sleep(keeper_process.TELL_RETRY_S + 1)  # the first attempt found nothing listening
            assert teller.sent == []
            with Receiver(port=port, log_path=tmp_path / "receiver.jsonl") as receiver:
                deadline = time.monotonic() + 30
                while not teller.sent and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert [how for _, how in teller.sent] == [teller.sent[0][1]]
                assert teller.sent[0][1].startswith("webhook") and len(receiver.messages("/l2")) == 1
            teller.close()
