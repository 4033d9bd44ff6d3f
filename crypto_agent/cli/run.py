"""Command: run (the main job on embedded defaults: exchange, backfill, data checks, report)."""

from __future__ import annotations

import time
from contextlib import ExitStack
from urllib.parse import urlsplit

import httpx
import typer
from rich.console import Console

from crypto_agent.cli.app import app
from crypto_agent.cli.data import backfill_universe, check_db_writable, check_store_sound
from crypto_agent.cli.quality import print_report
from crypto_agent.errors import ConfigError
from crypto_agent.exchange import BinanceClient
from crypto_agent.quality import check_data
from crypto_agent.settings import Settings, load_settings
from crypto_agent.simulator import Simulator
from crypto_agent.store import Store

LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def exchange_answers(url: str, timeout_s: float = 1.0) -> bool:
    """True when something answers /api/v3/ping at url."""
    try:
        return httpx.get(f"{url}/api/v3/ping", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def ensure_exchange(stack: ExitStack, settings: Settings, console: Console) -> str:
    """The exchange URL to use: the configured one when it answers, else the simulator started on it."""
    url = settings.exchange_url
    if exchange_answers(url):
        console.print(f"exchange: {url} answers; using it")
        return url
    parts = urlsplit(url)
    if parts.hostname not in LOCAL_HOSTS or parts.port is None:
        raise ConfigError(
            f"the exchange at {url} does not answer",
            hint="check the network and CRYPTO_AGENT_EXCHANGE_URL; the bundled simulator is only started "
            "for a 127.0.0.1 URL with a port",
        )
    sim = Simulator(host="127.0.0.1", port=parts.port, symbols=tuple(settings.symbols))
    try:
        sim.start()
    except OSError as exc:
        raise ConfigError(
            f"cannot start the simulator on port {parts.port}: {exc.strerror}",
            hint="free the port, or point CRYPTO_AGENT_EXCHANGE_URL at another 127.0.0.1 port",
        ) from None
    stack.callback(sim.stop)
    console.print(f"exchange: started the bundled simulator at {sim.url}")
    return sim.url


@app.command("run")
def run_command() -> None:
    """The main job on embedded defaults: start the simulator, backfill the universe, check the data, report."""
    settings = load_settings()
    check_db_writable(settings)
    check_store_sound(settings)
    out, err = Console(), Console(stderr=True)
    started = time.perf_counter()
    with ExitStack() as stack:
        url = ensure_exchange(stack, settings, out)
        client = stack.enter_context(BinanceClient.from_settings(settings, base_url=url))
        client.ping()
        store = stack.enter_context(Store(settings.database_url))
        out.print(f"store: {settings.db_path}")
        summary, written = backfill_universe(stack, settings, store, client, err)
        out.print(f"backfill: {written}; {len(summary.failures)} failed")
        for symbol, message in summary.failures.items():
            err.print(f"failed: {symbol}: {message}", markup=False)
        report = check_data(store, settings)
        print_report(report, out)
    out.print(f"done in {time.perf_counter() - started:.1f} s")
    raise typer.Exit(0 if report.ok and summary.ok else 1)
