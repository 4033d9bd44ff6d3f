"""The runbook's five incident scenarios as recovery flows, run by automations (or by hand).

recover-daemon-crash (1), recover-stale-data (2), recover-db-corruption (3), recover-process-hang (4)
and rollback-persistent-failures (5). Each opens (or joins) an incident, does the runbook's steps
safely (our PIDs only, never a copy over a live or corrupt file, one recovery per resource), verifies
the result, tells people as the escalation path says, emits incident events and publishes the
filled post-incident report as the markdown artifact `incident-<id>`.

Every flow takes `service` (crypto_agent's service name; the store scenarios ignore it), `event`
(the triggering event as the automation passes it: id, event, occurred, resource, payload) and
`settings` (overrides); `handover` is internal: a recovery calling another as a subflow passes the
incident they share and the concurrency limits it already holds.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run as current_flow_run
from prefect.settings import PREFECT_UI_URL

from crypto_agent import backup, health, incidents, process, recovery
from crypto_agent.collector import backfill
from crypto_agent.errors import CryptoAgentError, InputError
from crypto_agent.exchange import BinanceClient, IPBanned, RateLimited
from crypto_agent.incidents import (
    ESCALATED,
    FAILED,
    RECOVERED,
    RESOLVED,
    SKIPPED,
    Incident,
)
from crypto_agent.quality import check_data
from crypto_agent.settings import Settings
from crypto_agent.store import open_store
from crypto_agent.universe import TIMEFRAMES, validate_symbol
from flows.common import failure_of, retry_if_transient, run_settings
from flows.daily import check_data_quality
from flows.events import (
    INCIDENT_ESCALATED,
    INCIDENT_OPENED,
    INCIDENT_RESOLVED,
    SERVICE_CPU_HIGH,
    SERVICE_MEMORY_HIGH,
    STORE_RESOURCE,
    emit,
    incident_resource,
    service_resource,
)
from flows.maintenance import check_store_integrity
from flows.notify import CRASH_HOOKS, FAILURE_HOOKS, notify_level

# crypto_agent's service names -> the names of their Prefect resources (flows/events.py)
SERVICE_RESOURCE_NAMES: dict[str, str] = {"backtest": "backtest-daemon", "trader": "trader"}
SERVICES_STOP_ORDER = ("backtest", "trader")  # the backtest first: live trading keeps going longest
LOCK_OWNERS = {"db-corruption": "recover-db-corruption", "persistent-failures": "rollback-persistent-failures"}
RECOVERY_WAIT_S = 3600.0  # longest wait for another recovery of the same resource (concurrency limit)
LOCK_WAIT_S = 600.0  # longest wait for the store's lock held by a live process (a compaction, a restore)
STACK_DUMP_TIMEOUT_S = 10.0
BACKUP_SINCE_MARGIN_MS = 10 * 60_000  # rows written while a backup was being taken may be missing from it
MAX_MESSAGE_ACTIONS = 12


class ServiceUnhealthy(CryptoAgentError):
    """A service that a recovery started is not HEALTHY (yet)."""


class RecoveryFailed(CryptoAgentError):
    """A verification step of a recovery failed; the incident is closed as failed and L2 is told."""


def resource_of(service: str) -> str:
    """The Prefect resource id of a crypto_agent service ("backtest" -> crypto-agent.service.backtest-daemon)."""
    if service not in SERVICE_RESOURCE_NAMES:
        raise InputError(f"unknown service {service!r}", hint=f"use one of: {', '.join(SERVICE_RESOURCE_NAMES)}")
    return service_resource(SERVICE_RESOURCE_NAMES[service])


def _limit_name(resource: str) -> str:
    return f"recovery-{resource}"


def flow_run_link() -> str:
    """The current flow run's page in the Prefect UI, or its id when no UI URL is configured."""
    run_id = current_flow_run.id
    ui = PREFECT_UI_URL.value()
    if ui and run_id:
        return f"{ui.rstrip('/')}/flow-runs/flow-run/{run_id}"
    return f"flow run id {run_id} (no PREFECT_UI_URL configured)" if run_id else "no flow run (called directly)"


def _wait_for_store_lock(cfg: Settings) -> str | None:
    """Before a service recovery takes anything: wait while a live process (a store recovery, a compaction)
    holds the store's lock, up to LOCK_WAIT_S; who still holds it then (or holds it with no process behind it)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while backup.lock_holder(cfg.db_path) is not None:
        blocker = _lock_blocker(cfg)
        if blocker is not None:
            return blocker
        if time.monotonic() > deadline:
            return recovery.store_state(cfg)
        time.sleep(1.0)
    return None


def _lock_blocker(cfg: Settings) -> str | None:
    """Who holds the store's lock without a live process behind it (a person, after an escalation), or None."""
    holder = backup.lock_holder(cfg.db_path)
    if holder is None:
        return None
    pid = holder.get("pid")
    if isinstance(pid, int) and psutil.pid_exists(pid):
        return None  # a live recovery or compaction: wait for it
    return f"{backup.lock_path(cfg.db_path)} held by {holder.get('owner', 'an unknown owner')}"


# --- the incident a recovery works in ---


@dataclass
class Recovery:
    """One recovery flow run's incident: its actions, notifications, events, report and summary."""

    scenario: str
    resource: str
    cfg: Settings
    log_store: Any
    incident: Incident
    joined: bool = False
    handed_over: bool = False
    held: list[str] = field(default_factory=list)
    live_trading_affected: bool = False
    rollback_failed: bool = False
    escalated_in: int | None = None  # another incident (a handover's) that does the paging for this one
    extra_levels: dict[str, str] = field(default_factory=dict)
    undelivered: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None

    @property
    def id(self) -> int:
        """The incident id."""
        return self.incident.id

    def act(self, step: str, detail: str, ok: bool = True) -> None:
        """Record one action of the recovery in the incident (and the run log)."""
        incidents.add_action(self.log_store, self.id, step, detail, ok=ok)
        logger = get_run_logger()
        (logger.info if ok else logger.warning)("incident #%d %s: %s", self.id, step, detail.split("\n", 1)[0])

    def handover(self, limits: list[str] | None = None) -> dict[str, Any]:
        """What a subflow working in this incident gets: its id and the concurrency limits already held."""
        return {"incident_id": self.id, "held": sorted(set(self.held) | set(limits or []))}

    @contextmanager
    def guard(self, resources: list[str]) -> Iterator[None]:
        """Hold the concurrency limits of `resources` (not those a parent holds); a failure closes the incident."""
        names = [_limit_name(r) for r in resources if _limit_name(r) not in self.held]
        try:
            with _concurrency_limits(names):
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

    def tell(self, level: str, subject: str, body: str) -> bool:
        """Send one message to an escalation level; an undeliverable one is recorded, never fatal to the recovery."""
        try:
            notify_level(level, subject, body)
        except Exception as exc:  # noqa: BLE001 (the recovery matters more than the message; the report says who was not told)
            self.undelivered.append(f"{level.upper()}: {exc}")
            incidents.add_action(self.log_store, self.id, f"notify-{level}", f"not delivered: {exc}", ok=False)
            return False
        incidents.told(self.log_store, self.id, level)
        return True

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
        """Tell L1 the incident is open and emit crypto-agent.incident.opened."""
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
        """Who beyond L1 is told at the close, and why (the runbook's escalation path)."""
        levels: dict[str, str] = {}
        if inc.status in (FAILED, ESCALATED):
            levels["l2"] = f"the recovery did not succeed: {inc.summary}"
        repeats = incidents.recent_count(self.log_store, inc.scenario, self.cfg.persistent_window_hours)
        if repeats >= 3 and "l2" not in levels:
            levels["l2"] = (f"{inc.scenario} happened {repeats} times in {self.cfg.persistent_window_hours:g} h: "
                            "the same scenario keeps coming back")
        if inc.scenario == "persistent-failures":
            levels["l3"] = ("the rollback FAILED: " + inc.summary) if self.rollback_failed or inc.status != RESOLVED \
                else "a rollback to the 48 h backup was done"
        if self.live_trading_affected and "l3" not in levels:
            levels["l3"] = "live trading was affected"
        for level, why in self.extra_levels.items():
            levels[level] = f"{levels[level]}; {why}" if level in levels and why not in levels[level] else why
        return dict(sorted(levels.items()))

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
        inc = incidents.close(self.log_store, self.id, status, outcome=outcome, summary=summary, impact=impact,
                              root_cause=root_cause, data_lost_hours=data_lost_hours)
        link = flow_run_link()
        levels = {} if self.escalated_in is not None else self._levels(inc)
        report = incidents.render_report(inc, link)
        for level, why in levels.items():
            subject, body = self.message(f"escalated to {level.upper()}", extra=f"Why {level.upper()}: {why}\n\n{report}")
            if self.tell(level, subject, body):
                emit(INCIDENT_ESCALATED, incident_resource(self.id), self._event_payload(level=level, reason=why))
        headline = {RESOLVED: "resolved", FAILED: "closed: recovery FAILED", ESCALATED: "closed: ESCALATED"}[status]
        subject, body = self.message(headline)
        self.tell("l1", subject, body)
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
        elif not levels and self.escalated_in is None:
            emit(INCIDENT_ESCALATED, incident_resource(self.id), self._event_payload(level="l1", reason=summary))
        self.result = {
            "incident_id": self.id, "scenario": final.scenario, "status": final.status, "outcome": final.outcome,
            "summary": final.summary, "recovery_time_s": final.recovery_time_s,
            "data_lost_hours": final.data_lost_hours, "levels_told": final.levels_told,
            "undelivered": list(self.undelivered), **details,
        }
        return self.result

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
def _concurrency_limits(names: list[str]) -> Iterator[None]:
    """Hold one slot of each global concurrency limit (created with limit 1 when missing)."""
    if not names:
        yield
        return
    with get_client(sync_client=True) as client:
        for name in names:
            client.upsert_global_concurrency_limit_by_name(name, 1)
    with concurrency(names, occupy=1, timeout_seconds=RECOVERY_WAIT_S):
        yield


def begin(
    scenario: str,
    resource: str,
    event: dict[str, Any] | None,
    cfg: Settings,
    handover: dict[str, Any] | None,
    fault_at_s: float | None = None,
) -> Recovery:
    """Open the incident (announced to L1), join the one already open (absorbed), or work in a parent's."""
    log_store = incidents.open_incident_store(cfg)
    held = list((handover or {}).get("held") or [])
    if handover and handover.get("incident_id"):
        inc = incidents.get(log_store, int(handover["incident_id"]))
        run = Recovery(scenario, resource, cfg, log_store, inc, handed_over=True, held=held)
        run.act("handover", f"{scenario} recovery takes over (flow run {current_flow_run.id})")
        return run
    inc, joined = incidents.open_or_join(
        log_store, scenario, resource, incidents.trigger_of(event), incidents.detected_at(event),
        fault_at_s=fault_at_s, flow_run_id=str(current_flow_run.id) if current_flow_run.id else None,
    )
    run = Recovery(scenario, resource, cfg, log_store, inc, joined=joined, held=held)
    if joined:
        trigger = (event or {}).get("event") or "a manual run"
        incidents.add_action(log_store, inc.id, "absorbed",
                             f"{trigger} ({scenario}) arrived during this recovery and was absorbed by it")
        get_run_logger().info("absorbed by incident #%d (%s, open since %s)", inc.id, inc.scenario,
                              incidents.iso(inc.opened_at))
        run.result = {"incident_id": inc.id, "scenario": scenario, "outcome": "absorbed",
                      "absorbed_by": inc.scenario, "status": inc.status}
        log_store.close()
        return run
    run.announce()
    return run


def _absorbed_by_lock(scenario: str, blocker: str) -> dict[str, Any]:
    get_run_logger().warning("%s not started: %s; the recovery holding it restarts what it stopped", scenario, blocker)
    return {"incident_id": None, "scenario": scenario, "outcome": "absorbed", "absorbed_by": blocker}


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


RECOVERY_FAILURE_HOOKS = [close_incidents_of_run, *FAILURE_HOOKS]
RECOVERY_CRASH_HOOKS = [close_incidents_of_run, *CRASH_HOOKS]


# --- tasks shared by several recoveries ---


@task(name="probe-service", timeout_seconds=120, cache_policy=NO_CACHE)
def probe_service(settings: dict[str, Any] | None, service: str) -> health.ProbeReport:
    """The health probe of a service: HEALTHY, DEGRADED or DEAD with the reasons; signals nothing."""
    cfg = run_settings(settings)
    return health.probe(process.service_spec(service, cfg), cfg)


@task(name="stop-service", timeout_seconds=300, cache_policy=NO_CACHE)
def stop_service(settings: dict[str, Any] | None, service: str) -> dict[str, Any]:
    """SIGTERM our service, SIGKILL after stop_grace_s; a pidfile naming another process is refused (nothing signalled)."""
    cfg = run_settings(settings)
    spec = process.service_spec(service, cfg)
    try:
        result = process.stop(spec, grace_s=cfg.stop_grace_s)
    except process.NotOurProcess as exc:
        return {"service": service, "was_running": False, "refused": exc.message, "signal": None, "pid": None}
    return {"service": service, "was_running": result.was_running, "refused": None, "signal": result.signal,
            "pid": result.pid, "exit_code": result.exit_code, "seconds": round(result.elapsed_s, 2),
            "cleaned": [p.name for p in result.cleaned]}


@task(name="clean-state-files", timeout_seconds=60, cache_policy=NO_CACHE)
def clean_service_state(settings: dict[str, Any] | None, service: str) -> list[str]:
    """Remove the pidfile, ownership record and heartbeat of a service that is gone (a dead one's crash recorded)."""
    cfg = run_settings(settings)
    spec = process.service_spec(service, cfg)
    store = _sound_store(cfg)
    try:
        return [p.name for p in process.clean_state(spec, store=store)]
    finally:
        if store is not None:
            store.close()


def _sound_store(cfg: Settings) -> Any:
    """The store for bookkeeping (service events) when it exists and opens; None otherwise."""
    if not Path(cfg.db_path).exists():
        return None
    try:
        return open_store(cfg)
    except CryptoAgentError:
        return None


def _last_start(cfg: Settings, spec: process.ServiceSpec) -> float | None:
    """When the service last started: its ownership record, or the store's newest `started` event."""
    store = _sound_store(cfg)
    try:
        return recovery.last_start(spec, store)
    finally:
        if store is not None:
            store.close()


@task(name="start-service", retries=1, retry_delay_seconds=5, timeout_seconds=300, cache_policy=NO_CACHE,
      retry_condition_fn=lambda task, run, state: not isinstance(failure_of(state), process.ServicePaused))
def start_service(settings: dict[str, Any] | None, service: str) -> dict[str, Any]:
    """Start the service detached, without any injected fault of its previous instance; wait for its first heartbeat."""
    cfg = run_settings(settings)
    spec = process.service_spec(service, cfg)
    store = _sound_store(cfg)
    try:
        result = process.start(spec, cfg, env=recovery.CLEAN_START_ENV, store=store)
    finally:
        if store is not None:
            store.close()
    return {"service": service, "pid": result.pid, "seconds": round(result.elapsed_s, 2),
            "cleaned": [p.name for p in result.cleaned]}


@task(name="confirm-healthy", retries=5, retry_delay_seconds=[1, 2, 4, 8, 15], timeout_seconds=120,
      cache_policy=NO_CACHE)
def confirm_healthy(settings: dict[str, Any] | None, service: str) -> dict[str, Any]:
    """Probe the service until it is HEALTHY (retried with backoff); ServiceUnhealthy with the reasons otherwise."""
    cfg = run_settings(settings)
    report = health.probe(process.service_spec(service, cfg), cfg)
    if not report.healthy:
        raise ServiceUnhealthy(f"{service} is not healthy after the restart: {report.summary}",
                               hint=f"read its log {process.service_spec(service, cfg).log}")
    return report.to_dict()


@task(name="restore-good-backup", retries=2, retry_delay_seconds=[10, 30], timeout_seconds=3600,
      cache_policy=NO_CACHE,
      retry_condition_fn=lambda task, run, state: "still open" in str(failure_of(state) or ""))
def restore_good_backup(
    settings: dict[str, Any] | None, owner: str, reason: str, hours_ago: float | None = None
) -> dict[str, Any]:
    """Restore the newest good backup (of `hours_ago` or before, when given); a backup failing its check is
    marked bad and the next one tried. {restored: False, message} when none qualifies."""
    cfg = run_settings(settings)
    refused: list[str] = []
    while True:
        try:
            if hours_ago is None:
                info = backup.choose_backup(cfg.backup_dir)
            else:
                info = backup.backup_for_hours_ago(cfg.backup_dir, hours_ago)
        except backup.NoGoodBackup as exc:
            return {"restored": False, "message": exc.message, "refused": refused}
        try:
            result = backup.restore(info.path, cfg.db_path, cfg.quarantine_dir, owner=owner, reason=reason)
        except backup.RestoreRefused as exc:
            if backup.backup_info(info.path).status != backup.BAD:
                raise  # refused for another reason (the database is still open): not the backup's fault
            refused.append(f"{info.name}: {exc.message}")
            continue
        created = info.created_at.timestamp() if info.created_at else time.mktime(info.day.timetuple())
        quarantined = result.quarantined / Path(cfg.db_path).name if result.quarantined else None
        return {
            "restored": True, "backup": str(info.path), "backup_name": info.name, "day": info.day.isoformat(),
            "created_at_ms": int(created * 1000), "quarantined": str(quarantined) if quarantined else None,
            "tables": dict(result.tables), "seconds": round(result.duration_s, 2), "refused": refused,
        }


@task(name="resync-candles", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def resync_candles(settings: dict[str, Any] | None, since_ms: int, lock_held: bool) -> dict[str, Any]:
    """Fetch every candle the restored store lacks since the backup (and in the continuity window) from the exchange."""
    cfg = run_settings(settings)
    with open_store(cfg) as store, BinanceClient.from_settings(cfg) as client:
        now_ms = client.server_time()
        windows = recovery.resync_windows(store, cfg, since_ms, now_ms)
        summary = backfill(store, client, windows, now_ms=now_ms, lock_held=lock_held)
    return {"windows": len(windows), "written": summary.total, "failures": dict(summary.failures), "now_ms": now_ms}


@task(name="salvage-rows", timeout_seconds=3600, cache_policy=NO_CACHE)
def salvage_rows(settings: dict[str, Any] | None, quarantined_db: str, since_ms: int) -> dict[str, Any]:
    """Copy the readable rows newer than the backup of every non-candle table from the quarantined database."""
    cfg = run_settings(settings)
    return recovery.salvage_since(quarantined_db, cfg.db_path, since_ms).to_dict()


@task(name="read-log-errors", timeout_seconds=60, cache_policy=NO_CACHE)
def read_log_errors(settings: dict[str, Any] | None, service: str) -> list[str]:
    """The runbook's `tail -100 <log> | grep -i error` of the service's log."""
    cfg = run_settings(settings)
    return recovery.log_errors(process.service_spec(service, cfg).log)


@contextmanager
def _store_lock(run: Recovery, owner: str) -> Iterator[None]:
    """Hold the store's recovery lock (db/LOCKED), waiting for a live holder (a compaction) up to LOCK_WAIT_S."""
    deadline = time.monotonic() + LOCK_WAIT_S
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(backup.recovery_lock(run.cfg.db_path, owner))
                break
            except backup.RecoveryLocked as exc:
                if _lock_blocker(run.cfg) is not None or time.monotonic() > deadline:
                    raise
                get_run_logger().info("waiting for the store's lock: %s", exc.message)
                time.sleep(2.0)
        run.act("lock", f"took {backup.lock_path(run.cfg.db_path)} as {owner!r}: writers pause until it goes")
        yield


def _start_verified(run: Recovery, settings: dict[str, Any] | None, service: str) -> dict[str, Any] | None:
    """Start a service and confirm it HEALTHY; None (nothing started) when it is paused."""
    pause = process.paused(process.service_spec(service, run.cfg))
    if pause is not None:
        run.act("not-started", f"{service} stays paused ({pause.get('reason', 'no reason given')}, by "
                f"{pause.get('by', 'unknown')}): `crypto-agent service resume {service}` resumes it")
        return None
    held = recovery.hold_in_force(service, run.cfg)
    if held is not None:
        run.act("not-started", f"{service} is held {held}: its holder starts it again")
        return None
    started = start_service(settings, service)
    run.act("start", f"started {service}: PID {started['pid']} in {started['seconds']} s"
            + (f"; cleaned {', '.join(started['cleaned'])}" if started["cleaned"] else ""))
    report = confirm_healthy(settings, service)
    run.act("confirm-healthy", f"{service}: {report['summary']}")
    return report


def _stop_all(run: Recovery, settings: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Stop every service (our PIDs only; a stranger's pidfile is refused and reported); what each stop did."""
    stopped = {}
    for name in SERVICES_STOP_ORDER:
        result = stop_service(settings, name)
        stopped[name] = result
        if result["refused"]:
            run.act("stop-refused", f"{name}: {result['refused']}; that process was left alone", ok=False)
        elif result["was_running"]:
            run.act("stop", f"stopped {name} (PID {result['pid']}) with {result['signal']} in {result['seconds']} s")
        else:
            run.act("stop", f"{name} was not running")
    return stopped


def _since_backup_ms(restored: dict[str, Any]) -> int:
    return int(restored["created_at_ms"]) - BACKUP_SINCE_MARGIN_MS


# --- scenario 4: CPU spike / process hang ---


@task(name="capture-stacks", timeout_seconds=60, cache_policy=NO_CACHE)
def capture_stacks(settings: dict[str, Any] | None, service: str) -> dict[str, Any]:
    """Have our service write every thread's stack (SIGUSR1; a stopped one gets SIGCONT first); the dump's text.

    A service that does not answer in time is recorded, not fatal: {timeout: message}.
    """
    cfg = run_settings(settings)
    spec = process.service_spec(service, cfg)
    continued = False
    try:
        proc = process.owned_process(spec)
        if proc.status() == psutil.STATUS_STOPPED:
            proc.send_signal(signal.SIGCONT)  # psutil re-checks that it is still our instance
            continued = True
        path = process.dump_stacks(spec, timeout_s=STACK_DUMP_TIMEOUT_S)
    except (process.StackDumpTimeout, process.ServiceNotRunning, process.NotOurProcess) as exc:
        return {"path": None, "text": "", "continued": continued, "timeout": exc.message}
    except psutil.NoSuchProcess:
        return {"path": None, "text": "", "continued": continued, "timeout": "the process ended before its dump"}
    return {"path": str(path), "text": path.read_text(encoding="utf-8", errors="replace"), "continued": continued,
            "timeout": None}


@flow(
    name="recover-process-hang",
    description="Runbook scenario 4 (CPU spike / hang): capture the stacks, stop (SIGTERM, then SIGKILL), clean, "
    "restart without the fault, confirm HEALTHY.",
    timeout_seconds=1800,
    on_failure=RECOVERY_FAILURE_HOOKS,
    on_crashed=RECOVERY_CRASH_HOOKS,
)
def recover_process_hang(
    service: str = "backtest",
    event: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    handover: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Recover a hung or CPU-burning service; the summary {incident_id, outcome, ...}."""
    cfg = run_settings(settings)
    resource = resource_of(service)
    spec = process.service_spec(service, cfg)
    blocker = None if handover else _wait_for_store_lock(cfg)
    if blocker is not None:
        return _absorbed_by_lock("process-hang", blocker)
    run = begin("process-hang", resource, event, cfg, handover, fault_at_s=recovery.last_heartbeat_at(spec))
    if run.joined:
        return run.result or {}
    with run.guard([resource]):
        run.live_trading_affected = service == "trader"
        impact = "Live trading stalled" if service == "trader" else "Backtest stalled, live trading OK"
        held = recovery.hold_in_force(service, cfg)
        if held is not None and not run.handed_over:
            run.act("held", f"{service} is {held}: paused or stopped on purpose, not a hang")
            return run.finish(RESOLVED, SKIPPED, summary=f"{service} is {held}: nothing done",
                              impact="none (held on purpose)", root_cause="Other: service held on purpose",
                              data_lost_hours=0)
        report = probe_service(settings, service)
        run.act("probe", f"{report.summary}" + (f"; also {'; '.join(report.reasons[1:])}" if report.reasons[1:] else ""),
                ok=report.healthy)
        # cpu-high and memory-high come from minutes of history: one healthy sample does not refute them
        judged = (event or {}).get("event") in (SERVICE_CPU_HIGH, SERVICE_MEMORY_HIGH)
        if report.healthy and not run.handed_over and not judged:
            return run.finish(RESOLVED, SKIPPED, summary=f"{service} is healthy again: nothing done",
                              impact="none", root_cause="Other: transient (healthy when the recovery looked)",
                              data_lost_hours=0)
        cause = "; ".join(report.reasons) or f"{(event or {}).get('event')} ({report.summary} when looked at)"
        if report.alive:
            stacks = capture_stacks(settings, service)
            if stacks["continued"]:
                run.act("continue", f"PID {report.pid} was stopped (SIGSTOP): sent SIGCONT so it can dump its stacks")
            if stacks["timeout"]:
                run.act("capture-stacks", f"no stack dump: {stacks['timeout']}", ok=False)
            else:
                run.act("capture-stacks", f"{stacks['path']}\n{stacks['text']}")
                create_markdown_artifact(
                    markdown=f"# Stacks of {service} (incident #{run.id})\n\n`{stacks['path']}`\n\n```\n"
                    f"{stacks['text'][:50_000]}\n```\n",
                    key=f"incident-{run.id}-stacks", description=f"stack dump of {service} PID {report.pid}",
                )
        stopped = stop_service(settings, service)
        if stopped["refused"]:
            run.act("stop-refused", f"{stopped['refused']}; that process was left alone", ok=False)
        elif stopped["was_running"]:
            how = "gracefully (SIGTERM)" if stopped["signal"] == "SIGTERM" else \
                f"by force (SIGKILL after {cfg.stop_grace_s:g} s of SIGTERM)"
            run.act("stop", f"stopped PID {stopped['pid']} {how} in {stopped['seconds']} s")
        else:
            run.act("stop", f"{service} was no longer running")
        cleaned = clean_service_state(settings, service)
        run.act("clean-state", f"removed {', '.join(cleaned)}" if cleaned else "no state files left")
        healthy = _start_verified(run, settings, service)
        root_cause = f"Process hang: {cause}"
        if healthy is None:
            return run.finish(RESOLVED, SKIPPED, summary=f"{service} stopped; not restarted: it is paused",
                              impact=impact, root_cause=root_cause, data_lost_hours=0)
        return run.finish(RESOLVED, RECOVERED, summary=f"{service} restarted and HEALTHY (PID {healthy['pid']})",
                          impact=impact, root_cause=root_cause, data_lost_hours=0, pid=healthy["pid"])


# --- scenario 3: database corruption ---


@task(name="reindex-scratch-copy", timeout_seconds=3600, cache_policy=NO_CACHE)
def reindex_scratch_copy(settings: dict[str, Any] | None, incident_id: int) -> recovery.ReindexResult:
    """REINDEX a scratch copy of the database and check it fully; the live (corrupt) file is not touched."""
    cfg = run_settings(settings)
    work = Path(cfg.db_path).parent / f".repair-incident-{incident_id}"
    return recovery.reindex_copy(cfg.db_path, work)


@task(name="install-repaired-copy", timeout_seconds=600, cache_policy=NO_CACHE)
def install_repaired_copy(settings: dict[str, Any] | None, repaired: str, reason: str) -> str:
    """Quarantine the corrupt database with its -wal/-shm, then put the repaired copy in its place; the quarantine folder."""
    cfg = run_settings(settings)
    return str(recovery.put_repaired_in_place(cfg.db_path, repaired, cfg.quarantine_dir, reason))


def _integrity_detail(result: Any) -> str:
    if result.ok:
        return f"{result.mode}: ok"
    return f"{result.mode}: {len(result.problems)} problem(s)\n" + "\n".join(result.problems[:50])


def _restore_and_resync(
    run: Recovery, settings: dict[str, Any] | None, owner: str, reason: str, hours_ago: float | None,
    salvage: bool,
) -> dict[str, Any]:
    """Restore a good backup, verify it, resync the candles since it, salvage newer rows; what happened.

    {"restored": False, "message": ...} when no backup qualifies. Runs under the store's lock.
    """
    restored = restore_good_backup(settings, owner, reason, hours_ago)
    for refusal in restored["refused"]:
        run.act("backup-refused", f"{refusal} (now marked bad; never chosen again)", ok=False)
    if not restored["restored"]:
        return restored
    run.act("restore", f"restored {restored['backup_name']} (taken {incidents.iso(restored['created_at_ms'])}) in "
            f"{restored['seconds']} s; the replaced database is in {restored['quarantined'] or '(there was none)'}")
    verified = check_store_integrity(settings, True)
    run.act("verify-restore", _integrity_detail(verified), ok=verified.ok)
    if not verified.ok:
        raise RecoveryFailed(f"the restored database fails its integrity check: {'; '.join(verified.problems[:3])}",
                             hint="restore another backup by hand: `crypto-agent restore --backup FILE`")
    since = _since_backup_ms(restored)
    lost_hours = 0.0
    try:
        resync = resync_candles(settings, since, True)
    except CryptoAgentError as exc:
        resync = {"windows": None, "written": 0, "failures": {"*": exc.message}, "now_ms": int(time.time() * 1000)}
    ok = not resync["failures"]
    run.act("resync-candles", f"{resync['written']} candles in {resync['windows']} window(s) since "
            f"{incidents.iso(since)}" + (f"; failed: {resync['failures']}" if resync["failures"] else ""), ok=ok)
    if not ok:
        lost_hours = max(lost_hours, recovery.hours_between(since, resync["now_ms"]))
    restored["resync"] = resync
    if salvage and restored["quarantined"]:
        salvaged = salvage_rows(settings, restored["quarantined"], since)
        copied = ", ".join(f"{t} {n}" for t, n in salvaged["copied"].items() if n) or "no newer rows"
        run.act("salvage", f"from {restored['quarantined']}: {copied}"
                + (f"; unreadable: {salvaged['unreadable']}" if salvaged["unreadable"] else ""),
                ok=not salvaged["unreadable"])
        if salvaged["unreadable"]:
            lost_hours = max(lost_hours, recovery.hours_between(since, int(time.time() * 1000)))
        restored["salvage"] = salvaged
    elif not salvage:
        # a rollback drops everything newer than the backup on purpose; it stays in quarantine
        lost_hours = max(lost_hours, recovery.hours_between(since, int(time.time() * 1000)))
    restored["data_lost_hours"] = round(lost_hours, 3)
    return restored


@flow(
    name="recover-db-corruption",
    description="Runbook scenario 3: stop the services, lock the store, REINDEX a scratch copy or restore the newest "
    "good backup (the corrupt file quarantined), resync, salvage, validate, trader first then the daemon.",
    timeout_seconds=2 * 3600,
    on_failure=RECOVERY_FAILURE_HOOKS,
    on_crashed=RECOVERY_CRASH_HOOKS,
)
def recover_db_corruption(
    service: str = "backtest",
    event: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    handover: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Repair or restore a corrupt store and bring the services back; the summary {incident_id, outcome, ...}."""
    cfg = run_settings(settings)
    blocker = _lock_blocker(cfg)
    if blocker is not None:
        return _absorbed_by_lock("db-corruption", blocker)
    run = begin("db-corruption", STORE_RESOURCE, event, cfg, handover)
    if run.joined:
        return run.result or {}
    owner = f"{LOCK_OWNERS['db-corruption']} #{run.id}"
    with run.guard([STORE_RESOURCE, resource_of("backtest"), resource_of("trader")]):
        reported = incidents.event_payload(event).get("problems")
        if reported:
            run.act("event", "reported: " + "; ".join(str(p) for p in reported[:10]))
        check = check_store_integrity(settings, True)
        run.act("integrity-check", _integrity_detail(check), ok=check.ok)
        if check.ok:
            return run.finish(RESOLVED, SKIPPED, summary="integrity_check says ok: nothing to repair, nothing stopped",
                              impact="none", root_cause="Other: not reproduced (integrity_check ok)",
                              data_lost_hours=0)
        root_cause = f"DB corruption: {'; '.join(check.problems[:3])}"
        incidents.update_fields(run.log_store, run.id, root_cause=root_cause)
        run.incident = incidents.get(run.log_store, run.id)
        with _store_lock(run, owner):
            stopped = _stop_all(run, settings)
            # running until we stopped it, or found dead (its pidfile left behind): live trading was hit
            run.live_trading_affected = stopped["trader"]["was_running"] or bool(stopped["trader"].get("cleaned"))
            impact = ("Live trading and backtest stopped" if run.live_trading_affected
                      else "Backtest stopped, live trading was not running")
            reindexed = reindex_scratch_copy(settings, run.id)
            if reindexed.ok:
                run.act("reindex", f"REINDEX on a scratch copy repaired it in {reindexed.seconds:.1f} s")
                folder = install_repaired_copy(settings, str(reindexed.repaired),
                                               f"incident #{run.id}: corrupt; replaced by its REINDEXed copy")
                run.act("install-repaired", f"the corrupt database (with -wal/-shm) is in {folder}; "
                        "the repaired copy is in place")
                lost, how = 0.0, "repaired by REINDEX"
            else:
                run.act("reindex", "REINDEX did not repair a scratch copy: " + "; ".join(reindexed.problems[:5]),
                        ok=False)
                restored = _restore_and_resync(run, settings, owner, f"incident #{run.id}: corrupt database",
                                               None, salvage=True)
                if not restored["restored"]:
                    recovery.hand_lock_to_person(
                        cfg.db_path, f"{owner}: escalated, no good backup; delete this file once a person "
                        "has restored the store")
                    why = (f"no good backup to restore: {restored['message']}. Left as found: the corrupt database "
                           f"stays at {cfg.db_path} (nothing overwritten), the services stay stopped and "
                           f"{backup.lock_path(cfg.db_path)} stays so nothing writes or starts on it. Next: "
                           "delete LOCKED, then `crypto-agent restore --backup FILE` (or rebuild with "
                           "`crypto-agent collect`), then start the services")
                    run.extra_levels["l3"] = "the store is down with no good backup"
                    run.act("escalate", why, ok=False)
                    return run.finish(ESCALATED, "escalated", summary=why, impact=impact, root_cause=root_cause)
                lost, how = restored["data_lost_hours"], f"restored from {restored['backup_name']}"
            validation = check_data_quality(settings)
            run.act("validate", "data checks pass" if validation.ok else "; ".join(validation.reasons[:5]),
                    ok=validation.ok)
            if not validation.ok:
                run.extra_levels["l2"] = "the store is sound again but its data fails validation: " + \
                    "; ".join(validation.reasons[:3])
        run.act("unlock", "released the store's lock")
        trader = _start_verified(run, settings, "trader")  # live trading first
        daemon = _start_verified(run, settings, "backtest")  # then the daemon, once the trader is healthy
        state = f"trader {'HEALTHY' if trader else 'paused'}, daemon {'HEALTHY' if daemon else 'paused'}"
        return run.finish(RESOLVED, RECOVERED, summary=f"{how}; {state}", impact=impact, root_cause=root_cause,
                          data_lost_hours=lost)


# --- scenario 1: daemon crashed ---


@task(name="hold-restart", timeout_seconds=3600, cache_policy=NO_CACHE)
def hold_restart(seconds: float) -> float:
    """Wait out the grace period after the service's last start (runbook: don't restart yet if within 5 min)."""
    time.sleep(max(0.0, seconds))
    return seconds


@flow(
    name="recover-daemon-crash",
    description="Runbook scenario 1: confirm dead (grace after a start), triage (a hang goes to recover-process-hang), "
    "attach the log's errors, quick integrity check (corrupt: recover-db-corruption), clean, restart, confirm HEALTHY.",
    timeout_seconds=3 * 3600,
    on_failure=RECOVERY_FAILURE_HOOKS,
    on_crashed=RECOVERY_CRASH_HOOKS,
)
def recover_daemon_crash(
    service: str = "backtest",
    event: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    handover: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Recover a dead service (or hand a hung one to recover-process-hang); the summary {incident_id, outcome, ...}."""
    cfg = run_settings(settings)
    resource = resource_of(service)
    spec = process.service_spec(service, cfg)
    blocker = _wait_for_store_lock(cfg)  # a store recovery restarts the services itself
    if blocker is not None:
        return _absorbed_by_lock("daemon-crash", blocker)
    run = begin("daemon-crash", resource, event, cfg, handover, fault_at_s=recovery.last_heartbeat_at(spec))
    if run.joined:
        return run.result or {}
    with run.guard([resource]):
        run.live_trading_affected = service == "trader"
        impact = "Live trading down" if service == "trader" else "Backtest paused (daemon down), live trading OK"
        pause = process.paused(spec)
        if pause is not None:
            run.act("paused", f"{service} is paused ({pause.get('reason', 'no reason given')}, by "
                    f"{pause.get('by', 'unknown')} since {pause.get('since', '?')}): not restarting it")
            return run.finish(RESOLVED, SKIPPED, summary=f"{service} is paused on purpose: not restarted",
                              impact="none (paused on purpose)", root_cause="Other: service paused by a person or "
                              "a rollback", data_lost_hours=0)
        held = recovery.hold_in_force(service, cfg)
        if held is not None:
            run.act("held", f"{service} is {held}: stopped or paused on purpose, not restarting it")
            return run.finish(RESOLVED, SKIPPED, summary=f"{service} is {held}: nothing done",
                              impact="none (held on purpose)", root_cause="Other: service held on purpose",
                              data_lost_hours=0)
        report = probe_service(settings, service)
        verdict = recovery.triage(report, cfg.heartbeat_max_age_s)
        run.act("probe", f"{report.summary} -> {verdict.verdict.value}: {verdict.reason}")
        if verdict.verdict is recovery.Verdict.DEAD:
            wait = recovery.restart_wait_s(_last_start(cfg, spec), cfg.crash_restart_grace_s)
            if wait > 0:
                run.act("grace", f"{service} started less than {cfg.crash_restart_grace_s:g} s ago: holding the "
                        f"restart {wait:.1f} s, then looking again")
                hold_restart(wait)
                report = probe_service(settings, service)
                verdict = recovery.triage(report, cfg.heartbeat_max_age_s)
                run.act("probe", f"after the grace period: {report.summary} -> {verdict.verdict.value}")
        if verdict.verdict is recovery.Verdict.HUNG:
            run.act("triage", f"alive but hung ({verdict.reason}): handing over to recover-process-hang")
            sub = recover_process_hang(service=service, event=event, settings=settings,
                                       handover=run.handover([_limit_name(resource)]))
            return run.finish_from(sub)
        if verdict.verdict is recovery.Verdict.RUNNING:
            # nothing done by this run: "skipped", so MTTR counts real recoveries only
            return run.finish(
                RESOLVED, SKIPPED, summary=f"{service} is running ({report.summary}): no restart needed",
                impact="none" if report.healthy else impact,
                root_cause="Other: not a crash (the service runs and beats)", data_lost_hours=0,
            )
        if verdict.foreign:
            run.act("refused", f"{verdict.foreign}: that process is not ours and is left alone; the stale "
                    "pidfile will be cleaned, nothing signalled", ok=False)
        errors = read_log_errors(settings, service)
        run.act("log-errors", (f"{len(errors)} error line(s) in the last 100 of {spec.log}:\n" + "\n".join(errors[-40:]))
                if errors else f"no error in the last 100 lines of {spec.log}")
        last_error = next((e for e in reversed(errors) if " CRITICAL " in e or " ERROR " in e), None)
        root_cause = (f"Other: {service} crashed ({last_error.split(': ', 1)[-1][:200]})" if last_error else
                      f"Other: {service} died without logging an error (killed from outside: SIGKILL, the OOM "
                      "killer, a reboot)")
        incidents.update_fields(run.log_store, run.id, root_cause=root_cause, impact=impact)
        run.incident = incidents.get(run.log_store, run.id)
        check = check_store_integrity(settings, False)
        if not check.ok and Path(cfg.db_path).exists():
            run.act("integrity-check", _integrity_detail(check) + "\nhanding over to recover-db-corruption", ok=False)
            sub = recover_db_corruption(service=service, event=event, settings=settings,
                                        handover={"incident_id": None, "held": run.held})
            return run.finish_from(sub)
        run.act("integrity-check", _integrity_detail(check) if check.ok else
                f"no database yet at {cfg.db_path}: the service creates it")
        cleaned = clean_service_state(settings, service)
        run.act("clean-state", f"removed {', '.join(cleaned)}" if cleaned else "no state files left")
        healthy = _start_verified(run, settings, service)
        if healthy is None:
            return run.finish(RESOLVED, SKIPPED, summary=f"{service} was paused meanwhile: not restarted",
                              impact=impact, root_cause=root_cause, data_lost_hours=0)
        return run.finish(RESOLVED, RECOVERED, summary=f"{service} restarted and HEALTHY (PID {healthy['pid']})",
                          impact=impact, root_cause=root_cause, data_lost_hours=0, pid=healthy["pid"])


# --- scenario 2: data staleness ---


# No task-level retries: the client already retries timeouts and 5xx with backoff (request_retries), and an
# exchange still down after that is the runbook's cue to tell L2, not to wait longer.
@task(name="check-exchange", timeout_seconds=300, cache_policy=NO_CACHE)
def check_exchange(settings: dict[str, Any] | None) -> dict[str, Any]:
    """Is the exchange up (its server time), and how much of the request weight is used (the runbook's 1 and 2)."""
    cfg = run_settings(settings)
    with BinanceClient.from_settings(cfg) as client:
        server_ms = client.server_time()
        status = client.rate_limit_status()
    return {
        "server_time_ms": server_ms, "skew_ms": server_ms - int(time.time() * 1000),
        "used_weight": status.used_weight, "weight_limit": status.weight_limit,
        "used_share": status.used_share, "banned_until": status.banned_until.isoformat() if status.banned_until else None,
    }


@task(name="backfill-stale-windows", retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def backfill_stale_windows(settings: dict[str, Any] | None, windows: list[list[Any]]) -> dict[str, Any]:
    """Fetch and store exactly these (symbol, timeframe, start_ms, end_ms) windows from the exchange."""
    cfg = run_settings(settings)
    with open_store(cfg) as store, BinanceClient.from_settings(cfg) as client:
        summary = backfill(store, client, [tuple(w) for w in windows])
    return {
        "written": {f"{s} {tf}": n for (s, tf), n in sorted(summary.written.items())},
        "total": summary.total, "failures": dict(summary.failures),
    }


def stale_windows_of(event: dict[str, Any] | None) -> tuple[list[list[Any]] | None, list[str]]:
    """The failing windows the event names, checked ([symbol, timeframe, start_ms, end_ms]); None when it names
    none or only part of them (the data-validation event keeps at most 500); the entries skipped and why."""
    payload = incidents.event_payload(event)
    raw = payload.get("failing_windows")
    if not isinstance(raw, list) or not raw:
        return None, []
    total = payload.get("windows_total")
    if isinstance(total, int) and total > len(raw):
        return None, [f"the event lists {len(raw)} of {total} windows: checking the store afresh"]
    windows, skipped = [], []
    for item in raw:
        try:
            symbol = validate_symbol(str(item["symbol"]))
            tf = str(item["timeframe"])
            start, end = int(item["start_ms"]), int(item["end_ms"])
            if tf not in TIMEFRAMES or start > end:
                raise ValueError(f"timeframe {tf!r}, {start} > {end}" if start > end else f"timeframe {tf!r}")
        except (KeyError, TypeError, ValueError, CryptoAgentError) as exc:
            skipped.append(f"{str(item)[:120]}: {getattr(exc, 'message', exc)}")
            continue
        windows.append([symbol, tf, start, end])
    return windows, skipped


@flow(
    name="recover-stale-data",
    description="Runbook scenario 2: exchange reachable? used weight? backfill exactly the stale windows, validate "
    "again; still failing -> L2 with the failing symbols.",
    timeout_seconds=3600,
    on_failure=RECOVERY_FAILURE_HOOKS,
    on_crashed=RECOVERY_CRASH_HOOKS,
)
def recover_stale_data(
    service: str = "backtest",
    event: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    handover: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Backfill the stale or missing candle windows and validate; the summary {incident_id, outcome, ...}."""
    cfg = run_settings(settings)
    blocker = _lock_blocker(cfg)
    if blocker is not None:
        return _absorbed_by_lock("stale-data", blocker)
    run = begin("stale-data", STORE_RESOURCE, event, cfg, handover)
    if run.joined:
        return run.result or {}
    with run.guard([STORE_RESOURCE]):
        impact = "Backtest and live trading on stale data"
        try:
            exchange = check_exchange(settings)
        except CryptoAgentError as exc:
            throttled = isinstance(exc, (RateLimited, IPBanned))
            run.act("check-exchange", exc.message, ok=False)
            return run.finish(ESCALATED, "escalated", summary=f"the exchange cannot be used: {exc.message}; "
                              "L2: check the Binance API status", impact=impact,
                              root_cause=("API throttle: " if throttled else "Other: exchange unreachable: ") + exc.message)
        share = exchange["used_share"]
        run.act("check-exchange", f"server time {incidents.iso(exchange['server_time_ms'])} (skew "
                f"{exchange['skew_ms'] / 1000:+.1f} s); used weight {exchange['used_weight']} of "
                f"{exchange['weight_limit']}" + (f" ({share:.0%})" if share is not None else ""))
        windows, skipped = stale_windows_of(event)
        for note in skipped:
            run.act("event-window-skipped", note, ok=False)
        source = "the event"
        if windows is None:
            with open_store(cfg) as store:
                fresh = check_data(store, cfg, now_ms=exchange["server_time_ms"])
            windows = [list(w) for w in fresh.failing_windows()]
            source = "a fresh check of the store"
        failing_symbols = sorted({w[0] for w in windows})
        run.act("windows", f"{len(windows)} window(s) from {source}: " + "; ".join(
            f"{s} {tf} {incidents.iso(a)}..{incidents.iso(b)}" for s, tf, a, b in windows[:20])
            + (f" and {len(windows) - 20} more" if len(windows) > 20 else ""))
        throttled = share is not None and share >= cfg.weight_safety_margin
        root_cause = ("API throttle: used weight at " + f"{share:.0%}") if throttled else \
            "Other: candles missing or late (" + (", ".join(failing_symbols[:10]) or "none") + ")"
        filled = backfill_stale_windows(settings, windows) if windows else {"written": {}, "total": 0, "failures": {}}
        run.act("backfill", f"{filled['total']} candles written: " + (", ".join(
            f"{k} {n}" for k, n in filled["written"].items()) or "none")
            + (f"; failed: {filled['failures']}" if filled["failures"] else ""), ok=not filled["failures"])
        validation = check_data_quality(settings)
        run.act("validate", "data checks pass" if validation.ok else "; ".join(validation.reasons[:5]), ok=validation.ok)
        details = {"windows": windows, "written": filled["written"], "failing_symbols": validation.failing_symbols}
        if not validation.ok:
            still = validation.failing_symbols
            missing = max((recovery.hours_between(w[2], w[3]) for w in validation.failing_windows()), default=0.0)
            return run.finish(ESCALATED, "escalated", summary=f"still failing after the backfill: {', '.join(still)} "
                              f"({'; '.join(validation.reasons[:3])})", impact=impact, root_cause=root_cause,
                              data_lost_hours=missing, **details)
        return run.finish(RESOLVED, RECOVERED, summary=f"backfilled {filled['total']} candles of "
                          f"{', '.join(failing_symbols) or 'no symbol'}; data checks pass",
                          impact=impact, root_cause=root_cause, data_lost_hours=0, **details)


# --- scenario 5: persistent failures, rollback ---


def _failure_count(run: Recovery) -> str:
    """How often the daemon failed in the window, from the store's service events and the incident log."""
    hours = run.cfg.persistent_window_hours
    crash_incidents = incidents.recent_count(run.log_store, "daemon-crash", hours)
    store = _sound_store(run.cfg)
    try:
        failures = health.failures_within(store, "backtest", hours) if store is not None else None
    except Exception:  # noqa: BLE001 (a damaged store only costs this detail of the report)
        failures = None
    finally:
        if store is not None:
            store.close()
    counted = f"{failures} crashes, kills or failed starts and " if failures is not None else ""
    return f"{counted}{crash_incidents} daemon-crash incident(s) in {hours:g} h"


@flow(
    name="rollback-persistent-failures",
    description="Runbook scenario 5 (3+ crashes in 24 h): stop everything, restore the 48 h backup (the current "
    "database quarantined), full validation, resume live trading only, backtest paused until a person resumes it, L3.",
    timeout_seconds=3 * 3600,
    on_failure=RECOVERY_FAILURE_HOOKS,
    on_crashed=RECOVERY_CRASH_HOOKS,
)
def rollback_persistent_failures(
    service: str = "backtest",
    event: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    handover: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Roll the store back to the 48 h backup with live trading resumed and the backtest paused; the summary."""
    cfg = run_settings(settings)
    blocker = _lock_blocker(cfg)
    if blocker is not None:
        return _absorbed_by_lock("persistent-failures", blocker)
    resource = resource_of(service)
    run = begin("persistent-failures", resource, event, cfg, handover)
    if run.joined:
        return run.result or {}
    owner = f"{LOCK_OWNERS['persistent-failures']} #{run.id}"
    with run.guard([STORE_RESOURCE, resource_of("backtest"), resource_of("trader")]):
        root_cause = f"Other: persistent failures of the backtest daemon ({_failure_count(run)})"
        marker = recovery.keep_stopped("backtest", cfg, by=owner,
                                       reason=f"rollback incident #{run.id}: persistent failures, under investigation")
        run.act("pause-backtest", f"{marker}: nothing restarts the backtest until `crypto-agent service resume backtest`")
        impact = "Backtest paused until a person resumes it; live trading interrupted during the rollback"
        run.live_trading_affected = True
        with _store_lock(run, owner):
            _stop_all(run, settings)
            restored = _restore_and_resync(run, settings, owner, f"rollback incident #{run.id}",
                                           cfg.rollback_hours, salvage=False)
            if restored["restored"]:
                full = check_store_integrity(settings, True)
                validation = check_data_quality(settings)
                run.act("validate", f"{_integrity_detail(full)}; data checks "
                        + ("pass" if validation.ok else "FAIL: " + "; ".join(validation.reasons[:3])),
                        ok=full.ok and validation.ok)
                if not validation.ok:
                    run.extra_levels["l2"] = "the rolled-back store fails validation: " + "; ".join(validation.reasons[:3])
        run.act("unlock", "released the store's lock")
        trader = _start_verified(run, settings, "trader")  # live trading only
        if not restored["restored"]:
            run.rollback_failed = True
            why = (f"rollback FAILED: no good backup from {cfg.rollback_hours:g} h ago or older ({restored['message']}); "
                   "the database was not touched, live trading "
                   + ("resumed" if trader else "NOT resumed") + ", the backtest stays paused")
            run.act("escalate", why, ok=False)
            return run.finish(ESCALATED, "escalated", summary=why, impact=impact, root_cause=root_cause)
        summary = (f"rolled back to {restored['backup_name']}; live trading "
                   + ("resumed (HEALTHY)" if trader else "paused") + "; backtest paused for investigation "
                   "(`crypto-agent service resume backtest`); rows newer than the backup are kept in "
                   f"{restored['quarantined']}")
        return run.finish(RESOLVED, RECOVERED, summary=summary, impact=impact, root_cause=root_cause,
                          data_lost_hours=restored["data_lost_hours"], backup=restored["backup"],
                          quarantined=restored["quarantined"])
