"""`crypto-agent up` for the operator: bring the stack up, say where everything is, then return (--detach) or
hold it in the foreground until Ctrl-C, SIGTERM or `crypto-agent down`, and stop what it started."""

from __future__ import annotations

import threading
import time

from rich.console import Console

from crypto_agent import process
from deployments.stack.parts import Stack, stop_parts
from deployments.stack.plan import KEEPER, KEPT, SERVICES, StackPlan
from deployments.stack.up import Interrupts, bring_up, claim_foreground, pause_switches, release_foreground


def summary_lines(stack: Stack) -> list[str]:
    """What the operator needs after `up`: the addresses, the env lines for another terminal, how to stop."""
    plan = stack.plan
    s = plan.settings
    lines = [
        "",
        "the stack is up:",
        f"  Prefect UI      {plan.ui_url}" if plan.ui else "  Prefect UI      off (--no-ui)",
        f"  Prefect API     {plan.api_url}   (home {plan.prefect_home})",
    ]
    if plan.simulator_port is not None:
        lines.append(f"  exchange        {s.exchange_url}   (bundled simulator)")
    else:
        lines.append(f"  exchange        {s.exchange_url}")
    if plan.receiver_port is not None:
        lines.append(f"  notifications   {s.receiver_url}/messages   (local receiver)")
    if plan.only:
        lines.append(f"  deployments     only {', '.join(plan.only)}")
    lines += [
        f"  store           {s.db_path}",
        f"  logs            {s.logs_dir}",
        "  processes       " + ", ".join(f"{p.name} {p.pid}" + ("" if p.started else " (reused)")
                                      for p in stack.parts),
        "",
        "from another terminal:",
        f"  export PREFECT_API_URL={plan.api_url}",
        f"  export PREFECT_HOME={plan.prefect_home}",
        "  prefect deployment ls",
        "  prefect deployment run integrity-check/quick",
        "  crypto-agent status --service backtest",
    ]
    return lines


def run_up(plan: StackPlan, *, detach: bool, out: Console, err: Console) -> int:
    """`crypto-agent up`: bring the stack up; with detach return, else hold it until Ctrl-C/SIGTERM and stop it."""
    started = time.monotonic()
    with Interrupts() as interrupts:
        stack = bring_up(plan, out, err, interrupts)
        elapsed = time.monotonic() - started
        for line in summary_lines(stack):
            out.print(line, markup=False, highlight=False)
        out.print(f"up in {elapsed:.1f} s")
        if detach:
            out.print("detached: `crypto-agent down` stops it all")
            return 0
        if not claim_foreground(plan.settings):
            out.print("another `crypto-agent up` holds this stack in the foreground; Ctrl-C there or "
                      "`crypto-agent down` stops it")
            return 0
        try:
            reused = [p.name for p in stack.parts if not p.started]
            out.print("Ctrl-C (or SIGTERM, or `crypto-agent down`) stops what this `up` started"
                      + (f"; it leaves running what it reused: {', '.join(reused)}" if reused else ""))
            watch(stack, interrupts.event, out)
            out.print(f"{interrupts.received}: stopping the stack ...")
            if len(stack.started) == len(stack.parts):  # it stops the whole stack: a planned outage
                pause_switches(plan.api_url, out)
            problems = stop_parts(stack.started, plan.settings, out)
            if not problems and len(stack.started) == len(stack.parts):
                plan.record_path.unlink(missing_ok=True)
        finally:
            release_foreground(plan.settings)
    out.print("stopped" if not problems else f"stopped, with problems: {'; '.join(problems)}")
    return 0 if not problems else 1


def watch(stack: Stack, interrupted: threading.Event, out: Console) -> None:
    """Hold the foreground until interrupted; say once when a child of the stack is gone (and nothing restarts it)."""
    told: set[str] = set()
    keeper = next((p for p in stack.parts if p.name == KEEPER), None)
    while not interrupted.wait(2.0):
        kept = keeper is not None and keeper.spec is not None and process.inspect(keeper.spec).alive
        for part in stack.parts:
            if part.spec is None or part.name in told or part.name in SERVICES:
                continue  # the services are the recovery flows' business (they restart them)
            if kept and part.name in KEPT:
                continue  # the keeper restarts it and tells L2
            if not process.inspect(part.spec).alive:
                told.add(part.name)
                out.print(f"warning: {part.name} (PID {part.pid}) is gone; its log: {part.spec.log}")
