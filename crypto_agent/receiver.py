"""The local webhook receiver: a real HTTP server on 127.0.0.1 that stands in for Slack.

It accepts a POST (or PUT/PATCH) of any JSON or text on any path, records it in memory and as one
JSON line in a log file, and answers ``GET /messages`` (optionally ``?path=/l1``) with what it got.
The escalation levels post to ``/l1``, ``/l2``, ``/l3`` so one receiver serves all three. A POST to
``/hooks/<token>`` is answered as a Mattermost incoming webhook answers it (200, ``ok`` as plain text),
so Prefect's MattermostWebhook block can deliver to it through Apprise.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from crypto_agent.errors import ConfigError

MATTERMOST_HOOKS = "/hooks/"  # a Mattermost incoming webhook: POST /hooks/<token>, JSON {"text": ...}
# Headers worth keeping: enough to tell who sent what, never an Authorization or a cookie.
KEPT_HEADERS = ("content-type", "user-agent", "content-length")
MAX_BODY_BYTES = 1_000_000


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return  # the JSON-lines log is the record; stderr stays quiet

    def _reply(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/messages":
            wanted = parse_qs(url.query).get("path")
            self._reply(HTTPStatus.OK, self.server.receiver.messages(wanted[0] if wanted else None))
        elif url.path == "/health":
            self._reply(HTTPStatus.OK, {"status": "ok", "received": len(self.server.receiver.messages())})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such page {url.path}; POST anything, GET /messages"})

    def _receive(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return
        raw = self.rfile.read(length) if length else b""
        text = raw.decode("utf-8", errors="replace")
        body: Any
        try:
            body = json.loads(text) if text else None
        except json.JSONDecodeError:
            body = text
        path = urlsplit(self.path).path
        status = self.server.receiver.record(
            path=path,
            headers={k: v for k, v in self.headers.items() if k.lower() in KEPT_HEADERS},
            body=body,
        )
        if path.startswith(MATTERMOST_HOOKS) and status == HTTPStatus.OK:
            self._send(status, b"ok", "text/plain")  # what Mattermost answers a message it took
        else:
            self._reply(status, {"ok": status < 300})

    do_POST = do_PUT = do_PATCH = _receive


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every message it gets, in memory and in a log file."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", log_path: Path | str | None = None) -> None:
        self.host = host
        self.port = port
        self.log_path = Path(log_path) if log_path is not None else None
        self._messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._status = int(HTTPStatus.OK)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the running receiver, e.g. http://127.0.0.1:8766."""
        if self._server is None:
            raise RuntimeError("the receiver is not running; call start() first")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> Receiver:
        """Bind and serve in a background thread; ConfigError when the port is taken."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            server = _Server((self.host, self.port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror}",
                hint="another receiver may already run there; choose another --port "
                "(and set CRYPTO_AGENT_RECEIVER_URL to match)",
            ) from None
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def serve_forever(self) -> None:
        """Serve in the calling thread until stop() is called from another thread or a signal handler."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=0.5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def respond_with(self, status: int) -> None:
        """Answer every later POST with this HTTP status (to rehearse a webhook that rejects messages)."""
        self._status = int(status)

    def record(self, path: str, headers: dict[str, str], body: Any) -> int:
        """Keep one received message in memory and in the log; the HTTP status to answer with."""
        message = {
            "received_at": datetime.now(UTC).isoformat(),
            "path": path,
            "headers": headers,
            "body": body,
            "status": self._status,
        }
        with self._lock:
            self._messages.append(message)
            if self.log_path is not None:
                with self.log_path.open("a", encoding="utf-8") as log:
                    log.write(json.dumps(message) + "\n")
        return self._status

    def clear(self) -> None:
        """Forget the messages kept in memory (the log file keeps them)."""
        with self._lock:
            self._messages.clear()

    def messages(self, path: str | None = None) -> list[dict[str, Any]]:
        """Messages received so far, oldest first; only those posted to `path` when given."""
        with self._lock:
            return [dict(m) for m in self._messages if path is None or m["path"] == path]


def receiver_from_settings(settings: Any, port: int | None = None) -> Receiver:
    """A receiver on the port of settings.receiver_url (or `port`), logging to settings.receiver_log."""
    url = urlsplit(settings.receiver_url)
    if url.hostname not in ("127.0.0.1", "localhost"):
        raise ConfigError(
            f"receiver_url {settings.receiver_url} is not on this machine",
            hint="the local receiver only listens on 127.0.0.1; point CRYPTO_AGENT_RECEIVER_URL there",
        )
    return Receiver(port=port if port is not None else (url.port or 80), log_path=settings.receiver_log)
