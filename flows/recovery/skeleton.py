"""The skeleton every recovery runs in: the store-lock check, the incident opened or joined, the concurrency
guard, and the close with the report (who is told, the events, the markdown artifact `incident-<id>`).

A flow opens with `with recovery_incident(...) as run:`; when another recovery already has it (its
incident is open, or it holds the store's lock) `run` is an `Absorbed` carrying the flow's summary,
otherwise the `Recovery` whose incident the flow works in and closes with `run.finish(...)`. A problem the
recoveries could not fix is one incident: the same scenario on the same resource detected again works in
the incident that needs a person (rejoined), its paging held, re-paged at most every page_repeat_after_s,
and one "resolved" message when a later run fixes it (crypto_agent.incidents.policy.needs_person_action).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.concurrency.sync import concurrency
from prefect.flows import FlowStateHook
from prefect.runtime import flow_run as current_flow_run
from prefect.utilities.urls import url_for

from crypto_agent import holds, incidents, process, recovery, storelock
from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.incidents import ESCALATED, FAILED, RECOVERED, RESOLVED, SKIPPED, Incident
from crypto_agent.settings import Settings
from crypto_agent.store import Store
from flows.common import run_settings
from flows.events import (
    INCIDENT_ESCALATED,
    INCIDENT_OPENED,
    INCIDENT_RESOLVED,
    RECOVERY_OVER_BUDGET,
    SERVICE_RESOURCE_NAMES,
    emit,
    incident_resource,
    service_resource,
)
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, load_escalation, notify_level, silenced

# The owner a store recovery writes into db/LOCKED, followed by its incident id.
LOCK_OWNERS = {"db-corruption": "recover-db-corruption", "persistent-failures": "rollback-persistent-failures"}
RECOVERY_WAIT_S = 3600.0  # longest wait for another recovery of the same resource (concurrency limit)
LIMIT_PATIENCE_S = 60.0  # waiting longer than this for a recovery slot tells L2 what it waits for
LEASE_S = 60.0  # the slots' lease, renewed while the run lives (the server's minimum): a dead run frees them soon
LOCK_WAIT_S = 600.0  # longest wait for the store's lock held by a live process (a compaction, a restore)
MAX_MESSAGE_ACTIONS = 12
LockCheck = Literal["check", "wait", "none"]


def resource_of(service: str) -> str:
    """The Prefect resource id of a crypto_agent service ("backtest" -> crypto-agent.service.backtest-daemon)."""
    if service not in SERVICE_RESOURCE_NAMES:
        raise InputError(f"unknown service {service!r}", hint=f"use one of: {', '.join(SERVICE_RESOURCE_NAMES)}")
    return service_resource(SERVICE_RESOURCE_NAMES[service])


def limit_name(resource: str) -> str:
    """The global concurrency limit that lets one recovery at a time work on a resource."""
    return f"recovery-{resource}"


def flow_run_link() -> str:
    """The current flow run's page in the Prefect UI, or its id when no UI URL is configured."""
    run_id = current_flow_run.id
    link = url_for("flow-run", obj_id=run_id) if run_id else None  # the UI's route: /runs/flow-run/<id>
    if link:
        return link
    return f"flow run id {run_id} (no PREFECT_UI_URL configured)" if run_id else "no flow run (called directly)"


# --- the store's lock and the holds: what another recovery or a person keeps as it is ---


def lock_blocker(cfg: Settings) -> str | None:
    """Who holds the store's lock without a live process behind it (a person, after an escalation), or None."""
    holder = storelock.lock_holder(cfg.db_path)
    if holder is None:
        return None
    pid = holder.get("pid")
    if isinstance(pid, int) and psutil.pid_exists(pid):
        return None  # a live recovery or compaction: wait for it
    return f"{storelock.lock_path(cfg.db_path)} held by {holder.get('owner', 'an unknown owner')}"


def wait_for_store_lock(cfg: Settings) -> str | None:
    """Before a service recovery takes anything: wait while a live process (a store recovery, a compaction)
    holds the store's lock, up to LOCK_WAIT_S; who still holds it then (or holds it with no process behind it)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while storelock.lock_holder(cfg.db_path) is not None:
        blocker = lock_blocker(cfg)
        if blocker is not None:
            return blocker
        if time.monotonic() > deadline:
            return recovery.store_state(cfg)
        time.sleep(1.0)
    return None


@dataclass(frozen=True)
class HoldCheck:
    """What keeps a service as it is on purpose: its pause marker (a person, a rollback), a hold in force."""

    pause: dict[str, Any] | None  # the marker: reason, by, since
    hold: str | None  # the hold in force, described


def check_hold(service: str, cfg: Settings) -> HoldCheck:
    """The one hold check of the recoveries (holds.read_hold, the one reader): the hold in force as its marker
    says it, and its description when it accounts for what process control sees now."""
    hold = holds.read_hold(service, cfg)
    if hold is None:
        return HoldCheck(None, None)
    covers = hold.covers(process.inspect(process.service_spec(service, cfg)))
    return HoldCheck(hold.marker(), hold.description if covers else None)


# --- the incident a recovery works in ---


@dataclass
class Recovery:
    """One recovery flow run's incident: its actions, notifications, events, report and summary."""

    scenario: str
    resource: str
    cfg: Settings
    log_store: Store
    incident: Incident
    handed_over: bool = False
    held: list[str] = field(default_factory=list)
    live_trading_affected: bool = False
    rollback_failed: bool = False
    escalated_in: int | None = None  # another incident (a handover's) that does the paging for this one
    rejoined: bool = False  # works again in an incident that needs a person: its paging held (see finish)
    grouped_with: Incident | None = None  # the same signal recovered just before: one page for this one (announce)
    extra_levels: dict[str, str] = field(default_factory=dict)
    undelivered: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None

    @property
    def id(self) -> int:
        """The incident id."""
        return self.incident.id

    @property
    def lock_owner(self) -> str:
        """Who this recovery is in the store's lock file: its flow and incident."""
        return f"{LOCK_OWNERS[self.scenario]} #{self.id}"

    def act(self, step: str, detail: str, ok: bool = True) -> None:
        """Record one action of the recovery in the incident (and the run log)."""
        incidents.add_action(self.log_store, self.id, step, detail, ok=ok)
        logger = get_run_logger()
        (logger.info if ok else logger.warning)("incident #%d %s: %s", self.id, step, detail.split("\n", 1)[0])

    def describe(self, **fields: Any) -> None:
        """Set what is known so far (root_cause, impact): a failure from here on closes the incident with it."""
        incidents.update_fields(self.log_store, self.id, **fields)
        self.incident = incidents.get(self.log_store, self.id)

    def cause_handover(self) -> dict[str, Any]:
        """What a store recovery gets from a service recovery whose service died of the store: its own incident,
        linked to this one (caused by it), the limits already held."""
        return {"incident_id": None, "held": list(self.held), "caused": self.id}

    def handover(self, limits: list[str] | None = None) -> dict[str, Any]:
        """What a subflow working in this incident gets: its id and the concurrency limits already held."""
        return {"incident_id": self.id, "held": sorted(set(self.held) | set(limits or []))}

    @contextmanager
    def guard(self, resources: list[str]) -> Iterator[None]:
        """Hold the concurrency limits of `resources` (not those a parent holds); a failure closes the incident."""
        names = [limit_name(r) for r in resources if limit_name(r) not in self.held]
        try:
            with self.budget_watch(), _concurrency_limits(names, self.waiting_for):
                self.held = sorted(set(self.held) | set(names))
                yield
        except BaseException as exc:
            if not self.handed_over and incidents.get(self.log_store, self.id).is_open:
                what = exc.message if isinstance(exc, CryptoAgentError) else f"{type(exc).__name__}: {exc}"
                current = incidents.get(self.log_store, self.id)
                try:
                    self.finish(FAILED, "failed", summary=f"the recovery failed: {what}",
                                impact=current.impact or "unknown: the recovery did not finish",
                                root_cause=current.root_cause or "Other: unknown (the recovery failed)")
                except Exception:  # noqa: BLE001 (the original failure is the one to raise; the hooks tell L1)
                    get_run_logger().exception("closing incident #%d after the failure failed too", self.id)
            raise
        finally:
            self.log_store.close()  # a long-lived worker runs many recoveries: no pool left behind per run

    @contextmanager
    def budget_watch(self) -> Iterator[None]:
        """A recovery still running past its scenario's ETA is itself an incident: at that moment (a timer beside
        the work) it is recorded, emitted (crypto-agent.incident.over-budget) and told to L2, once. A subflow
        working in its parent's incident is covered by the parent's watch."""
        if self.handed_over:
            yield
            return
        left = incidents.budget_left_s(self.incident, int(time.time() * 1000))
        context = contextvars.copy_context()  # the run's context (logger, events' related resources) goes along
        timer = threading.Timer(max(0.0, left), context.run, args=(self.over_budget,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def over_budget(self) -> bool:
        """Record, emit and tell L2 that this recovery runs past its budget (once; not when it already closed)."""
        try:
            inc = incidents.get(self.log_store, self.id)
            if not inc.is_open or any(a["step"] == "over-budget" for a in inc.actions):
                return False
            note = incidents.over_budget_note(inc, int(time.time() * 1000))
            self.act("over-budget", note, ok=False)
            emit(RECOVERY_OVER_BUDGET, incident_resource(self.id), self._event_payload(note=note))
            subject, body = self.message("over budget")
            if silenced(self.cfg, self.resource, "l2", subject, incident_id=self.id, store=self.log_store):
                return True
            try:
                load_escalation().notify("l2", subject, body + f"\n\nWhy L2: {note}. Look at the flow run: what "
                                         "does it wait for? It is still recovering; nothing was stopped.")
                incidents.told(self.log_store, self.id, "l2")
            except CryptoAgentError as exc:
                self.undelivered.append(f"L2: {exc}")
                incidents.add_action(self.log_store, self.id, "notify-l2", f"not delivered: {exc}", ok=False)
        except Exception:  # noqa: BLE001 (a timer thread: its failure must not go unseen, nor stop the recovery)
            get_run_logger().exception("the over-budget page of incident #%d failed", self.id)
            return False
        return True

    def waiting_for(self, names: list[str]) -> None:
        """Tell L2 (once) that this recovery waits for another one of the same resource: which limits, how long."""
        what = ", ".join(names)
        self.act("waiting", f"no free slot of {what} after {LIMIT_PATIENCE_S:g} s: another recovery of the same "
                 f"resource holds it; waiting up to {RECOVERY_WAIT_S / 60:g} min", ok=False)
        subject, body = self.message(f"waiting for {what}")
        self.tell("l2", subject, body + f"\n\nWhy L2: this recovery has waited {LIMIT_PATIENCE_S:g} s for {what} "
                  "(one recovery per resource at a time); if no recovery of that resource is running, its slot is "
                  "orphaned: `prefect gcl inspect` it, and reset it with `prefect gcl update NAME --active-slots 0`")

    def tell(self, level: str, subject: str, body: str) -> bool:
        """Send one message to an escalation level; an undeliverable one is recorded, never fatal to the recovery.
        A page about a silenced resource is held in the silence (told once after it ends) and not sent: False."""
        if silenced(self.cfg, self.resource, level, subject, incident_id=self.id, store=self.log_store):
            return False
        try:
            notify_level(level, subject, body)
        except Exception as exc:  # noqa: BLE001 (the recovery matters more than the message; the report says who was not told)
            self.undelivered.append(f"{level.upper()}: {exc}")
            incidents.add_action(self.log_store, self.id, f"notify-{level}", f"not delivered: {exc}", ok=False)
            higher = getattr(exc, "fell_back_to", None)
            if higher:  # a higher level took it instead: that one was told
                incidents.told(self.log_store, self.id, higher)
            return False
        incidents.told(self.log_store, self.id, level)
        if level == "l3" and self.live_trading_affected:
            self.tell_war_room(subject, body)
        return True

    def tell_war_room(self, subject: str, body: str) -> None:
        """Live trading affected: the escalation's war room hears what L3 hears (nothing when it has none)."""
        try:
            delivery = load_escalation().tell_war_room(subject, body)
        except Exception as exc:  # noqa: BLE001 (L3 has it; the incident says the war room did not)
            incidents.add_action(self.log_store, self.id, "notify-war-room", f"not delivered: {exc}", ok=False)
            return
        if delivery is None:
            return
        ok = bool(delivery.delivered)
        incidents.add_action(self.log_store, self.id, "notify-war-room",
                             ("told " + ", ".join(delivery.delivered)) if ok else
                             "not delivered: " + "; ".join(delivery.failed), ok=ok and not delivery.failed)

    def message(self, headline: str, extra: str = "") -> tuple[str, str]:
        """Subject and body: what happened, what was done, the current state, the data lost, the flow run."""
        inc = incidents.get(self.log_store, self.id)
        sc = incidents.scenario(inc.scenario)
        subject = f"[crypto-agent] incident #{inc.id} {headline}: {sc.title} ({inc.resource})"
        trigger = inc.trigger.get("event") or "a manual run of the recovery"
        done = [f"- {a['step']}{'' if a.get('ok', True) else ' (FAILED)'}: {str(a['detail']).splitlines()[0][:300]}"
                for a in inc.actions[-MAX_MESSAGE_ACTIONS:]]
        state = [recovery.service_state(name, self.cfg) for name in ("trader", "backtest")]
        state.append(recovery.store_state(self.cfg))
        lost = "not known yet" if inc.data_lost_hours is None else f"{inc.data_lost_hours:g} hours"
        body = "\n".join([
            # short first, as a phone shows it: what, where, state, link; the detail after
            f"What: {sc.title}: {headline}",
            f"Where: {inc.resource}",
            f"State: {inc.status}{' (' + inc.outcome + ')' if inc.outcome else ''}"
            + (", NEEDS A PERSON" if inc.needs_person else "")
            + (f", acknowledged by {inc.acked_by}" if inc.acked_by else f"; ack: `crypto-agent ack {inc.id}`"),
            f"Link: {flow_run_link()}",
            "",
            (f"What happened: {inc.root_cause or 'being diagnosed'} (trigger: {trigger}, "
             f"detected {incidents.iso(inc.detected_at)})"),
            f"Status: {inc.status}{' (' + inc.outcome + ')' if inc.outcome else ''}"
            + (f"; {inc.summary}" if inc.summary else ""),
            "What was done:",
            *(done or ["- the recovery is starting"]),
            "Current state:",
            *(f"- {line}" for line in state),
            f"Data lost: {lost}",
            f"Flow run: {flow_run_link()}",
        ])
        return subject, body + (f"\n\n{extra}" if extra else "")

    def announce(self) -> None:
        """Tell L1 the incident is open and emit crypto-agent.incident.opened; grouped with the same signal
        recovered just before (policy.group_with), the opening page is held and the close pages once."""
        prev = self.grouped_with
        if prev is not None:
            ago = (self.incident.opened_at - (prev.resolved_at or self.incident.opened_at)) / 1000
            self.act("page-grouped", f"the same signal as incident #{prev.id}, recovered {ago:.0f} s before this "
                     f"one opened (page_group_window_s {self.cfg.page_group_window_s:g}): no opening page, the "
                     "close pages once")
        else:
            subject, body = self.message("opened")
            self.tell("l1", subject, body)
        emit(INCIDENT_OPENED, incident_resource(self.id), self._event_payload())

    def _event_payload(self, **extra: Any) -> dict[str, Any]:
        inc = incidents.get(self.log_store, self.id)
        return {
            "incident_id": inc.id, "scenario": inc.scenario, "resource": inc.resource, "status": inc.status,
            "outcome": inc.outcome, "flow_run_id": str(current_flow_run.id or ""), **extra,
        }

    def _levels(self, inc: Incident) -> dict[str, str]:
        """Who beyond L1 is told at the close, and why (crypto_agent.incidents.policy decides)."""
        window = self.cfg.persistent_window_hours
        return incidents.levels_to_tell(
            inc, incidents.recent_count(self.log_store, inc.scenario, window), window,
            live_trading_affected=self.live_trading_affected, rollback_failed=self.rollback_failed,
            extra=self.extra_levels,
        )

    def finish(
        self,
        status: str,
        outcome: str,
        *,
        summary: str,
        impact: str,
        root_cause: str,
        data_lost_hours: float | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        """Close the incident (unless a parent flow owns it), tell people, emit the events, publish the report."""
        if self.handed_over:
            self.act("handed-back", f"{outcome}: {summary}", ok=status == RESOLVED)
            self.result = {
                "incident_id": self.id, "status": status, "outcome": outcome, "summary": summary, "impact": impact,
                "root_cause": root_cause, "data_lost_hours": data_lost_hours,
                "live_trading_affected": self.live_trading_affected, "extra_levels": dict(self.extra_levels),
                **details,
            }
            return self.result
        before = incidents.get(self.log_store, self.id)
        inc = incidents.close(self.log_store, self.id, status, outcome=outcome, summary=summary, impact=impact,
                              root_cause=root_cause, data_lost_hours=data_lost_hours)
        link = flow_run_link()
        if self.rejoined:
            handed = details.get("handed_to")  # a dict when another recovery, already running, absorbed the handover
            other = handed.get("incident_id") if isinstance(handed, dict) else None
            l1_event = self._page_rejoined(before, inc, status, link, other if isinstance(other, int) else None)
        else:
            l1_event = self._page_as_usual(inc, status, link)
        final = incidents.get(self.log_store, self.id)
        report = incidents.render_report(final, link)
        incidents.update_fields(self.log_store, self.id, report_md=report)
        create_markdown_artifact(
            markdown=report, key=f"incident-{self.id}",
            description=f"incident #{self.id} {final.scenario}: {final.status} ({final.outcome})",
        )
        if status == RESOLVED:
            emit(INCIDENT_RESOLVED, incident_resource(self.id), self._event_payload(
                recovery_time_s=final.recovery_time_s, data_lost_hours=final.data_lost_hours))
        elif l1_event:
            emit(INCIDENT_ESCALATED, incident_resource(self.id), self._event_payload(level="l1", reason=summary))
        self.result = {
            "incident_id": self.id, "scenario": final.scenario, "status": final.status, "outcome": final.outcome,
            "summary": final.summary, "recovery_time_s": final.recovery_time_s,
            "data_lost_hours": final.data_lost_hours, "levels_told": final.levels_told,
            "needs_person": final.needs_person, "undelivered": list(self.undelivered), **details,
        }
        return self.result

    def _page_as_usual(self, inc: Incident, status: str, link: str) -> bool:
        """levels_to_tell's levels, then L1; whether the close still wants the L1 escalated event."""
        if self.escalated_in is not None:  # inhibited: the incident that caused it pages for both (issue 11)
            incidents.add_action(self.log_store, self.id, "page-inhibited",
                                 f"caused by incident #{self.escalated_in}, which pages for it: no close page here")
            return False
        levels = self._levels(inc)
        report = incidents.render_report(inc, link)
        for level, why in levels.items():
            subject, body = self.message(f"escalated to {level.upper()}",
                                         extra=f"Why {level.upper()}: {why}\n\n{report}")
            if self.tell(level, subject, body):
                emit(INCIDENT_ESCALATED, incident_resource(self.id), self._event_payload(level=level, reason=why))
        headline = {RESOLVED: "resolved", FAILED: "closed: recovery FAILED", ESCALATED: "closed: ESCALATED"}[status]
        prev = self.grouped_with
        if prev is None:
            self.tell("l1", *self.message(headline))
        else:  # its opening was not paged: this one page says it came back, and when it was fixed before
            self.tell("l1", *self.message(f"{headline} (again, after incident #{prev.id})",
                                          extra=f"Again: the same as incident #{prev.id}, recovered at "
                                          f"{incidents.iso(prev.resolved_at)}; its opening was not paged "
                                          "(page_group_window_s)."))
        return status != RESOLVED and not levels

    def _page_rejoined(self, before: Incident, inc: Incident, status: str, link: str, handed_to: int | None) -> bool:
        """A rejoined incident's close (policy.needs_person_action): one "resolved" message to L1 and each level
        told, a re-page when its last page is old enough, else nothing but a note in the incident."""
        decision = incidents.needs_person_action(before, status, now_ms=int(time.time() * 1000),
                                                 repeat_after_s=self.cfg.page_repeat_after_s,
                                                 handed_to=handed_to)
        if decision.page == incidents.policy.PAGE_RESOLVED:
            for level in sorted({"l1", *before.levels_told}):
                self.tell(level, *self.message("resolved", extra=f"It is {decision.why}."))
        elif decision.page == incidents.policy.PAGE_REPEAT and self.escalated_in is None:
            headline = decision.why
            report = incidents.render_report(inc, link)
            for level, why in self._levels(inc).items():
                if self.tell(level, *self.message(headline, extra=f"Why {level.upper()}: {why}\n\n{report}")):
                    emit(INCIDENT_ESCALATED, incident_resource(self.id), self._event_payload(level=level, reason=why))
            self.tell("l1", *self.message(headline))
        else:
            # held, except a level this incident never reached (L3 once the exchange is down too long): it pages now
            new = {lv: why for lv, why in self._levels(inc).items() if lv not in before.levels_told}
            if new and self.escalated_in is None:
                report = incidents.render_report(inc, link)
                for level, why in new.items():
                    if self.tell(level, *self.message(f"escalated to {level.upper()}",
                                                      extra=f"Why {level.upper()}: {why}\n\n{report}")):
                        emit(INCIDENT_ESCALATED, incident_resource(self.id),
                             self._event_payload(level=level, reason=why))
            incidents.add_action(self.log_store, self.id, "page-held", decision.why
                                 + (f"; newly paged: {', '.join(lv.upper() for lv in new)}" if new else ""))
        return False

    def finish_from(self, sub: dict[str, Any], **details: Any) -> dict[str, Any]:
        """Close this incident with the outcome a subflow reached (a handover)."""
        if sub.get("outcome") == "absorbed":
            summary = f"handed over to incident #{sub.get('incident_id')}, which was already recovering"
            return self.finish(RESOLVED, SKIPPED, summary=summary, impact=self.incident.impact or "see that incident",
                               root_cause=self.incident.root_cause or "Other: see that incident",
                               data_lost_hours=None, handed_to=sub, **details)
        self.live_trading_affected = self.live_trading_affected or bool(sub.get("live_trading_affected"))
        self.extra_levels.update(sub.get("extra_levels") or {})
        status = sub.get("status") or (RESOLVED if sub.get("outcome") == RECOVERED else ESCALATED)
        if sub.get("incident_id") != self.id:  # its own incident: this one follows it, and that one pages
            self.escalated_in = sub.get("incident_id")
            summary = f"handed over to incident #{sub.get('incident_id')} ({sub.get('outcome')}): {sub.get('summary')}"
        else:
            summary = sub.get("summary") or ""
        return self.finish(
            status, sub.get("outcome") or "failed", summary=summary,
            impact=sub.get("impact") or self.incident.impact or "see the actions",
            root_cause=sub.get("root_cause") or self.incident.root_cause or "Other: unknown",
            data_lost_hours=sub.get("data_lost_hours"), handed_to=sub.get("incident_id"), **details,
        )


@contextmanager
def _concurrency_limits(names: list[str], on_wait: Callable[[list[str]], None]) -> Iterator[None]:
    """Hold one slot of each global concurrency limit (created with limit 1 when missing), on a short lease that
    the server revokes when this run dies (kept on disk, so a server restart does not lose it); `on_wait` is
    called once when the slots are not free within LIMIT_PATIENCE_S, then the wait goes on up to RECOVERY_WAIT_S."""
    if not names:
        yield
        return
    with get_client(sync_client=True) as client:
        for name in names:
            client.upsert_global_concurrency_limit_by_name(name, 1)
    with ExitStack() as held:
        try:
            held.enter_context(concurrency(names, occupy=1, timeout_seconds=LIMIT_PATIENCE_S,
                                           lease_duration=LEASE_S, raise_on_lease_renewal_failure=False))
        except TimeoutError:
            on_wait(names)
            held.enter_context(concurrency(names, occupy=1, timeout_seconds=RECOVERY_WAIT_S - LIMIT_PATIENCE_S,
                                           lease_duration=LEASE_S, raise_on_lease_renewal_failure=False))
        yield


# --- open, or be absorbed ---


@dataclass(frozen=True)
class Absorbed:
    """A recovery with nothing to do: another one has the incident open, or holds the store; the flow's summary."""

    result: dict[str, Any]


def skip_if_held(run: Recovery, service: str, *, only_covering: bool = False) -> dict[str, Any] | None:
    """A service held on purpose (a person, a rollback, the window guard) is left as it is: the incident closes
    skipped and its summary is returned; None when no hold is in force (with only_covering: none that accounts
    for what process control sees, e.g. a stopped hold while a process runs)."""
    hold = holds.read_hold(service, run.cfg)
    if hold is not None and only_covering and not hold.covers(process.inspect(process.service_spec(service, run.cfg))):
        hold = None
    if hold is None:
        return None
    run.act("held", f"{service} is {hold.description}: kept as it is on purpose, not recovered")
    return run.finish(RESOLVED, SKIPPED, summary=f"{service} is {hold.kind} on purpose ({hold.description}): "
                      "nothing done", impact=f"none ({hold.kind} on purpose)",
                      root_cause="Other: service held on purpose", data_lost_hours=0)


def begin(scenario: str, resource: str, event: dict[str, Any] | None, cfg: Settings, handover: dict[str, Any] | None,
          fault_at_s: float | None = None) -> Recovery | Absorbed:
    """Open the incident (announced to L1), join the one already open (absorbed), or work in a parent's."""
    log_store = incidents.open_incident_store(cfg)
    held = list((handover or {}).get("held") or [])
    if handover and handover.get("incident_id"):
        inc = incidents.get(log_store, int(handover["incident_id"]))
        run = Recovery(scenario, resource, cfg, log_store, inc, handed_over=True, held=held)
        run.act("handover", f"{scenario} recovery takes over (flow run {current_flow_run.id})")
        return run
    waiting = incidents.needs_person_incident(log_store, scenario, resource)
    decision = incidents.needs_person_action(waiting, now_ms=int(time.time() * 1000),
                                             repeat_after_s=cfg.page_repeat_after_s)
    rejoined = None
    if decision.join and waiting is not None:
        rejoined = incidents.rejoin(log_store, waiting.id, flow_run_id=str(current_flow_run.id or "") or None)
    if rejoined is not None:
        run = Recovery(scenario, resource, cfg, log_store, rejoined, held=held, rejoined=True)
        trigger = (event or {}).get("event") or "a manual run"
        again = incidents.needs_person_action(rejoined, now_ms=0, repeat_after_s=cfg.page_repeat_after_s)
        run.act("detected-again", f"{trigger} ({scenario}): {again.why}")
        return run
    inc, joined = incidents.open_or_join(
        log_store, scenario, resource, incidents.trigger_of(event), incidents.detected_at(event),
        fault_at_s=fault_at_s, flow_run_id=str(current_flow_run.id) if current_flow_run.id else None,
    )
    if joined:
        trigger = (event or {}).get("event") or "a manual run"
        incidents.add_action(log_store, inc.id, "absorbed",
                             f"{trigger} ({scenario}) arrived during this recovery and was absorbed by it")
        get_run_logger().info("absorbed by incident #%d (%s, open since %s)", inc.id, inc.scenario,
                              incidents.iso(inc.opened_at))
        log_store.close()
        return Absorbed({"incident_id": inc.id, "scenario": scenario, "outcome": "absorbed",
                         "absorbed_by": inc.scenario, "status": inc.status})
    run = Recovery(scenario, resource, cfg, log_store, inc, held=held)
    caused = (handover or {}).get("caused")
    if isinstance(caused, int):  # the incident that handed over is caused by this one: linked, its pages inhibited
        other = incidents.get(log_store, caused)
        run.act("linked", f"incident #{caused} ({other.scenario} of {other.resource}) is caused by this one: "
                "this incident pages for both")
    else:
        run.grouped_with = incidents.group_with(
            incidents.previous_closed(log_store, scenario, resource, inc.id), inc.opened_at, cfg.page_group_window_s)
    run.announce()
    return run


def _absorbed_by_lock(scenario: str, blocker: str) -> Absorbed:
    get_run_logger().warning("%s not started: %s; the recovery holding it restarts what it stopped", scenario, blocker)
    return Absorbed({"incident_id": None, "scenario": scenario, "outcome": "absorbed", "absorbed_by": blocker})


@contextmanager
def recovery_incident(
    scenario: str,
    resource: str,
    event: dict[str, Any] | None,
    cfg: Settings,
    handover: dict[str, Any] | None,
    *,
    guard: list[str],
    lock: LockCheck = "check",
    fault_at_s: float | None = None,
) -> Iterator[Recovery | Absorbed]:
    """The skeleton of a recovery: the store's lock checked (`lock`: "check" it is not left by a person, "wait"
    for a live holder, "none"), the incident opened or joined, the limits of `guard` held; the Recovery to work
    in (closed as failed if the body raises), or Absorbed with the flow's summary when another recovery has it."""
    blocker = {"check": lock_blocker, "wait": wait_for_store_lock, "none": lambda _cfg: None}[lock](cfg)
    if blocker is not None:
        yield _absorbed_by_lock(scenario, blocker)
        return
    run = begin(scenario, resource, event, cfg, handover, fault_at_s)
    if isinstance(run, Absorbed):
        yield run
        return
    with run.guard(guard):
        yield run


def close_incidents_of_run(flow: Any, flow_run: FlowRun, state: State) -> None:
    """on_failure/on_crashed hook: close as failed the incidents this flow run left open (its process died)."""
    try:
        cfg = run_settings((flow_run.parameters or {}).get("settings"))
        log_store = incidents.open_incident_store(cfg)
    except CryptoAgentError:
        return
    try:
        for inc in incidents.open_incidents(log_store, flow_run_id=str(flow_run.id)):
            incidents.fail(log_store, inc.id, f"the recovery's flow run ended {state.name}: {state.message or ''}")
    finally:
        log_store.close()


RECOVERY_FAILURE_HOOKS: list[FlowStateHook[..., Any]] = [close_incidents_of_run, *FAILURE_HOOKS]
RECOVERY_CRASH_HOOKS: list[FlowStateHook[..., Any]] = [close_incidents_of_run, *CRASH_HOOKS]
