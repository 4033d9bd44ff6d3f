"""The escalation Block, its registration, the notify task and the state hooks, against the real receiver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from flow_kit import wait_for_messages
from prefect import flow, get_client
from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
from prefect.blocks.system import Secret
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import get_current_settings
from prefect.testing.standard_test_suites.blocks import BlockStandardTestSuite

from blocks.escalation import DEFAULT_ESCALATION, Escalation, NotificationUndelivered
from blocks.register import FRED_SECRET, register_defaults
from crypto_agent.receiver import Receiver
from crypto_agent.settings import load_settings
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, notify_level

PROJECT_DIR = Path(__file__).resolve().parents[2]


def webhook(url: str, name: str = "test") -> CustomWebhookNotificationBlock:
    return CustomWebhookNotificationBlock(
        name=name, url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}, timeout=5
    )


def escalation_at(base_url: str) -> Escalation:
    return Escalation(**{lvl: webhook(f"{base_url}/{lvl}") for lvl in ("l1", "l2", "l3")})


def closed_port_url() -> str:
    r = Receiver(port=0).start()
    url = r.url
    r.stop()
    return url


class TestEscalationBlockStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self) -> type[Escalation]:
        return Escalation

    def test_has_a_valid_image(self, block: type[Escalation]) -> None:  # type: ignore[override]
        # The standard test downloads the logo from the internet; tests stay on 127.0.0.1.
        assert block._logo_url is None or str(block._logo_url).startswith("https://")


class TestNotify:
    def test_each_level_posts_to_its_own_webhook(self, inbox: Receiver) -> None:
        escalation = escalation_at(inbox.url)
        escalation.notify("l2", "disk", "almost full")
        escalation.notify(3, "review", "incident 7")
        assert [m["body"] for m in inbox.messages("/l2")] == [{"subject": "disk", "body": "almost full"}]
        assert [m["body"]["subject"] for m in inbox.messages("/l3")] == ["review"]
        assert inbox.messages("/l1") == []

    def test_a_receiver_that_is_down_is_an_error_not_silence(self) -> None:
        with pytest.raises(NotificationUndelivered, match=r"L1 .*not delivered") as exc:
            escalation_at(closed_port_url()).notify("l1", "daemon DEAD", "pid 123")
        assert "crypto-agent receiver" in str(exc.value)

    def test_a_non_2xx_answer_is_an_error(self, inbox: Receiver) -> None:
        inbox.respond_with(500)
        with pytest.raises(NotificationUndelivered, match="500"):
            escalation_at(inbox.url).notify("l1", "x", "y")

    def test_a_malformed_webhook_url_is_an_error(self) -> None:
        escalation = Escalation(l1=webhook("127.0.0.1:1/l1"), l2=webhook("http://x/l2"), l3=webhook("http://x/l3"))
        with pytest.raises(NotificationUndelivered, match="L1"):
            escalation.notify("l1", "x", "y")

    def test_a_slack_block_with_an_unusable_url_is_an_error_not_silence(self, inbox: Receiver) -> None:
        # Apprise cannot parse a non-Slack URL and would send nothing without a word.
        escalation = Escalation(l1=SlackWebhook(url=f"{inbox.url}/l1"), l2=webhook(inbox.url), l3=webhook(inbox.url))
        with pytest.raises(NotificationUndelivered, match="no usable webhook URL"):
            escalation.notify("l1", "x", "y")
        assert inbox.messages() == []

    def test_an_unknown_level_is_refused(self, inbox: Receiver) -> None:
        with pytest.raises(ValueError, match="unknown escalation level"):
            escalation_at(inbox.url).notify("l4", "x", "y")


class TestSavedBlocks:
    def test_levels_load_back_as_the_block_types_they_were_saved_as(self, receiver: Receiver) -> None:
        Escalation(
            l1=SlackWebhook(url="https://hooks.slack.com/services/T000/B000/XXXX"),
            l2=webhook(f"{receiver.url}/l2"),
            l3=webhook(f"{receiver.url}/l3"),
        ).save("mixed-levels", overwrite=True)
        loaded = Escalation.load("mixed-levels")
        assert isinstance(loaded.l1, SlackWebhook)
        assert isinstance(loaded.l2, CustomWebhookNotificationBlock) and loaded.l2.url == f"{receiver.url}/l2"

    def test_register_defaults_points_every_level_at_the_receiver_and_is_idempotent(
        self, receiver: Receiver
    ) -> None:
        settings = load_settings(receiver_url=receiver.url)
        first = register_defaults(settings)
        second = register_defaults(settings)
        assert first.documents == second.documents
        assert "crypto-agent-escalation" in first.block_types
        loaded = Escalation.load(DEFAULT_ESCALATION)
        assert [loaded.channel(lvl).url for lvl in ("l1", "l2", "l3")] == [
            f"{receiver.url}/l1", f"{receiver.url}/l2", f"{receiver.url}/l3"
        ]
        with get_client(sync_client=True) as client:
            named = [d.name for d in client.read_block_documents() if d.name and d.name.startswith(DEFAULT_ESCALATION)]
        assert sorted(named) == ["crypto-agent", "crypto-agent-l1", "crypto-agent-l2", "crypto-agent-l3"]

    def test_the_fred_secret_is_written_only_when_a_key_is_given(self, receiver: Receiver) -> None:
        settings = load_settings(receiver_url=receiver.url)
        without = register_defaults(settings)
        assert f"secret/{FRED_SECRET}" not in without.documents
        with pytest.raises(ValueError, match="Unable to find block document"):
            Secret.load(FRED_SECRET)
        done = register_defaults(settings, fred_api_key="c" * 32)
        try:
            assert f"secret/{FRED_SECRET}" in done.documents
            assert Secret.load(FRED_SECRET).get() == "c" * 32
        finally:
            Secret.delete(FRED_SECRET)


class TestNotifyTask:
    def test_notify_level_delivers_from_a_flow(self, inbox: Receiver) -> None:
        @flow(name="tell-l2")
        def tell() -> None:
            notify_level("l2", "storage", "1.3 GB used")

        tell()
        [message] = inbox.messages("/l2")
        assert message["body"]["subject"] == "storage"
        assert message["body"]["body"] == "1.3 GB used"

    def test_an_undeliverable_notification_fails_the_flow(self) -> None:
        escalation_at(closed_port_url()).save("nobody-listens", overwrite=True)

        @flow(name="tell-nobody")
        def tell() -> None:
            notify_level.with_options(retries=0)("l1", "daemon DEAD", "pid 1", escalation="nobody-listens")

        state = tell(return_state=True)
        assert state.is_failed()
        assert "not delivered" in (state.message or "")

    def test_a_missing_escalation_block_is_an_error_naming_the_fix(self) -> None:
        @flow(name="tell-missing")
        def tell() -> None:
            notify_level.with_options(retries=0)("l1", "x", "y", escalation="never-registered")

        state = tell(return_state=True)
        assert state.is_failed()
        assert "blocks-register" in (state.message or "")


class TestHooks:
    def test_a_failing_flow_tells_l1_with_the_reason_and_the_run(self, inbox: Receiver) -> None:
        @flow(name="always-fails", on_failure=FAILURE_HOOKS, on_crashed=CRASH_HOOKS)
        def always_fails() -> None:
            raise RuntimeError("disk on fire")

        state = always_fails(return_state=True)
        assert state.is_failed()
        [message] = wait_for_messages(inbox, "/l1")
        assert message["body"]["subject"] == "[crypto-agent] always-fails failed"
        assert "disk on fire" in message["body"]["body"]
        assert str(state.state_details.flow_run_id) in message["body"]["body"]

    def test_a_hook_that_cannot_deliver_is_logged_as_an_error_of_the_run(self, receiver: Receiver) -> None:
        register_defaults(load_settings(receiver_url=closed_port_url()))
        try:
            @flow(name="fails-unheard", on_failure=FAILURE_HOOKS)
            def fails_unheard() -> None:
                raise RuntimeError("nobody hears this")

            state = fails_unheard(return_state=True)
        finally:
            register_defaults(load_settings(receiver_url=receiver.url))
        assert state.is_failed()
        logs = _run_logs(state.state_details.flow_run_id, "notify_failure")
        assert any("error was encountered while running hook 'notify_failure'" in line for line in logs), logs

    def test_a_crashed_flow_run_tells_l1(self, inbox: Receiver, tmp_path: Path) -> None:
        # A real process running a flow, killed by SIGTERM: Prefect marks the run Crashed.
        script = tmp_path / "sleeper.py"
        started = tmp_path / "started"
        script.write_text(textwrap.dedent(f"""
            import time
            from pathlib import Path
            from prefect import flow
            from flows.notify import CRASH_HOOKS, FAILURE_HOOKS

            @flow(name="sleeps-until-killed", on_failure=FAILURE_HOOKS, on_crashed=CRASH_HOOKS)
            def sleeper() -> None:
                Path({str(started)!r}).write_text("x")
                time.sleep(120)

            sleeper()
        """))
        env = {
            **os.environ,
            "PREFECT_API_URL": str(get_current_settings().api.url),
            "PYTHONPATH": str(PROJECT_DIR),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=PROJECT_DIR,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 60
            while not started.exists():
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the flow did not start"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        [message] = wait_for_messages(inbox, "/l1")
        assert message["body"]["subject"] == "[crypto-agent] sleeps-until-killed crashed"


def _run_logs(flow_run_id: Any, contains: str, timeout_s: float = 30.0) -> list[str]:
    """Log messages of a flow run that mention `contains` (logs reach the API in batches)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            found = [log.message for log in logs if contains in log.message]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.25)
