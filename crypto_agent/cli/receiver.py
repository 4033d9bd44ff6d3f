"""Commands: receiver (the local webhook receiver that stands in for Slack)."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Optional

import typer

from crypto_agent.cli.app import app
from crypto_agent.receiver import Receiver, receiver_from_settings
from crypto_agent.settings import load_settings


@app.command("receiver")
def run_receiver(
    port: Optional[int] = typer.Option(
        None, "--port", min=0, max=65535, help="Port on 127.0.0.1; default: the one of receiver_url."
    ),
    log: Optional[Path] = typer.Option(None, "--log", help="JSON-lines log; default: settings.receiver_log."),
) -> None:
    """Run the webhook receiver on 127.0.0.1 in the foreground until SIGTERM or Ctrl-C."""
    settings = load_settings()
    receiver = receiver_from_settings(settings, port=port)
    if log is not None:
        receiver = Receiver(port=receiver.port, log_path=log)
    receiver.start()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        receiver.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"receiver listening on {receiver.url}; log {receiver.log_path}; GET {receiver.url}/messages", flush=True)
    receiver.serve_forever()
    print("receiver stopped", flush=True)
