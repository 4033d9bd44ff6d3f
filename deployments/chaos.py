"""`crypto-agent chaos <scenario>`: rehearse an incident of the runbook on the running stack and follow its recovery.

A drill injects one failure into the stack `crypto-agent up` started (found through its home:
the settings, run/stack.json with the Prefect API the stack recorded, the pidfiles, the simulator's
/_sim/ fault API), then follows what the product does about it: the event and the automation that
detect it, the recovery flow run and its incident, and finally its own probe that everything is
back. It prints the timeline (injected, detected, recovered, verified) and where to see it in the
Prefect UI. Every wait is bounded; a drill that does not recover in time fails with what was
missing, and the command exits 1. `crypto-agent chaos all` runs every drill in turn, restoring a
clean state between them, and prints the MTTR of each against the runbook's ETA.

Where a scheduled check would find the fault, the drill runs that deployment now, as if its
schedule had fired (data-validation at 01:00, the hourly integrity-check, the health monitor every
5 minutes): the detection path is the product's, only the wait for the clock is skipped.

The faults (no Prefect) are crypto_agent/faults.py, the drills' table and the pure checks (is the
stack verified, which incident counts, the MTTR table) crypto_agent/chaos.py. The command itself is
registered by deployments/cli.py, which imports this module (and so Prefect) only when it runs.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

from crypto_agent import chaos, faults
from crypto_agent.chaos import DrillResult
from crypto_agent.errors import CryptoAgentError
from crypto_agent.faults import DAEMON, Injection
from crypto_agent.incidents import RESOLVED, Incident
from crypto_agent.settings import Settings
from deployments.chaos_stack import POLL_S, TERMINAL, ChaosFailed, StackRuns, StackTarget, find_stack, prefect_api
from flows.events import BACKTEST_DAEMON_RESOURCE as DAEMON_RESOURCE
from flows.events import INTEGRITY_DEPLOYMENT as INTEGRITY
from flows.events import MONITOR_DEPLOYMENT as MONITOR
from flows.events import PERSISTENT_FAILURES_AUTOMATION as PERSISTENT_FAILURES
from flows.events import STORE_RESOURCE
from flows.events import VALIDATION_DEPLOYMENT as VALIDATION

SETTLE_S = 180.0  # before a drill, the stack must be verified within this
VERIFY_S = 180.0  # after the recovery, the probe must verify it within this
DETECT_MARGIN_S = 90.0
RECOVER_MARGIN_S = 180.0
EXCHANGE_DOWN_S = 20.0  # the simulator answers 503 this long: the first recovery may find it down and escalate
STALE_POKE_S = 30.0  # the drill runs data-validation this often while the store is stale
STORM_429 = 3  # requests answered 429 (Retry-After 1 s) in the data-gap drill
CRASH_AFTER_STEPS = 2
EVENTS_SETTLE_S = 5.0  # an event's automation has started its flow run by then


# --- the drills ---


class DrillRunner(StackRuns):
    """Runs drills against one stack, printing as it goes; each drill returns its DrillResult."""

    def __init__(self, target: StackTarget, client: Any, say: Callable[[str], None],
                 max_wait_s: float | None = None) -> None:
        super().__init__(target, client)
        self.cfg = target.settings
        self.say = say
        self.max_wait_s = max_wait_s
        self.in_flight: UUID | None = None  # a check the drill ran that was still running at the detection

    # --- plumbing ---

    def limit(self, seconds: float) -> float:
        """A wait's bound, capped by --max-wait."""
        return seconds if self.max_wait_s is None else min(seconds, self.max_wait_s)

    def mark(self, result: DrillResult, phase: str, at: float, text: str) -> None:
        """One line of the timeline."""
        offset = result.after(at)
        line = f"  {chaos.clock(at)}  {phase:<9} {'' if offset is None else f'+{offset:.1f} s':>9}  {text}"
        result.lines.append(line)
        self.say(line)

    def note(self, text: str) -> None:
        """A line that is not a point of the timeline."""
        self.say(f"  {'':8}  {'':9} {'':>9}  {text}")

    # --- the phases of a drill ---

    def settle(self, result: DrillResult, paused: tuple[str, ...] = ()) -> None:
        """Before injecting: the stack must be verified (services healthy, checks pass, nothing open)."""
        deadline = time.monotonic() + self.limit(SETTLE_S)
        while True:
            check = chaos.verify(self.cfg, paused)
            if check.ok:
                return
            if time.monotonic() > deadline:
                raise ChaosFailed(f"the stack is not healthy before the drill: {'; '.join(check.problems)}",
                                  hint="`crypto-agent incidents --open` and `crypto-agent status` tell what is wrong")
            time.sleep(2.0)

    def since(self, result: DrillResult) -> float:
        """When the drill's first fault was injected (epoch s)."""
        assert result.injected_at is not None, "a drill waits only after its injection"
        return result.injected_at

    def injected(self, result: DrillResult, injection: Injection) -> None:
        """Record the injection (the first one sets the clock)."""
        if result.injected_at is None:
            result.injected_at = injection.at
        self.mark(result, "injected", injection.at, injection.what)

    def wait_incident(
        self,
        result: DrillResult,
        scenarios: tuple[str, ...],
        resource: str | None,
        since: float,
        timeout_s: float,
        *,
        poke: tuple[str, float] | None = None,
        first_poke_s: float = 0.0,
        missing: str = "",
    ) -> Incident:
        """Wait for the incident the fault should open; `poke` = (deployment, every_s) runs that check meanwhile,
        the first time after `first_poke_s`."""
        timeout_s = self.limit(timeout_s)
        deadline = time.monotonic() + timeout_s
        poked: UUID | None = None
        next_poke = time.monotonic() + first_poke_s
        while True:
            found = chaos.incidents_since(self.cfg, since, scenarios, resource)
            if found:
                self.in_flight = poked if poked is not None and self.flow_run_state(poked) not in TERMINAL else None
                return found[0]
            now = time.monotonic()
            if poke is not None and now >= next_poke and (poked is None or self.flow_run_state(poked) in TERMINAL):
                poked = self.run_deployment(poke[0])
                next_poke = now + poke[1]
            if now > deadline:
                raise ChaosFailed(
                    f"not detected within {timeout_s:.0f} s: no {'/'.join(scenarios)} incident "
                    f"was opened{' for ' + resource if resource else ''}" + (f"; {missing}" if missing else ""),
                    hint="`crypto-agent incidents` and the serving process's log (logs/serve.log) tell what ran",
                )
            time.sleep(POLL_S)

    def detected(self, result: DrillResult, inc: Incident) -> None:
        """Record the detection: the incident opened by the recovery the automation ran."""
        at = inc.opened_at / 1000
        again = result.detected_at is not None
        if not again:
            result.detected_at = at
            result.incident_id = inc.id
        result.incident_ids.append(inc.id)
        trigger = chaos.describe_trigger(self.cfg, inc, PERSISTENT_FAILURES)
        self.mark(result, "detected", at, f"{'again: ' if again else ''}incident #{inc.id} {inc.scenario} opened by "
                  f"{self.flow_run_label(inc.flow_run_id)}; trigger: {trigger}")

    def wait_closed(self, result: DrillResult, inc: Incident, timeout_s: float, *, final: bool = True,
                    escalation_ok: bool = False) -> Incident:
        """Wait until the incident closes; ChaosFailed unless it ends resolved and recovered (or, with escalation_ok,
        escalated: returned as it is)."""
        timeout_s = self.limit(timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            current = chaos.incident(self.cfg, inc.id)
            if not current.is_open:
                break
            if time.monotonic() > deadline:
                last = current.actions[-1] if current.actions else None
                raise ChaosFailed(
                    f"incident #{inc.id} ({inc.scenario}) not recovered within {timeout_s:.0f} s"
                    + (f"; its last step: {last['step']}: {str(last['detail']).splitlines()[0][:200]}" if last else ""),
                    hint=f"follow it in the UI: {self.target.flow_run_url(inc.flow_run_id or '')}",
                )
            time.sleep(POLL_S)
        at = (current.resolved_at or time.time() * 1000) / 1000
        if chaos.counts_as(current) != "recovered":
            time.sleep(2.0)  # the recovery tells the levels just after it closes the incident
            current = chaos.incident(self.cfg, inc.id)
            told = ", ".join(level.upper() for level in current.levels_told) or "nobody"
            self.mark(result, "closed", at, f"incident #{current.id} {current.status} ({current.outcome}; told "
                      f"{told}): {current.summary}")
            if chaos.counts_as(current, escalation_ok) == "escalated":
                return current
            raise ChaosFailed(f"incident #{current.id} ended {current.status} "
                              f"({current.outcome}): {current.summary}",
                              hint=f"its report: `crypto-agent incidents --report {current.id}`")
        if final:
            result.recovered_at = at
        self.mark(result, "recovered", at, f"incident #{current.id} resolved in "
                  f"{current.recovery_time_s or 0:.1f} s: {current.summary}")
        return current

    def wait_verified(self, result: DrillResult, paused: tuple[str, ...] = ()) -> None:
        """Probe until the stack is back (services, quick_check, data checks, nothing open); ChaosFailed otherwise."""
        timeout_s = self.limit(VERIFY_S)
        deadline = time.monotonic() + timeout_s
        while True:
            check = chaos.verify(self.cfg, paused)
            if check.ok:
                result.verified_at = time.time()
                self.mark(result, "verified", result.verified_at, check.summary)
                return
            if time.monotonic() > deadline:
                raise ChaosFailed(f"recovered, but not verified within {timeout_s:.0f} s: "
                                  f"{'; '.join(check.problems)}",
                                  hint="`crypto-agent status --service backtest` and `crypto-agent check-data`")
            time.sleep(2.0)

    def where(self, result: DrillResult) -> None:
        """Where the drill shows in the Prefect UI: the flow run and the report of each incident of its recovery."""
        if not result.incident_ids:
            return
        self.say("  see it in the UI:")
        for incident_id in result.incident_ids:
            inc = chaos.incident(self.cfg, incident_id)
            if inc.flow_run_id:
                self.say(f"    recovery flow run  {self.target.flow_run_url(inc.flow_run_id)}")
            self.say(f"    incident report    {self.target.artifact_url(f'incident-{inc.id}')}"
                     f"   (or `crypto-agent incidents --report {inc.id}`)")

    # --- the drills, one method each ---

    def run(self, name: str, *, resume_after: bool = False) -> DrillResult:
        """Run one drill; its result (error set, never raised, when it did not recover)."""
        d = chaos.drill(name)
        result = DrillResult(d)
        self.say(f"\n== chaos {d.name}: runbook scenario {d.runbook} ({d.title}, ETA {d.eta_min:g} min)")
        self.say(f"   fault: {d.fault}")
        self.say(f"   detection: {d.detection}")
        body = getattr(self, "drill_" + d.name.replace("-", "_"))
        try:
            body(result, resume_after=resume_after)
        except CryptoAgentError as exc:
            result.error = f"{d.name}: {exc.message}"
            self.say(f"  FAILED: {exc.message}")
            if exc.hint:
                self.say(f"  hint: {exc.hint}")
        self.where(result)
        if result.ok:
            self.say(f"  MTTR {result.mttr_s:.1f} s (runbook ETA {d.eta_min:g} min)")
        return result

    def drill_daemon_killed(self, result: DrillResult, **_: Any) -> None:
        """SIGKILL of the daemon: heartbeat-missing -> recover-daemon-crash restarts it."""
        self.settle(result)
        self.injected(result, faults.kill(self.cfg, DAEMON, signal.SIGKILL))
        inc = self.wait_incident(result, ("daemon-crash",), DAEMON_RESOURCE, self.since(result),
                                 self.cfg.heartbeat_missing_s + DETECT_MARGIN_S,
                                 missing="is the heartbeat relay running (logs/relay.log), and the automation "
                                 "crypto-agent/heartbeat-missing enabled (`prefect automation ls`)?")
        self.detected(result, inc)
        self.wait_closed(result, inc, self.cfg.crash_restart_grace_s + RECOVER_MARGIN_S)
        self.wait_verified(result)

    def drill_daemon_hung(self, result: DrillResult, **_: Any) -> None:
        """SIGSTOP of the daemon: heartbeat-missing -> recover-daemon-crash triages it hung -> recover-process-hang."""
        self.settle(result)
        try:
            self.injected(result, faults.stop(self.cfg, DAEMON))
            inc = self.wait_incident(result, ("daemon-crash", "process-hang"), DAEMON_RESOURCE, self.since(result),
                                     self.cfg.heartbeat_missing_s + DETECT_MARGIN_S,
                                     missing="is the heartbeat relay running (logs/relay.log)?")
            self.detected(result, inc)
            self.wait_closed(result, inc, self.cfg.stop_grace_s + RECOVER_MARGIN_S)
        except BaseException:  # a failed drill, or Ctrl-C: the fault must not outlive the drill
            if faults.continue_stopped(self.cfg, DAEMON):
                self.note("cleanup: the daemon was still stopped: SIGCONT sent")
            raise
        self.wait_verified(result)

    def drill_cpu_spike(self, result: DrillResult, **_: Any) -> None:
        """A CPU-burning daemon: health-monitor sees CPU over the limit for the spike window -> recover-process-hang."""
        self.settle(result)
        spike_s = self.cfg.cpu_spike_minutes * 60
        # each monitor run starts a Python process: a faster pace would starve the very CPU burner it measures
        every_s = max(10.0, min(60.0, spike_s / 3))
        try:
            self.injected(result, faults.burn_cpu(self.cfg))
            result.symptom_at = self.since(result) + spike_s
            self.note(f"running {MONITOR} every {every_s:g} s (a faster cron) until CPU over "
                      f"{self.cfg.cpu_max_pct:g}% has lasted {self.cfg.cpu_spike_minutes:g} min")
            inc = self.wait_incident(result, ("process-hang",), DAEMON_RESOURCE, self.since(result),
                                     spike_s + 2 * every_s + DETECT_MARGIN_S, poke=(MONITOR, every_s),
                                     missing=f"the monitor's samples (table probe_samples) must stay over "
                                     f"cpu_max_pct={self.cfg.cpu_max_pct:g} for cpu_spike_minutes="
                                     f"{self.cfg.cpu_spike_minutes:g}; a busy machine can keep a niced daemon under it")
            self.detected(result, inc)
            if self.in_flight is not None:
                # a monitor run still going may report the spike once more; its recovery comes and goes before
                # the stack counts as verified (it must find the restarted daemon healthy and do nothing)
                self.wait_flow_run(self.in_flight, MONITOR)
                time.sleep(EVENTS_SETTLE_S)
            self.wait_closed(result, inc, self.cfg.stop_grace_s + RECOVER_MARGIN_S)
        except BaseException:  # a failed drill, or Ctrl-C: the fault must not outlive the drill
            if faults.fault_of(self.cfg, DAEMON):
                self.note("cleanup: " + faults.restart_clean(self.cfg, DAEMON).what)
            raise
        self.wait_verified(result)

    def _stale_drill(self, result: DrillResult, inject: Callable[[], list[Injection]]) -> None:
        """Damage the store (and the exchange), run data-validation as its schedule would -> recover-stale-data."""
        faults.SimulatorControl.of(self.cfg)  # refused before anything is damaged when the exchange is not ours
        self.settle(result)
        try:
            for injection in inject():
                self.injected(result, injection)
            inc = self.wait_incident(result, ("stale-data",), STORE_RESOURCE, self.since(result), DETECT_MARGIN_S * 2,
                                     poke=(VALIDATION, STALE_POKE_S))
            self.detected(result, inc)
            deadline = time.monotonic() + self.limit(result.drill.eta_s)
            while True:
                inc = self.wait_closed(result, inc, deadline - time.monotonic(), escalation_ok=True)
                if inc.status == RESOLVED:
                    break
                # An exchange still down when the recovery looks is the runbook's cue to tell L2, not to wait;
                # the data stays stale, so the next check (the monitor every 5 minutes, or here the drill's
                # next data-validation) starts the recovery again.
                inc = self.wait_incident(result, ("stale-data",), STORE_RESOURCE, (inc.resolved_at or 0) / 1000,
                                         deadline - time.monotonic(), poke=(VALIDATION, STALE_POKE_S),
                                         first_poke_s=STALE_POKE_S)
                self.detected(result, inc)
        finally:
            faults.clear_exchange(self.cfg)
        self.wait_verified(result)

    def drill_exchange_down(self, result: DrillResult, **_: Any) -> None:
        """The exchange answers 503 for a while, the newest candles are missing: the recovery rides out the outage."""
        self._stale_drill(result, lambda: [
            faults.exchange(self.cfg, "down", for_s=EXCHANGE_DOWN_S),
            faults.delete_candles(self.cfg, chaos.stale_symbols(self.cfg), self.cfg.stale_h1_hours + 2,
                                  timeframes=("1h",)),
        ])

    def drill_data_gap(self, result: DrillResult, **_: Any) -> None:
        """A hole in the candles and a throttling exchange: the recovery backfills exactly the hole."""
        self._stale_drill(result, lambda: [
            faults.gap(self.cfg, chaos.gap_symbol(self.cfg), self.cfg.max_gap_candles + 2,
                       self.cfg.continuity_window_hours / 2),
            faults.exchange(self.cfg, "429", count=STORM_429, retry_after_s=1),
        ])

    def drill_db_corrupt(self, result: DrillResult, **_: Any) -> None:
        """A damaged page: the hourly integrity-check (run now) -> recover-db-corruption restores a good backup."""
        self.settle(result)
        ready = chaos.ensure_backup(self.cfg)
        self.note(f"backup: {ready.note}")
        self.injected(result, faults.corrupt_pages(self.cfg))
        inc = self.wait_incident(result, ("db-corruption",), STORE_RESOURCE, self.since(result), DETECT_MARGIN_S * 2,
                                 poke=(INTEGRITY, 60.0))
        self.detected(result, inc)
        self.wait_closed(result, inc, result.drill.eta_s)
        self.wait_verified(result)

    def rearm_rollback(self) -> None:
        """Start the crash count from zero: report the crashes of earlier drills, then re-apply the automations.

        The threshold trigger counts crash events in a 24 h window, and once it fired it ignores the
        rest of that window; re-applying the automation gives it a fresh trigger, hence a fresh window.
        """
        from deployments.automations import apply_automations

        state = self.wait_flow_run(self.run_deployment(MONITOR), MONITOR)
        self.note(f"{MONITOR} run to report the crashes of earlier drills: {state.lower()}")
        time.sleep(EVENTS_SETTLE_S)  # the server evaluates those events before the trigger is replaced
        done = apply_automations(self.cfg, self.target.project_dir)
        if PERSISTENT_FAILURES not in done.updated + done.created:
            raise ChaosFailed(f"the automation {PERSISTENT_FAILURES} is not on the stack's server",
                              hint="`crypto-agent up` (or `crypto-agent deploy`) creates it")
        self.note(f"automation {PERSISTENT_FAILURES} re-applied: its crash count starts from zero")

    def approve_gate(self, result: DrillResult, inc: Any, timeout_s: float = 120.0) -> None:
        """The rollback waits at its gate for a person: the drill is that person (`Resume` with the form in the UI)."""
        from prefect.flow_runs import resume_flow_run

        if not inc.flow_run_id:
            raise ChaosFailed(f"incident #{inc.id} has no flow run to approve", hint="see `crypto-agent incidents`")
        deadline = time.monotonic() + self.limit(timeout_s)
        while True:
            run = self.client.read_flow_run(UUID(inc.flow_run_id))
            if run.state is not None and run.state.is_paused():
                break
            if run.state is not None and run.state.is_final():
                self.note(f"the rollback ended {run.state.name} before its gate (nothing to approve)")
                return
            if time.monotonic() > deadline:
                raise ChaosFailed(f"the rollback of incident #{inc.id} did not reach its approval gate in "
                                  f"{timeout_s:g} s", hint=f"look at flow run {inc.flow_run_id} in the UI")
            time.sleep(0.5)
        resume_flow_run(run.id, run_input={"approve": True, "by": "crypto-agent chaos",
                                           "note": "a rehearsal: the drill approves its own rollback"})
        self.mark(result, "approved", time.time(), f"approved the rollback's gate (flow run {run.id})")

    def drill_crash_loop(self, result: DrillResult, *, resume_after: bool = False, **_: Any) -> None:
        """Three crashes in a row, each recovered; the threshold automation then rolls the store back 48 h."""
        self.settle(result)
        ready = chaos.ensure_backup(self.cfg, self.cfg.rollback_hours)
        self.note(f"backup: {ready.note}")
        self.rearm_rollback()
        self.settle(result)
        crashes = self.cfg.persistent_failures
        for n in range(1, crashes + 1):
            injection = faults.crash_after(self.cfg, CRASH_AFTER_STEPS)
            self.injected(result, Injection(injection.at, f"crash {n} of {crashes}: {injection.what}", injection.pid))
            result.symptom_at = injection.at  # the runbook's symptom: the third crash in a row
            inc = self.wait_incident(result, ("daemon-crash",), DAEMON_RESOURCE, injection.at,
                                     self.cfg.heartbeat_missing_s + DETECT_MARGIN_S,
                                     missing="is the heartbeat relay running (logs/relay.log)?")
            self.mark(result, "detected", inc.opened_at / 1000, f"crash {n}: incident #{inc.id} {inc.scenario} "
                      f"opened by {self.flow_run_label(inc.flow_run_id)}")
            self.wait_closed(result, inc, self.cfg.crash_restart_grace_s + RECOVER_MARGIN_S, final=False)
            if n < crashes:
                # the monitor reports each crash as an event, as its schedule would (it keeps the count honest)
                self.wait_flow_run(self.run_deployment(MONITOR), MONITOR)
        inc = self.wait_incident(result, ("persistent-failures",), None, self.since(result), DETECT_MARGIN_S,
                                 poke=(MONITOR, 30.0),
                                 missing=f"health-monitor reports the crashes (crypto-agent.service.crashed); the "
                                 f"automation {PERSISTENT_FAILURES} needs {crashes} of them")
        self.detected(result, inc)
        self.approve_gate(result, inc)
        self.wait_closed(result, inc, result.drill.eta_s)
        self.wait_verified(result, paused=(DAEMON,))
        self.note("the backtest stays paused after a rollback, for a person to investigate; resume it with: "
                  "crypto-agent service resume backtest")
        if resume_after:
            self.note("resumed, as `chaos all` leaves the stack as it found it: "
                      + chaos.resume_service(self.cfg, DAEMON))


def run_drills(names: list[str], settings: Settings, *, max_wait_s: float | None = None,
               say: Callable[[str], None] = print) -> list[DrillResult]:
    """Run the drills `names` in turn against the running stack; their results (and the MTTR table, for several)."""
    target = find_stack(settings)
    say(f"stack: Prefect UI {target.ui_url}, store {settings.db_path}")
    results = []
    with prefect_api(target) as client:
        runner = DrillRunner(target, client, say, max_wait_s)
        several = len(names) > 1
        for name in names:
            # several drills leave the stack as they found it: the backtest a rollback paused is resumed
            results.append(runner.run(name, resume_after=several))
            if several and not results[-1].ok and name == "crash-loop":
                say("  cleanup: " + chaos.resume_service(settings, DAEMON))
    if len(results) > 1:
        say("\n== MTTR per scenario (from the fault, or the runbook's symptom, to verified recovery) "
            "against the runbook's ETA")
        for line in chaos.mttr_table(results):
            say(line)
    return results
