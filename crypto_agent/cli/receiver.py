"""Commands: receiver (the local webhook receiver that stands in for Slack)."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import typer

from crypto_agent.cli.app import app
from crypto_agent.receiver import Receiver, receiver_from_settings
from crypto_agent.settings import load_settings


@app.command("receiver")
def run_receiver(
    port: int | None = typer.Option(
        None, "--port", min=0, max=65535, help="Port on 127.0.0.1; default: the one of receiver_url."
    ),
    log: Path | None = typer.Option(None, "--log", help="JSON-lines log; default: settings.receiver_log."),
) -> None:
    """Run the webhook receiver on 127.0.0.1 in the foreground until SIGTERM or Ctrl-C."""
    settings = load_settings()
    if port is None:
        receiver = receiver_from_settings(settings)
    else:
        receiver = Receiver(port=port, log_path=settings.receiver_log)
    if log is not None:
        receiver.log_path = log
    receiver.start()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        receiver.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"receiver listening on {receiver.url}; log {receiver.log_path}; GET {receiver.url}/messages", flush=True)
    receiver.serve_forever()
    print("receiver stopped", flush=True)
