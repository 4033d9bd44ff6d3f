"""The local webhook receiver: a real HTTP server on 127.0.0.1, a real process for the command."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from crypto_agent.errors import ConfigError
from crypto_agent.receiver import Receiver, receiver_from_settings
from crypto_agent.settings import load_settings


@pytest.fixture
def receiver(tmp_path: Path):
    with Receiver(port=0, log_path=tmp_path / "logs" / "receiver.jsonl") as r:
        yield r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestReceivesAnything:
    def test_json_post_on_any_path_is_recorded_with_its_path_and_body(self, receiver: Receiver) -> None:
        r = httpx.post(f"{receiver.url}/l1", json={"text": "daemon DEAD"}, timeout=5)
        assert r.status_code == 200
        [m] = receiver.messages()
        assert m["path"] == "/l1"
        assert m["body"] == {"text": "daemon DEAD"}
        assert m["headers"]["Content-Type"] == "application/json"

    def test_text_body_is_kept_as_text(self, receiver: Receiver) -> None:
        httpx.post(f"{receiver.url}/hooks/x", content=b"plain words", timeout=5)
        assert receiver.messages()[0]["body"] == "plain words"

    def test_messages_can_be_filtered_by_path(self, receiver: Receiver) -> None:
        for level in ("l1", "l2", "l1"):
            httpx.post(f"{receiver.url}/{level}", json={"level": level}, timeout=5)
        assert [m["body"]["level"] for m in receiver.messages("/l1")] == ["l1", "l1"]
        assert len(receiver.messages("/l3")) == 0

    def test_get_messages_returns_what_it_got_over_http(self, receiver: Receiver) -> None:
        httpx.post(f"{receiver.url}/l2", json={"n": 1}, timeout=5)
        httpx.post(f"{receiver.url}/l3", json={"n": 2}, timeout=5)
        every = httpx.get(f"{receiver.url}/messages", timeout=5).json()
        only_l3 = httpx.get(f"{receiver.url}/messages", params={"path": "/l3"}, timeout=5).json()
        assert [m["body"]["n"] for m in every] == [1, 2]
        assert [m["body"]["n"] for m in only_l3] == [2]

    def test_each_message_is_appended_to_the_log_as_a_json_line(self, receiver: Receiver) -> None:
        httpx.post(f"{receiver.url}/l1", json={"a": 1}, timeout=5)
        httpx.post(f"{receiver.url}/l1", content=b"b", timeout=5)
        assert receiver.log_path is not None
        lines = [json.loads(line) for line in receiver.log_path.read_text().splitlines()]
        assert [line["body"] for line in lines] == [{"a": 1}, "b"]
        assert all(line["received_at"].endswith("+00:00") for line in lines)

    def test_authorization_headers_are_never_recorded(self, receiver: Receiver) -> None:
        httpx.post(f"{receiver.url}/l1", json={}, headers={"Authorization": "Bearer s3cret"}, timeout=5)
        assert "s3cret" not in json.dumps(receiver.messages())
        assert receiver.log_path is not None and "s3cret" not in receiver.log_path.read_text()

    def test_respond_with_makes_posts_fail_with_that_status(self, receiver: Receiver) -> None:
        receiver.respond_with(503)
        r = httpx.post(f"{receiver.url}/l1", json={}, timeout=5)
        assert r.status_code == 503


class TestMattermostIncomingWebhook:
    def test_a_post_to_hooks_token_is_answered_as_mattermost_does(self, receiver: Receiver) -> None:
        r = httpx.post(f"{receiver.url}/hooks/tok3n42", json={"text": "#### daemon DEAD\npid 123"}, timeout=5)
        assert (r.status_code, r.text, r.headers["Content-Type"]) == (200, "ok", "text/plain")
        [m] = receiver.messages("/hooks/tok3n42")
        assert m["body"] == {"text": "#### daemon DEAD\npid 123"}

    def test_only_a_hooks_post_it_takes_gets_mattermosts_ok(self, receiver: Receiver) -> None:
        assert httpx.post(f"{receiver.url}/l1", json={"text": "x"}, timeout=5).json() == {"ok": True}
        receiver.respond_with(500)
        refused = httpx.post(f"{receiver.url}/hooks/tok3n42", json={"text": "x"}, timeout=5)
        assert refused.status_code == 500 and refused.json() == {"ok": False}
        receiver.respond_with(200)
        assert httpx.post(f"{receiver.url}/hooks/tok3n42", json={"text": "x"}, timeout=5).text == "ok"


class TestLifecycle:
    def test_stop_releases_the_port_and_later_posts_fail(self, tmp_path: Path) -> None:
        r = Receiver(port=0).start()
        url = r.url
        r.stop()
        r.stop()  # twice is fine
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{url}/l1", json={}, timeout=2)

    def test_a_taken_port_is_a_config_error_with_a_hint(self) -> None:
        with Receiver(port=0) as first:
            port = int(first.url.rsplit(":", 1)[1])
            with pytest.raises(ConfigError, match="cannot listen") as exc:
                Receiver(port=port).start()
            assert "--port" in str(exc.value)

    def test_settings_give_the_port_and_the_log_under_logs_dir(self, tmp_path: Path) -> None:
        settings = load_settings(home=tmp_path, receiver_url="http://127.0.0.1:9911")
        r = receiver_from_settings(settings)
        assert r.port == 9911
        assert r.log_path == tmp_path / "logs" / "receiver.jsonl"

    def test_a_remote_receiver_url_is_refused(self, tmp_path: Path) -> None:
        settings = load_settings(home=tmp_path, receiver_url="http://hooks.example.com")
        with pytest.raises(ConfigError, match="not on this machine"):
            receiver_from_settings(settings)

    def test_a_malformed_receiver_url_is_a_config_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="receiver_url"):
            load_settings(home=tmp_path, receiver_url="127.0.0.1:8766")


class TestCommand:
    def test_crypto_agent_receiver_serves_records_and_stops_on_sigterm(self, tmp_path: Path) -> None:
        port = free_port()
        env = {**os.environ, "CRYPTO_AGENT_HOME": str(tmp_path)}
        env.pop("CRYPTO_AGENT_CONFIG", None)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from crypto_agent.cli import main; main()", "receiver", "--port", str(port)],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"{url}/health", timeout=1)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                    assert time.monotonic() < deadline, "receiver did not come up"
                    time.sleep(0.1)
            httpx.post(f"{url}/l1", json={"text": "hello"}, timeout=5)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == 0, err
        assert f"receiver listening on {url}" in out
        log = tmp_path / "logs" / "receiver.jsonl"
        assert json.loads(log.read_text().splitlines()[0])["body"] == {"text": "hello"}
