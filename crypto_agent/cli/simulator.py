"""Commands: simulator (the bundled Binance-compatible exchange, Fear & Greed and FRED)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import typer

from crypto_agent.cli.app import app
from crypto_agent.errors import InputError


@app.command("simulator")
def simulator(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8765, "--port", help="Port to listen on (0: any free port)."),
    weight_limit: int = typer.Option(6000, "--weight-limit", help="Request weight allowed per window."),
    weight_window_s: float = typer.Option(60.0, "--weight-window-s", help="Length of a weight window, seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the simulated market."),
    history_days: int = typer.Option(800, "--history-days", help="Days of candles before now."),
    fred_api_key: str | None = typer.Option(
        None, "--fred-api-key", envvar="CRYPTO_AGENT_SIM_FRED_API_KEY",
        help="Accept only this FRED api_key (default: any non-empty key).",
    ),
) -> None:
    """Serve the simulated exchange on HOST:PORT until SIGTERM or Ctrl-C; exit 1 if the port is taken."""
    # Imported here so other commands do not pay for numpy.
    from crypto_agent.simulator import Simulator

    if not 0 <= port <= 65535:
        raise InputError(f"--port {port} is out of range", hint="use 1-65535, or 0 for any free port")
    sim = Simulator(
        host=host,
        port=port,
        weight_limit=weight_limit,
        weight_window_s=weight_window_s,
        seed=seed,
        history_days=history_days,
        fred_api_key=fred_api_key,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        sim.start()
        print(sim.url, flush=True)
        print(
            f"simulator serving {len(sim.symbols)} symbols (seed {seed}, {history_days} days, "
            f"weight limit {weight_limit} per {weight_window_s:g} s); SIGTERM or Ctrl-C stops it",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("simulator stopped", flush=True)
