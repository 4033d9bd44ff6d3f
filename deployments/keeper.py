"""The keeper: the stack supervises itself. A part of the stack that dies (Prefect server, simulator, receiver,
serving process, relay) is restarted within a second or two, with a backoff when it keeps dying, and L2 is told.

`crypto-agent up` starts it last (`python -m deployments.keeper [--no-ui] [--only ...]`) with the
environment of every child (CRYPTO_AGENT_*, PREFECT_*), from which it rebuilds the same plan. Every
`poll_s` (0.5 s) it looks at each part's pidfile the way `down` does (crypto_agent.process.inspect):

- alive: nothing to do (a part alive `reset_after_s` forgets its crash streak);
- no pidfile: stopped on purpose (`down`, `crypto-agent stop-part`, an operator): left alone;
- its process gone (the pidfile still names it), or the PID now another process's (stale files removed, that
  process never signalled): dead. crypto_agent.keeper decides when it is restarted (at once, then 1 s
  doubling to 60 s) and when L2 hears of it (the 1st and 3rd death of a streak, then at most hourly).

A restart starts the same command with the same environment as `up` did and waits until it answers; the
new PID goes to run/stack.json. Each death and restart is an event (crypto-agent.stack.part-dead /
part-restarted on crypto-agent.stack.<part>), best effort: the server may be the part that died. L2 is
told through the Escalation block, and straight through its webhook (as `crypto-agent watchdog` does)
when the Prefect API cannot load the block. Telling runs beside the loop, so a slow webhook never
delays a restart. The trader and the daemon are not kept here: the recovery flows restart them.

Why not supervisord: every part is already started, identified and stopped by PID identity
(crypto_agent.process: never a signal to a PID that is not our process), and `down`, `status` and the
watchdog read those pidfiles; a second supervisor would own the same processes under other rules.
Production runs the parts as systemd units instead (deploy/systemd, `Restart=on-failure`), where this
keeper is not started.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from crypto_agent import keeper, process
from crypto_agent.alerts import redact
from crypto_agent.errors import CryptoAgentError
from crypto_agent.process import Liveness
from crypto_agent.service import write_atomic
from deployments.stack.parts import (
    Child,
    ensure_port_free,
    litestream_child,
    receiver_child,
    relay_child,
    serve_child,
    server_child,
    simulator_child,
)
from deployments.stack.plan import KEPT, StackPlan, child_env, plan_stack

log = logging.getLogger("deployments.keeper")

POLL_S = 0.5
TELL_TIMEOUT_S = 10.0
TELL_ATTEMPTS = 8  # 2 s doubling to 30 s: about 2.5 min for the receiver, server or webhook to come back
TELL_RETRY_S = 2.0
TELL_RETRY_CAP_S = 30.0
UNDELIVERED = "undelivered"
LOG_LINES = 8  # the end of a dead part's log in the message to L2


def kept_children(plan: StackPlan) -> list[Child]:
    """The parts of this stack the keeper restarts, in start order (the server first: the others need it)."""
    children = [server_child(plan), simulator_child(plan), receiver_child(plan), litestream_child(plan),
                serve_child(plan), relay_child(plan)]
    return [c for c in children if c is not None and c.name in KEPT]


@dataclass(frozen=True)
class Told:
    """One message for L2."""

    part: str
    subject: str
    body: str


class Teller:
    """Tells L2 from a thread of its own: the Escalation block first, its webhook straight when Prefect is down."""

    def __init__(self, plan: StackPlan) -> None:
        self.plan = plan
        self.queue: queue.Queue[Told | None] = queue.Queue()
        self.closing = threading.Event()
        self.sent: list[tuple[Told, str]] = []  # (message, how it went), for the log and the tests
        # the caller's context (its Prefect settings) goes with the thread
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run,), name="keeper-teller", daemon=True)
        self.thread.start()

    def tell(self, message: Told) -> None:
        """Queue a message for L2."""
        self.queue.put(message)

    def close(self, timeout_s: float = TELL_TIMEOUT_S) -> None:
        """Send what is queued (bounded, no more retries), then stop."""
        self.closing.set()
        self.queue.put(None)
        self.thread.join(timeout_s)

    def _run(self) -> None:
        while (message := self.queue.get()) is not None:
            # the receiver or the server may be the part still coming back: try again for a while, never drop it
            delay, how = TELL_RETRY_S, UNDELIVERED
            for attempt in range(1, TELL_ATTEMPTS + 1):
                how = self._deliver(message)
                if how != UNDELIVERED or attempt == TELL_ATTEMPTS or self.closing.wait(delay):
                    break
                delay = min(2 * delay, TELL_RETRY_CAP_S)
            self.sent.append((message, how))
            log.log(logging.ERROR if how == UNDELIVERED else logging.INFO, "told L2 (%s, attempt %d): %s",
                    how, attempt, message.subject)

    def _deliver(self, message: Told) -> str:
        from blocks.escalation import NotificationUndelivered
        from flows.notify import load_escalation

        try:
            load_escalation().notify("l2", message.subject, message.body)
            return "escalation block"
        except NotificationUndelivered as exc:
            why = exc.message
        except Exception as exc:  # noqa: BLE001 (the block could not even be built: still try the webhook)
            why = f"{type(exc).__name__}: {exc}"
        from crypto_agent.watchdog import post_alert, webhook_urls

        payload = {"level": "l2", "subject": message.subject, "body": message.body,
                   "text": f"{message.subject}\n{message.body}", "keeper": {"part": message.part}}
        deliveries = post_alert(payload, webhook_urls(self.plan.settings, "l2"), timeout_s=TELL_TIMEOUT_S)
        if any(d.ok for d in deliveries):
            return f"webhook (the block failed: {why})"
        log.warning("L2 not told of %s yet: %s; %s", message.part, why, "; ".join(d.detail for d in deliveries))
        return UNDELIVERED


@dataclass
class Keeper:
    """One stack's keeper: its plan, the children it restarts and what it remembers of each."""

    plan: StackPlan
    poll_s: float = POLL_S
    base_s: float = keeper.BASE_S
    cap_s: float = keeper.CAP_S
    teller: Teller | None = None
    emit_events: bool = True  # off where no Prefect server runs (its tests): Prefect would start a temporary one
    children: dict[str, Child] = field(default_factory=dict)
    histories: dict[str, keeper.PartHistory] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0

    def __post_init__(self) -> None:
        self.children = {c.name: c for c in kept_children(self.plan)}
        self.histories = {name: keeper.PartHistory(name) for name in self.children}
        self.env = child_env(self.plan)

    def run(self, stop: threading.Event) -> None:
        """Look at every part every poll_s until `stop` is set."""
        log.info("keeping %s every %g s", ", ".join(self.children), self.poll_s)
        while not stop.is_set():
            for name in self.children:
                if stop.is_set():
                    break
                self.look(name, time.time(), stop)
            stop.wait(self.poll_s)

    def look(self, name: str, now: float, stop: threading.Event | None = None) -> str:
        """One look at one part, acting on it; what was found ("alive", "stopped", "waiting", "restarted", ...)."""
        child, history = self.children[name], self.histories[name]
        spec = child.spec(self.plan.settings)
        check = process.inspect(spec)
        if check.alive:
            if history.started_at is None and check.record is not None:
                history.started_at = check.record.create_time
            keeper.seen_alive(history, now)
            history.dead_confirmed = False
            return "alive"
        if check.state is Liveness.NO_PIDFILE and not history.failed_start:
            history.dead_since = None
            history.dead_confirmed = False
            return "stopped"
        if history.dead_since is None and not history.failed_start:
            # confirmed at the next look: a deliberate stop (`down`, stop_part) removes the pidfile just after
            # the process is gone, and that window must not read as a death
            history.dead_since = now
            return "suspect"
        first_look = not history.dead_confirmed
        history.dead_confirmed = True
        decision = keeper.decide(history, now, base_s=self.base_s, cap_s=self.cap_s)
        if first_look:
            log.warning("%s is dead: %s", name, check.reason)
            self._emit_event("part-dead", name, {"part": name, "pid": check.pid, "reason": check.reason,
                                                 "state": check.state.value, "streak": history.streak + 1})
        if not decision.restart:
            return "waiting"
        if check.state in (Liveness.FOREIGN, Liveness.INVALID_PIDFILE):
            # our part is gone and its PID (or pidfile) is not ours any more: drop the files, signal nothing
            process.clean_state(spec)
        last_log = process.tail_text(spec.log, LOG_LINES)
        started = time.monotonic()
        try:
            ensure_port_free(child)
            result = process.start_child(spec, env=child.env(self.env), ready=self._ready(child, stop),
                                         cwd=self.plan.project_dir, timeout_s=child.ready_timeout_s)
        except CryptoAgentError as exc:
            keeper.restarted(history, time.time(), told=decision.tell)  # a failed start counts: the next backs off
            history.failed_start = True
            log.error("%s: restart failed: %s", name, exc.message)
            if decision.tell:
                self._tell(name, f"stack part {name} died and its restart failed",
                           f"{check.reason}; the restart failed: {exc.message}\n{exc.hint or ''}", last_log)
            return "failed"
        self.restarts += 1
        keeper.restarted(history, time.time(), told=decision.tell)
        history.failed_start = False
        took = time.monotonic() - started
        log.warning("%s restarted: PID %d, answering after %.1f s (%s)", name, result.pid, took, decision.reason)
        self._record_pid(name, result.pid)
        self._emit_event("part-restarted", name, {"part": name, "pid": result.pid, "old_pid": check.pid,
                                                  "streak": history.streak, "seconds": round(took, 3),
                                                  "reason": decision.reason})
        if decision.tell:
            self._tell(name, f"stack part {name} died: restarted (PID {result.pid})",
                       f"{check.reason}; {decision.reason}; answering after {took:.1f} s. "
                       f"Death {history.streak} in a row (a part alive "
                       f"{keeper.RESET_AFTER_S / 60:g} min starts the count again); its log {spec.log}.",
                       last_log)
        return "restarted"

    def _ready(self, child: Child, stop: threading.Event | None) -> Any:
        def ready() -> bool:
            if stop is not None and stop.is_set():
                raise process.ServiceStartError(f"the keeper was stopped while the {child.name} came up")
            return child.ready()

        return ready

    def _tell(self, part: str, subject: str, body: str, last_log: str) -> None:
        if self.teller is None:
            return
        tail = "\n".join(redact(line) for line in last_log.splitlines() if line.strip())
        host = self.plan.ui_url
        text = (f"{body}\nstack {host} (home {self.plan.settings.home}); seen by the stack's keeper."
                + (f"\nits log ended with:\n{tail}" if tail else ""))
        self.teller.tell(Told(part, f"[crypto-agent] {subject}", text))

    def _emit_event(self, what: str, part: str, payload: dict[str, Any]) -> None:
        if not self.emit_events:
            return
        try:
            from flows.events import STACK_PART_DEAD, STACK_PART_RESTARTED, STACK_RESOURCE_PREFIX, emit

            emit(STACK_PART_DEAD if what == "part-dead" else STACK_PART_RESTARTED,
                 f"{STACK_RESOURCE_PREFIX}{part}", payload)
        except Exception as exc:  # noqa: BLE001 (best effort: the server may be the part that is down)
            log.info("event %s of %s not emitted: %s", what, part, exc)

    def _record_pid(self, part: str, pid: int) -> None:
        """run/stack.json names the new PID (what `status`, the tests and the operator read)."""
        path = self.plan.record_path
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            record.setdefault("parts", {}).setdefault(part, {})["pid"] = pid
            record["updated_at"] = time.time()
            write_atomic(path, json.dumps(record, indent=2))
        except (OSError, ValueError) as exc:
            log.warning("run/stack.json not updated with %s's PID %d: %s", part, pid, exc)


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.keeper`: keep the stack's parts until SIGTERM or Ctrl-C; exit 2 on a bad setting."""
    parser = argparse.ArgumentParser(prog="python -m deployments.keeper", description=__doc__.splitlines()[0])
    parser.add_argument("--no-ui", action="store_true", help="the server was started without its UI")
    parser.add_argument("--only", nargs="+", default=[], help="the deployments the serving process serves")
    parser.add_argument("--poll-s", type=float, default=POLL_S, help="seconds between two looks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plan = plan_stack(ui=not args.no_ui, only=tuple(args.only))
    except CryptoAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    stop = process.stop_event_on_signals()
    teller = Teller(plan)
    kept = Keeper(plan, poll_s=args.poll_s, teller=teller)
    kept.run(stop)
    teller.close()
    try:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 (best effort, as every event of the keeper)
        pass
    log.info("stopped after %d restarts", kept.restarts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
