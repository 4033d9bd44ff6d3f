"""The escalation Block, its registration, the notify task and the state hooks, against the real receiver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from flow_kit import wait_for_messages
from prefect import flow, get_client
from prefect.blocks.notifications import CustomWebhookNotificationBlock, MattermostWebhook, SlackWebhook
from prefect.blocks.system import Secret
from prefect.client.schemas.actions import BlockDocumentCreate
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.settings import get_current_settings
from prefect.testing.standard_test_suites.blocks import BlockStandardTestSuite
from pydantic import ValidationError

from blocks.escalation import DEFAULT_ESCALATION, Delivery, Escalation, NotificationUndelivered
from blocks.register import FRED_SECRET, register_defaults
from crypto_agent.receiver import Receiver
from crypto_agent.settings import load_settings
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, notify_level

PROJECT_DIR = Path(__file__).resolve().parents[2]


def webhook(url: str, name: str = "test") -> CustomWebhookNotificationBlock:
    return CustomWebhookNotificationBlock(
        name=name, url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}, timeout=5
    )


def escalation_at(base_url: str, **levels: Any) -> Escalation:
    """Every level a webhook to <base_url>/<level>, but for the levels given."""
    return Escalation(**{lvl: webhook(f"{base_url}/{lvl}") for lvl in ("l1", "l2", "l3")} | levels)


def closed_port_url() -> str:
    r = Receiver(port=0).start()
    url = r.url
    r.stop()
    return url


def mattermost_at(base_url: str, token: str = "tok3n42") -> MattermostWebhook:
    """A Mattermost block posting through Apprise to http://127.0.0.1:<port>/hooks/<token>."""
    url = urlsplit(base_url)
    assert url.hostname and url.port
    return MattermostWebhook(hostname=url.hostname, port=url.port, token=token, secure=False)


@pytest.fixture
def failing() -> Iterator[Receiver]:
    """A second receiver that answers every POST with 500 (and records it)."""
    with Receiver(port=0) as r:
        r.respond_with(500)
        yield r


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
        assert exc.value.fell_back_to is None

    def test_a_non_2xx_answer_is_an_error(self, inbox: Receiver) -> None:
        inbox.respond_with(500)
        with pytest.raises(NotificationUndelivered, match="500"):
            escalation_at(inbox.url).notify("l1", "x", "y")

    def test_a_malformed_webhook_url_is_an_error(self) -> None:
        down = closed_port_url()
        escalation = Escalation(l1=webhook("127.0.0.1:1/l1"), l2=webhook(f"{down}/l2"), l3=webhook(f"{down}/l3"))
        with pytest.raises(NotificationUndelivered, match="L1") as exc:
            escalation.notify("l1", "x", "y")
        assert exc.value.level == "l1" and exc.value.fell_back_to is None

    def test_a_slack_block_with_an_unusable_url_is_an_error_not_silence(self, inbox: Receiver) -> None:
        # Apprise cannot parse a non-Slack URL and would send nothing without a word: L2 hears of it instead.
        escalation = Escalation(
            l1=SlackWebhook(url=f"{inbox.url}/l1"), l2=webhook(f"{inbox.url}/l2"), l3=webhook(f"{inbox.url}/l3")
        )
        with pytest.raises(NotificationUndelivered, match="no usable webhook URL") as exc:
            escalation.notify("l1", "x", "y")
        assert exc.value.fell_back_to == "l2"
        assert "fix the URL of each block with no usable webhook URL" in str(exc.value)
        assert [m["path"] for m in inbox.messages()] == ["/l2"]
        assert inbox.messages("/l2")[0]["body"]["subject"] == "[undelivered to L1 (on-call): no usable webhook URL] x"

    def test_an_unknown_level_is_refused(self, inbox: Receiver) -> None:
        with pytest.raises(ValueError, match="unknown escalation level"):
            escalation_at(inbox.url).notify("l4", "x", "y")


class TestSeveralBlocksPerLevel:
    def test_a_level_with_two_blocks_delivers_to_both(self, inbox: Receiver) -> None:
        escalation = escalation_at(
            inbox.url, l1=[webhook(f"{inbox.url}/oncall-a", "a"), webhook(f"{inbox.url}/oncall-b", "b")]
        )
        result = escalation.notify("l1", "daemon DEAD", "pid 123")
        assert result == Delivery(
            level="l1", delivered=["l1[0] CustomWebhookNotificationBlock", "l1[1] CustomWebhookNotificationBlock"],
            failed=[],
        )
        for path in ("/oncall-a", "/oncall-b"):
            assert [m["body"] for m in inbox.messages(path)] == [{"subject": "daemon DEAD", "body": "pid 123"}]
        assert inbox.messages("/l2") == []

    def test_a_mattermost_block_delivers_through_apprise_to_a_mattermost_webhook(self, inbox: Receiver) -> None:
        escalation = escalation_at(inbox.url, l1=[mattermost_at(inbox.url, token="tok3n42")])
        result = escalation.notify("l1", "daemon DEAD", "pid 123 exited with 137")
        assert result.delivered == ["l1[0] MattermostWebhook"] and result.failed == []
        [message] = inbox.messages()
        assert message["path"] == "/hooks/tok3n42"
        assert message["headers"]["Content-Type"] == "application/json"
        # Mattermost has no title: Apprise puts the subject above the body in "text", the field it requires.
        assert "daemon DEAD" in message["body"]["text"] and "pid 123 exited with 137" in message["body"]["text"]
        assert message["body"]["text"].index("daemon DEAD") < message["body"]["text"].index("pid 123")

    def test_a_mattermost_webhook_that_says_no_is_a_failure(self, failing: Receiver, inbox: Receiver) -> None:
        escalation = escalation_at(inbox.url, l1=[mattermost_at(failing.url)])
        with pytest.raises(NotificationUndelivered, match="MattermostWebhook") as exc:
            escalation.notify("l1", "x", "y")
        assert [m["path"] for m in failing.messages()] == ["/hooks/tok3n42"]
        assert exc.value.fell_back_to == "l2"

    def test_one_of_two_blocks_failing_is_delivered_and_the_failure_is_returned(
        self, inbox: Receiver, failing: Receiver
    ) -> None:
        escalation = escalation_at(
            inbox.url, l1=[webhook(f"{failing.url}/l1", "broken"), webhook(f"{inbox.url}/l1", "works")]
        )
        result = escalation.notify("l1", "disk", "almost full")
        assert result.level == "l1"
        assert result.delivered == ["l1[1] CustomWebhookNotificationBlock"]
        [failure] = result.failed
        assert failure.startswith("l1[0] CustomWebhookNotificationBlock: ") and "500" in failure
        assert [m["body"]["subject"] for m in inbox.messages("/l1")] == ["disk"]
        assert inbox.messages("/l2") == []  # delivered: no fallback


class TestFallback:
    def test_l1_failing_reaches_l2_with_the_reason_and_still_raises(self, inbox: Receiver, failing: Receiver) -> None:
        escalation = escalation_at(inbox.url, l1=[webhook(f"{failing.url}/l1")])
        with pytest.raises(NotificationUndelivered, match=r"L1 \(on-call\) notification 'daemon DEAD'") as exc:
            escalation.notify("l1", "daemon DEAD", "pid 123")
        assert exc.value.level == "l1" and exc.value.fell_back_to == "l2"
        assert "sent to L2 (DevOps) instead" in exc.value.message
        assert [failure.split(":")[0] for failure in exc.value.failed] == ["l1[0] CustomWebhookNotificationBlock"]
        assert len(failing.messages("/l1")) == 1
        [message] = inbox.messages("/l2")
        subject = message["body"]["subject"]
        assert subject.startswith("[undelivered to L1 (on-call): ") and "500" in subject
        assert subject.endswith("] daemon DEAD")
        assert message["body"]["body"] == "pid 123"
        assert inbox.messages("/l3") == []

    def test_l1_and_l2_failing_reach_l3_with_both_reasons(self, inbox: Receiver) -> None:
        down = closed_port_url()
        escalation = escalation_at(inbox.url, l1=[webhook(f"{down}/l1")], l2=[SlackWebhook(url=f"{down}/l2")])
        with pytest.raises(NotificationUndelivered, match=r"nor by L2 \(DevOps\); sent to L3 \(lead\)") as exc:
            escalation.notify(1, "backup failed", "3rd time")
        assert exc.value.fell_back_to == "l3"
        [message] = inbox.messages("/l3")
        subject = message["body"]["subject"]
        assert subject.startswith("[undelivered to L1 (on-call): ")
        assert "] [undelivered to L2 (DevOps): no usable webhook URL] backup failed" in subject

    def test_a_message_for_l2_falls_back_to_l3_never_down_to_l1(self, inbox: Receiver, failing: Receiver) -> None:
        escalation = escalation_at(inbox.url, l2=[webhook(f"{failing.url}/l2")])
        with pytest.raises(NotificationUndelivered) as exc:
            escalation.notify("l2", "storage", "1.3 GB")
        assert exc.value.level == "l2" and exc.value.fell_back_to == "l3"
        assert inbox.messages("/l1") == []
        assert inbox.messages("/l3")[0]["body"]["subject"].startswith("[undelivered to L2 (DevOps): ")

    def test_every_level_failing_raises_with_no_level_that_got_it(self, failing: Receiver) -> None:
        with pytest.raises(NotificationUndelivered, match="no level took it") as exc:
            escalation_at(failing.url).notify("l1", "daemon DEAD", "pid 123")
        assert exc.value.level == "l1" and exc.value.fell_back_to is None
        assert len(exc.value.failed) == 3
        assert [m["path"] for m in failing.messages()] == ["/l1", "/l2", "/l3"]
        assert failing.messages("/l3")[0]["body"]["subject"].count("[undelivered to ") == 2

    def test_l3_failing_has_no_level_to_fall_back_to(self, inbox: Receiver, failing: Receiver) -> None:
        escalation = escalation_at(inbox.url, l3=[webhook(f"{failing.url}/l3")])
        with pytest.raises(NotificationUndelivered, match="L3 \\(lead\\)") as exc:
            escalation.notify("l3", "review", "incident 7")
        assert exc.value.fell_back_to is None
        assert inbox.messages() == []


class TestSavedBlocks:
    def test_levels_load_back_as_the_block_types_they_were_saved_as(self, receiver: Receiver) -> None:
        Escalation(
            l1=SlackWebhook(url="https://hooks.slack.com/services/T000/B000/XXXX"),
            l2=webhook(f"{receiver.url}/l2"),
            l3=webhook(f"{receiver.url}/l3"),
        ).save("mixed-levels", overwrite=True)
        loaded = Escalation.load("mixed-levels")
        assert isinstance(loaded.channel("l1"), SlackWebhook)
        [l2] = loaded.l2
        assert isinstance(l2, CustomWebhookNotificationBlock) and l2.url == f"{receiver.url}/l2"

    def test_a_mixed_escalation_round_trips_each_block_as_its_own_type(self, receiver: Receiver) -> None:
        Escalation(
            l1=mattermost_at(receiver.url, token="mm-secret-token"),
            l2=[webhook(f"{receiver.url}/l2a", "a"), webhook(f"{receiver.url}/l2b", "b")],
            l3=SlackWebhook(url="https://hooks.slack.com/services/T000/B000/XXXX"),
        ).save("round-trip", overwrite=True)
        loaded = Escalation.load("round-trip")
        assert {lvl: [type(b).__name__ for b in loaded.channels(lvl)] for lvl in ("l1", "l2", "l3")} == {
            "l1": ["MattermostWebhook"],
            "l2": ["CustomWebhookNotificationBlock", "CustomWebhookNotificationBlock"],
            "l3": ["SlackWebhook"],
        }
        [mattermost] = loaded.l1
        assert isinstance(mattermost, MattermostWebhook)
        assert (mattermost.hostname, mattermost.port, mattermost.token.get_secret_value()) == (
            "127.0.0.1", urlsplit(receiver.url).port, "mm-secret-token"
        )
        assert [b.url for b in loaded.channels("l2")] == [f"{receiver.url}/l2a", f"{receiver.url}/l2b"]

    def test_inline_levels_keep_their_secrets_out_of_reads_without_secrets(self, receiver: Receiver) -> None:
        # The server hides secrets by dotted path and its paths do not enter lists: the block hides each level.
        Escalation(
            l1=mattermost_at(receiver.url, token="mm-secret-token"),
            l2=[webhook(f"{receiver.url}/l2a"), webhook(f"{receiver.url}/l2b")],
            l3=SlackWebhook(url="https://hooks.slack.com/services/T000/B000/SLACKSECRET"),
        ).save("hidden-secrets", overwrite=True)
        with get_client(sync_client=True) as client:
            shown = client.read_block_document_by_name(
                "hidden-secrets", Escalation.get_block_type_slug(), include_secrets=False
            )
        assert "mm-secret-token" not in str(shown.data) and "SLACKSECRET" not in str(shown.data)
        assert Escalation.load("hidden-secrets").channel("l1").token.get_secret_value() == "mm-secret-token"

    def test_a_level_of_one_saved_block_stays_a_reference_to_its_document(self, receiver: Receiver) -> None:
        # deployments/automations.py finds a level's block document id through this reference.
        saved = webhook(f"{receiver.url}/l1", "referenced")
        saved.save("referenced-l1", overwrite=True)
        Escalation(
            l1=CustomWebhookNotificationBlock.load("referenced-l1"), l2=[webhook(receiver.url), webhook(receiver.url)],
            l3=webhook(receiver.url),
        ).save("with-reference", overwrite=True)
        Escalation.load("with-reference").save("saved-again", overwrite=True)
        with get_client(sync_client=True) as client:
            for name in ("with-reference", "saved-again"):
                document = client.read_block_document_by_name(name, Escalation.get_block_type_slug())
                assert list(document.block_document_references) == ["l1"], name
                assert document.block_document_references["l1"]["block_document"]["name"] == "referenced-l1"
        assert Escalation.load("saved-again").channel("l1")._block_document_name == "referenced-l1"

    def test_a_single_block_per_level_still_validates_as_a_level_of_one(self, receiver: Receiver) -> None:
        escalation = Escalation(
            l1=SlackWebhook(url="https://hooks.slack.com/services/T000/B000/XXXX"),
            l2=webhook(f"{receiver.url}/l2"),
            l3=(webhook(f"{receiver.url}/l3a"), webhook(f"{receiver.url}/l3b")),
        )
        assert [len(escalation.channels(lvl)) for lvl in ("l1", "l2", "l3")] == [1, 1, 2]
        assert isinstance(escalation.l1[0], SlackWebhook)

    def test_an_empty_level_is_refused(self, receiver: Receiver) -> None:
        with pytest.raises(ValidationError, match="l2"):
            Escalation(l1=webhook(receiver.url), l2=[], l3=webhook(receiver.url))

    def test_a_document_saved_by_the_one_block_version_loads(self, receiver: Receiver) -> None:
        # What the first version stored: a saved level as a reference, an unsaved one inline as a dict.
        mattermost = mattermost_at(receiver.url, token="old-token")
        mattermost.save("old-l1", overwrite=True)
        slack = SlackWebhook(url="https://hooks.slack.com/services/T000/B000/OLD")
        slack.save("old-l3", overwrite=True)
        Escalation.register_type_and_schema()
        inline_l2 = webhook(f"{receiver.url}/l2").model_dump(context={"include_secrets": True})
        assert inline_l2["block_type_slug"] == "custom-webhook"
        with get_client(sync_client=True) as client:
            client.create_block_document(BlockDocumentCreate(
                name="one-block-version",
                block_schema_id=Escalation._block_schema_id,
                block_type_id=Escalation._block_type_id,
                data={
                    "l1": {"$ref": {"block_document_id": str(mattermost._block_document_id)}},
                    "l2": inline_l2,
                    "l3": {"$ref": {"block_document_id": str(slack._block_document_id)}},
                },
            ))
        loaded = Escalation.load("one-block-version")
        assert [type(loaded.channel(lvl)).__name__ for lvl in ("l1", "l2", "l3")] == [
            "MattermostWebhook", "CustomWebhookNotificationBlock", "SlackWebhook"
        ]
        assert loaded.channel("l1").token.get_secret_value() == "old-token"
        assert loaded.channel("l2").url == f"{receiver.url}/l2"

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
        assert sorted(named) == ["crypto-agent", "crypto-agent-l1", "crypto-agent-l2", "crypto-agent-l3",
                                 "crypto-agent-war-room"]

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

    def test_a_fallback_is_sent_once_the_task_fails_and_is_not_retried(self, inbox: Receiver) -> None:
        escalation_at(inbox.url, l1=webhook(f"{closed_port_url()}/l1")).save("l1-unreachable", overwrite=True)

        @flow(name="tell-l1-down")
        def tell() -> None:
            notify_level("l1", "daemon DEAD", "pid 1", escalation="l1-unreachable")  # retries=1 as deployed

        state = tell(return_state=True)
        assert state.is_failed() and "sent to L2 (DevOps) instead" in (state.message or ""), state.message
        time.sleep(3)  # past the task's retry delay: a retry would have sent it again
        [l2] = inbox.messages("/l2")
        assert l2["body"]["subject"].startswith("[undelivered to L1 (on-call): ") and "daemon DEAD" in \
            l2["body"]["subject"]

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
