"""Command: watchdog (the stack checked from outside Prefect, for cron or a systemd timer)."""

from __future__ import annotations

import json

import typer

from crypto_agent import watchdog
from crypto_agent.cli.app import app
from crypto_agent.settings import load_settings


@app.command("watchdog")
def run_watchdog(
    api_url: str | None = typer.Option(
        None, "--api-url", help="Prefect API; default: PREFECT_API_URL, else http://127.0.0.1:<prefect_port>/api."
    ),
    timeout_s: float = typer.Option(watchdog.HTTP_TIMEOUT_S, "--timeout", min=0.1, help="Seconds per HTTP request."),
    tick_max_age_s: float = typer.Option(
        watchdog.TICK_MAX_AGE_S, "--tick-max-age", min=1, help="Oldest health-monitor round (s) that counts as ticking."
    ),
    realert_s: float = typer.Option(
        watchdog.REALERT_S, "--realert", min=0, help="Seconds before the same unfixed problem is posted again."
    ),
    part: list[str] = typer.Option(
        list(watchdog.PARTS), "--part",
        help="A stack process to check by its run/<name>.pid (repeatable); `--part none` checks none (under systemd, "
        "which keeps the worker and relay alive itself).",
    ),
    webhook: list[str] = typer.Option(
        [], "--webhook", help="An extra webhook URL to post the L2 alert to (repeatable), besides the receiver's /l2."
    ),
    alert: bool = typer.Option(True, "--alert/--no-alert", help="Post (and remember) alerts; --no-alert only looks."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check the Prefect API, the serving process, the relay and the monitor's tick; tell L2 directly when down.

    Exit 0 when all is up, 1 when something is down, 3 when something is down and no webhook took the alert.
    """
    settings = load_settings()
    parts = [] if part == ["none"] else part
    run = watchdog.watch(settings, api_url=api_url, timeout_s=timeout_s, parts=parts, tick_max_age_s=tick_max_age_s,
                         realert_s=realert_s, webhooks=webhook, alert=alert)
    if as_json:
        print(json.dumps({**run.report.to_dict(), "alert": {"post": run.decision.post, "reason": run.decision.reason},
                          "deliveries": [d.__dict__ for d in run.deliveries]}, indent=2))
    else:
        print(run.report.message)
        print(f"alert: {'posted' if run.deliveries else 'not posted'} ({run.decision.reason})")
        for d in run.deliveries:
            print(f"  {d.url}: {'accepted' if d.ok else 'FAILED'} ({d.detail})")
    raise typer.Exit(run.exit_code)
