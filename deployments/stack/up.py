"""Bringing the stack up in order (reusing what runs; stopping what this call started when a step fails or a
signal comes) and bringing it down in the reverse order: `bring_up`, `bring_down` and their steps."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from types import FrameType
from typing import Any, Self

import psutil
from rich.console import Console

from crypto_agent import process
from crypto_agent.errors import CryptoAgentError
from crypto_agent.service import write_atomic
from crypto_agent.settings import Settings
from deployments.stack.parts import (
    Part,
    Stack,
    ensure_child,
    ensure_service,
    keeper_child,
    litestream_child,
    no_checkpoint,
    part_spec,
    receiver_child,
    relay_child,
    serve_child,
    server_child,
    simulator_child,
    stop_parts,
    wait_child,
)
from deployments.stack.plan import (
    FOREGROUND,
    KEEPER,
    LITESTREAM,
    RELAY,
    SERVE,
    SERVER,
    SERVICES,
    START_ORDER,
    UP_STOP_GRACE_S,
    StackInterrupted,
    StackPlan,
    child_env,
    deployment_names,
    prefect_client_env,
    read_record,
)


def backfill(plan: StackPlan, out: Console, err: Console) -> None:
    """Bring the store up to date for the universe from the exchange, with a progress bar on a terminal."""
    from crypto_agent.cli.data import backfill_universe, check_db_writable
    from crypto_agent.exchange import BinanceClient
    from crypto_agent.store import Store

    settings = plan.settings
    check_db_writable(settings)
    started = time.monotonic()
    with ExitStack() as stack:
        client = stack.enter_context(BinanceClient.from_settings(settings))
        client.ping()
        store = stack.enter_context(Store(settings.database_url))
        summary, written = backfill_universe(stack, settings, store, client, err)
    out.print(f"store: {settings.db_path}: {written} in {time.monotonic() - started:.1f} s; "
              f"{len(summary.failures)} failed")
    for symbol, message in summary.failures.items():
        err.print(f"warning: backfill of {symbol} failed: {message}", markup=False)


def first_backup(plan: StackPlan, out: Console) -> None:
    """A store with no good backup gets one now (the nightly one is hours away): a corruption before it restores."""
    from crypto_agent import backup

    settings = plan.settings
    try:
        backup.choose_backup(settings.backup_dir)
        return
    except backup.NoGoodBackup:
        pass
    try:
        info = backup.create(settings.db_path, settings.backup_dir)
    except CryptoAgentError as exc:
        out.print(f"warning: no backup of the store yet, and the first one failed: {exc}")
        return
    out.print(f"backup: first backup of the store {info.path}")


RECOVERY_TAG = "recovery"  # prefect.yaml tags every recovery deployment with it; its flow runs inherit it


def reconcile_recovery_limits(plan: StackPlan, out: Console) -> None:
    """Free the slots of the `recovery-*` limits that no live recovery holds (a run cancelled, then the server
    restarted and its in-memory leases were lost), so the next recovery never waits for a ghost."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        busy = [lim for lim in client.read_global_concurrency_limits(limit=200)
                if lim.name.startswith("recovery-") and lim.active_slots > 0]
        if not busy:
            return
        live = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[RECOVERY_TAG]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING, StateType.PAUSED, StateType.CANCELLING]))), limit=1)
        if live:
            return  # a recovery is under way: its slots are real, and the server revokes them if it dies
        for lim in busy:
            client.update_global_concurrency_limit(lim.name, GlobalConcurrencyLimitUpdate(active_slots=0))
    out.print(f"recovery limits: freed orphaned slots of {', '.join(lim.name for lim in busy)} (no recovery runs)")


def register_blocks(plan: StackPlan, out: Console) -> None:
    """The Block types and default documents (escalation on the local receiver)."""
    from blocks.register import register_defaults

    done = register_defaults(plan.settings)
    out.print(f"blocks: types {', '.join(done.block_types)}; documents {', '.join(done.documents)}")


def automations(plan: StackPlan, out: Console) -> None:
    """Create or update the automations declared in code (prefect.yaml's triggers come with the serving process)."""
    try:
        done = apply_automations(plan)
    except CryptoAgentError as exc:
        # the stack is still of use (flows run by hand and on schedule); say loudly what is missing
        out.print(f"warning: the automations of deployments/automations.py were not applied: {exc}")
        out.print("  the stack runs without those automatic recoveries until `crypto-agent up` is run again")
        return
    if done is not None:
        out.print(f"automations: {done}")


def apply_automations(plan: StackPlan) -> str | None:
    """Create or update the automations of deployments/automations.py (when it exists); what it did."""
    if not (plan.project_dir / "deployments" / "automations.py").is_file():
        return None
    from deployments.automations import apply_automations as apply

    done = apply(plan.settings, plan.project_dir)
    parts = [f"{len(names)} {what}" for what, names in
             (("created", done.created), ("updated", done.updated), ("deleted", done.deleted)) if names]
    parts += [f"not applied: {why}" for why in getattr(done, "skipped", [])]
    return "; ".join(parts) or "none declared"


# --- the foreground `up` ---


def foreground_spec(settings: Settings) -> process.ServiceSpec:
    """The pidfile of an `up` that holds the stack in the foreground."""
    return process.child_spec(FOREGROUND, (), settings, stop_grace_s=UP_STOP_GRACE_S)


def claim_foreground(settings: Settings) -> bool:
    """Record this process as the `up` holding the stack; False when another live `up` already does."""
    spec = foreground_spec(settings)
    if process.inspect(spec).alive:
        return False
    me = psutil.Process()
    spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(spec.pid_record, json.dumps({
        "service": FOREGROUND, "pid": me.pid, "create_time": me.create_time(), "cmdline": me.cmdline(),
        "started_at": time.time(),
    }))
    write_atomic(spec.pidfile, f"{me.pid}\n")
    return True


def release_foreground(settings: Settings) -> None:
    """Remove this process's foreground pidfile (only if it is ours)."""
    spec = foreground_spec(settings)
    check = process.inspect(spec)
    if check.pid == os.getpid():
        for path in (spec.pidfile, spec.pid_record):
            path.unlink(missing_ok=True)


class Interrupts:
    """SIGINT, SIGTERM and SIGHUP while the stack comes up or is held: they set `event`; `checkpoint()` raises
    StackInterrupted once one came. The handler raises by itself only inside `raising()` (the backfill),
    never while a child is being spawned and recorded, so nothing started can go unrecorded."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.received: str | None = None
        self._raise_now = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Self:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        first = not self.event.is_set()
        self.received = self.received or signal.Signals(signum).name
        self.event.set()
        if first and self._raise_now:
            self._raise_now = False
            raise self._error()

    def _error(self) -> StackInterrupted:
        return StackInterrupted(f"{self.received} received while the stack came up",
                                hint="what this `up` had started was stopped; run it again to bring the stack up")

    def checkpoint(self) -> None:
        """Raise StackInterrupted if a signal came."""
        if self.event.is_set():
            raise self._error()

    @contextmanager
    def raising(self) -> Iterator[None]:
        """Inside, a signal raises at once (for long work that starts no process)."""
        self.checkpoint()
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False


# --- up and down ---


def bring_up(plan: StackPlan, out: Console, err: Console, interrupts: Interrupts | None = None) -> Stack:
    """Bring every part up in order, reusing what runs; on any failure stop what this call started, then raise."""
    stack = Stack(plan)
    env = child_env(plan)
    checkpoint = interrupts.checkpoint if interrupts is not None else no_checkpoint
    plan.prefect_home.mkdir(parents=True, exist_ok=True)

    def add(name: str, start: Callable[[], Part]) -> Part:
        was_running = process.inspect(part_spec(name, plan.settings)).alive
        try:
            part = start()
        except BaseException:
            if not was_running:  # whatever it got to start is ours to stop: `stop_part` goes by its pidfile
                stack.parts.append(Part(name, None, True))
            raise
        stack.parts.append(part)
        checkpoint()
        return part

    try:
        with prefect_client_env(plan):
            server = server_child(plan)
            server_part = add(SERVER, lambda: ensure_child(server, plan, env, out, wait=False))
            if server_part.started:
                out.print(f"{SERVER}: starting (PID {server_part.pid}, home {plan.prefect_home})")
            for child in (simulator_child(plan), receiver_child(plan)):
                if child is not None:
                    add(child.name, functools.partial(ensure_child, child, plan, env, out, checkpoint=checkpoint))
            stack.record()
            with interrupts.raising() if interrupts is not None else nullcontext():
                backfill(plan, out, err)
            for name in SERVICES:
                add(name, functools.partial(ensure_service, name, plan, out))
            first_backup(plan, out)
            replicator = litestream_child(plan)  # the store exists now: replicate it from here on (issue 12)
            if replicator is not None:
                add(LITESTREAM, functools.partial(ensure_child, replicator, plan, env, out, checkpoint=checkpoint))
            wait_child(server, server_part, out, checkpoint)
            out.print(f"{SERVER}: UI {plan.ui_url}  API {plan.api_url}")
            register_blocks(plan, out)
            reconcile_recovery_limits(plan, out)
            checkpoint()
            # the relay before the serving process: its tick and the services' heartbeats reach the server
            # within seconds of its start, so a dead man's switch never fires while the serving process comes up
            add(RELAY, lambda: ensure_child(relay_child(plan), plan, env, out, checkpoint=checkpoint))
            checkpoint()
            # The serving process creates or updates every deployment of prefect.yaml, with its schedules
            # and triggers, as it starts; `prefect deploy` of the same deployments first would leave them
            # pointing at the work pool's pull step, which a served run cannot follow.
            serve = add(SERVE, lambda: ensure_child(serve_child(plan), plan, env, out, checkpoint=checkpoint))
            total = len(deployment_names(plan.project_dir))
            served = f"{len(plan.only)} of {total} (--only)" if plan.only else str(total)
            out.print(f"deployments: {served} from prefect.yaml, served by PID {serve.pid}")
            automations(plan, out)
            checkpoint()
            add(KEEPER, lambda: ensure_child(keeper_child(plan), plan, env, out, checkpoint=checkpoint))
            stack.record()
    except BaseException:
        if stack.started:
            err.print("stopping what this `up` started ...")
            stop_parts(stack.started, plan.settings, out)
        raise
    return stack


def pause_switches(api_url: str, out: Console) -> None:
    """A planned stop pages nobody: pause the dead man's switches first (best effort, bounded; `up` re-arms them)."""
    from deployments.stack.parts import http_ok

    if not http_ok(f"{api_url}/health"):
        return
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from deployments.automations import pause_dead_mans_switches

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            paused = pause_dead_mans_switches()
    except Exception as exc:  # noqa: BLE001 (the stop goes on; at worst a switch pages L2 after the next up)
        out.print(f"warning: the dead man's switches were not paused: {exc}")
        return
    if paused:
        out.print(f"automations: paused {', '.join(paused)} for the stop (`up` re-arms them)")


def bring_down(settings: Settings, out: Console) -> list[str]:
    """Stop the whole stack: a foreground `up` first (it stops its parts), then every part left, in reverse order."""
    problems = []
    record = read_record(settings)
    pause_switches(str(record.get("api_url")) if record else f"http://127.0.0.1:{settings.prefect_port}/api", out)
    up_spec = foreground_spec(settings)
    check = process.inspect(up_spec)
    if check.alive:
        out.print(f"up: asking the foreground `crypto-agent up` (PID {check.pid}) to stop its stack")
        try:
            result = process.stop(up_spec)
            out.print(f"up: PID {result.pid} stopped in {result.elapsed_s:.1f} s")
        except CryptoAgentError as exc:
            problems.append(f"up: {exc}")
    problems += stop_parts([Part(name, None, True) for name in START_ORDER], settings, out)
    if not problems:
        (Path(settings.run_dir) / "stack.json").unlink(missing_ok=True)
    return problems
