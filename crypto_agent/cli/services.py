"""Commands: daemon, trader (run a service in the foreground), status (the runbook's status_check.sh),
`service start|stop|restart|dump-stacks|clean <name>` (process control for operators), and
`service pause|resume <name>` (a service kept stopped until a person resumes it, as after a rollback)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from crypto_agent import health, holds, priority, process
from crypto_agent.cli.app import app
from crypto_agent.cli.data import check_store_sound
from crypto_agent.cli.storeerrors import database_error
from crypto_agent.errors import CryptoAgentError
from crypto_agent.service import EXIT_CRASHED
from crypto_agent.settings import Settings, load_settings
from crypto_agent.store import Store
from crypto_agent.storelock import lock_path

service_app = typer.Typer(
    help="Process control of a service (backtest, trader): start, stop, restart, dump-stacks, clean.",
    no_args_is_help=True,
)
app.add_typer(service_app, name="service")

NAME_HELP = "The service: backtest (the 24/7 daemon) or trader (paper live trading)."
GRACE_HELP = "Seconds between SIGTERM and SIGKILL (default stop_grace_s)."


@contextmanager
def _existing_store(settings: Settings) -> Iterator[Store | None]:
    """The store when its database already exists (a probe or a stop never creates one), else None."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and (url.database in (None, "", ":memory:") or not settings.db_path.exists()):
        yield None
        return
    try:
        store = Store(settings.database_url)
    except CryptoAgentError as exc:
        print(f"warning: history not recorded: {exc}", file=sys.stderr)
        yield None
        return
    try:
        yield store
    finally:
        store.close()


def _service_exit(name: str, code: int, settings: Settings) -> None:
    """Exit with a service's code; after a crash, say on stderr why when it is the store, else where the log is."""
    if code == EXIT_CRASHED:
        log = process.service_spec(name, settings).log
        try:
            check_store_sound(settings)
        except CryptoAgentError as exc:
            print(f"error: the {name} service stopped (exit {code}): {exc}\n  its log: {log}", file=sys.stderr)
        else:
            print(f"error: the {name} service crashed (exit {code}); its log {log} says why", file=sys.stderr)
    raise typer.Exit(code)


@app.command("daemon")
def daemon_command() -> None:
    """Run the 24/7 backtest daemon in the foreground until SIGTERM (`service start backtest` detaches it)."""
    from crypto_agent.daemon import run_daemon

    settings = load_settings()
    _service_exit("backtest", run_daemon(settings), settings)


@app.command("trader")
def trader_command() -> None:
    """Run the paper live-trading service in the foreground until SIGTERM; it never sends an order."""
    from crypto_agent.trader import run_trader

    settings = load_settings()
    _service_exit("trader", run_trader(settings), settings)


@app.command("status")
def status_command(
    service: str = typer.Option("backtest", "--service", help=NAME_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the whole probe report as JSON."),
    record: bool = typer.Option(True, "--record/--no-record", help="Keep the report in the store's history."),
) -> None:
    """Probe a service and print HEALTHY / DEGRADED / DEAD; exit 0 only when healthy (fit for cron)."""
    settings = load_settings()
    spec = process.service_spec(service, settings)
    report = health.probe(spec, settings)
    recorded = False
    if record:
        with _existing_store(settings) as store:
            if store is not None:
                try:
                    recorded = health.record(store, report)
                except SQLAlchemyError as exc:
                    print(f"warning: history not recorded: {database_error(exc)}", file=sys.stderr)
    context = service_context(spec, settings)
    if as_json:
        print(json.dumps({**report.to_dict(), "recorded": recorded, **context}, indent=2))
    else:
        print(report.summary)
        for reason in report.reasons[1:]:
            print(f"  also: {reason}")
        for line in context_lines(context):
            print(f"  {line}")
    raise typer.Exit(0 if report.healthy else 1)


def service_context(spec: process.ServiceSpec, settings: Settings) -> dict[str, object]:
    """What keeps a service from its work on purpose: its hold, a yield request (live trading first) for the
    backtest, the store's recovery lock."""
    hold = holds.read_hold(spec)
    asked = priority.yield_request(settings) if spec.name == priority.YIELDING_SERVICE else None
    lock = lock_path(settings.db_path)
    return {"hold": hold.to_dict() if hold else None, "hold_text": hold.description if hold else None,
            "yield_request": asked.to_dict() if asked else None, "yield_text": asked.description if asked else None,
            "store_locked": str(lock) if lock.exists() else None}


def context_lines(context: dict[str, object]) -> list[str]:
    """The context as lines for people, with what to run to lift it."""
    lines = []
    if context["hold_text"]:
        lines.append(f"held: {context['hold_text']} (`crypto-agent service resume` lifts a pause)")
    if context["yield_text"]:
        lines.append(f"yields to the trader (live trading first), asked {context['yield_text']}")
    if context["store_locked"]:
        lines.append(f"the store is locked by a recovery: {context['store_locked']}")
    return lines


@service_app.command("start")
def start_command(
    name: str = typer.Argument(..., help=NAME_HELP),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds to wait for the first heartbeat."),
) -> None:
    """Start the service detached; returns once it wrote its pidfile and first heartbeat."""
    settings = load_settings()
    spec = process.service_spec(name, settings)
    with _existing_store(settings) as store:
        result = process.start(spec, settings, timeout_s=timeout, store=store)
    cleaned = f"; cleaned stale {', '.join(p.name for p in result.cleaned)}" if result.cleaned else ""
    print(f"started {name}: PID {result.pid} in {result.elapsed_s:.1f} s (log {result.log}){cleaned}")


@service_app.command("stop")
def stop_command(
    name: str = typer.Argument(..., help=NAME_HELP),
    grace: float | None = typer.Option(None, "--grace", help=GRACE_HELP),
) -> None:
    """SIGTERM the service, SIGKILL it after the grace period; refuses a PID that is not ours."""
    settings = load_settings()
    spec = process.service_spec(name, settings)
    with _existing_store(settings) as store:
        result = process.stop(spec, grace_s=grace, store=store)
    print(_stop_line(result))


@service_app.command("restart")
def restart_command(
    name: str = typer.Argument(..., help=NAME_HELP),
    grace: float | None = typer.Option(None, "--grace", help=GRACE_HELP),
    timeout: float | None = typer.Option(None, "--timeout", help="Seconds to wait for the first heartbeat."),
) -> None:
    """Stop (if running) and start the service."""
    settings = load_settings()
    spec = process.service_spec(name, settings)
    with _existing_store(settings) as store:
        stopped, started = process.restart(spec, settings, grace_s=grace, timeout_s=timeout, store=store)
    print(_stop_line(stopped))
    print(f"started {name}: PID {started.pid} in {started.elapsed_s:.1f} s (log {started.log})")


@service_app.command("dump-stacks")
def dump_stacks_command(
    name: str = typer.Argument(..., help=NAME_HELP),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the dump."),
) -> None:
    """Have the service write every thread's stack (SIGUSR1) to logs/<name>_stacks_<epoch>.txt; print the path."""
    spec = process.service_spec(name, load_settings())
    print(process.dump_stacks(spec, timeout_s=timeout))


@service_app.command("clean")
def clean_command(name: str = typer.Argument(..., help=NAME_HELP)) -> None:
    """Remove the pidfile and heartbeat of a service that is gone (refused while it runs); signals nothing."""
    settings = load_settings()
    spec = process.service_spec(name, settings)
    with _existing_store(settings) as store:
        removed = process.clean_state(spec, store=store)
    print(f"removed {', '.join(str(p) for p in removed)}" if removed else f"{name}: no state files to remove")


@service_app.command("pause")
def pause_command(
    name: str = typer.Argument(..., help=NAME_HELP),
    reason: str = typer.Option("paused by an operator", "--reason", help="Why; shown to whoever tries to start it."),
) -> None:
    """Stop the service and keep it stopped (run/<name>.paused): no recovery restarts it until `service resume`."""
    settings = load_settings()
    spec = process.service_spec(name, settings)
    marker = holds.keep_stopped(spec, by="crypto-agent service pause", reason=reason)
    with _existing_store(settings) as store:
        result = process.stop(spec, store=store)
    state = f"stopped PID {result.pid}" if result.was_running else "it was not running"
    print(f"paused {name} ({marker}); {state}")


@service_app.command("resume")
def resume_command(
    name: str = typer.Argument(..., help=NAME_HELP),
    start: bool = typer.Option(True, "--start/--no-start", help="Start the service once the pause is lifted."),
) -> None:
    """Lift a pause (e.g. the backtest after a rollback) and start the service again."""
    settings = load_settings()
    spec = process.service_spec(name, settings)
    was = holds.release_hold(spec)
    if was is None:
        print(f"{name} was not paused")
    else:
        since = "?" if was.since is None else was.marker()["since"]
        print(f"resumed {name} (paused since {since} by {was.by}: {was.reason or 'no reason given'})")
    if not start:
        return
    if process.inspect(spec).alive:
        print(f"{name} is already running")
        return
    with _existing_store(settings) as store:
        result = process.start(spec, settings, store=store)
    print(f"started {name}: PID {result.pid} in {result.elapsed_s:.1f} s (log {result.log})")


def _stop_line(result: process.StopResult) -> str:
    if not result.was_running:
        extra = f"; cleaned stale {', '.join(p.name for p in result.cleaned)}" if result.cleaned else ""
        return f"{result.name} was not running{extra}"
    code = f", exit code {result.exit_code}" if result.exit_code is not None else ""
    return f"stopped {result.name} (PID {result.pid}) with {result.signal} in {result.elapsed_s:.1f} s{code}"
