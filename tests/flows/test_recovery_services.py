"""recover-daemon-crash and recover-process-hang with real services really signalled: SIGKILL, SIGSTOP,
a CPU-burning daemon, a daemon hung past SIGTERM, a pidfile naming a stranger, two recoveries at once."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
from flow_kit import artifacts_of, flow_run_events, wait_for_messages
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Crashed
from recovery_kit import (
    FAST_SERVICES,
    Keeper,
    Make,
    action,
    all_incidents,
    crash_loop,
    died_of_the_store,
    event,
    incident_of,
    kill_and_wait,
    messages,
    running_pid,
    settings_of,
    steps,
    stop_services,
    wait_until,
)
from service_kit import keeper  # noqa: F401 (the fixture, one for every test module)

from crypto_agent import health, incidents, process
from crypto_agent.daemon import FAULT_ENV
from crypto_agent.receiver import Receiver
from crypto_agent.service import Heartbeat, read_heartbeat
from crypto_agent.settings import Settings
from crypto_agent.store import Store
from flows.events import INCIDENT_OPENED, INCIDENT_RESOLVED, RECOVERY_OVER_BUDGET
from flows.recovery import (
    close_incidents_of_run,
    recover_daemon_crash,
    recover_process_hang,
)

DAEMON = "crypto-agent.service.backtest-daemon"


@pytest.fixture
def env(settings_for: Make) -> Iterator[dict[str, Any]]:
    """Settings overrides of a tmp home with fast service limits; whatever a recovery started is stopped after."""
    overrides = settings_for(**FAST_SERVICES)
    yield overrides
    stop_services(settings_of(overrides))


def start(keeper: Keeper, cfg: Settings, service: str = "backtest", **env: str) -> int:
    return keeper.start(process.service_spec(service, cfg), cfg, env=env or None).pid


def healthy(cfg: Settings, service: str = "backtest") -> health.ProbeReport:
    report = health.probe(process.service_spec(service, cfg), cfg)
    assert report.healthy, report.summary
    return report


class TestDaemonCrash:
    def test_a_killed_daemon_is_restarted_healthy_and_l1_hears_of_the_open_and_the_close(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        overrides = {**env, "crash_restart_grace_s": 300.0}  # deprecated: the backoff's cap, no fixed hold
        cfg = settings_of(overrides)
        old = start(keeper, cfg)
        kill_and_wait(old)
        started = time.monotonic()
        result = recover_daemon_crash(settings=overrides, event=event("crypto-agent.service.dead", DAEMON))

        assert result["outcome"] == "recovered", result
        assert time.monotonic() - started < 60  # the first crash is restarted at once, not after 300 s
        inc = incident_of(cfg, result)
        assert inc.status == "resolved" and inc.scenario == "daemon-crash" and inc.resource == DAEMON
        assert steps(inc) == ["probe", "log-errors", "restart-policy", "integrity-check", "clean-state", "start",
                              "confirm-healthy"]
        assert action(inc, "restart-policy")["detail"] == "restart at once: first crash"
        assert "quick_check: ok" in action(inc, "integrity-check")["detail"]
        assert inc.root_cause.startswith("Other: backtest died without logging an error")
        assert inc.data_lost_hours == 0 and inc.recovery_time_s is not None and inc.detection_delay_s is not None
        new = running_pid(cfg, "backtest")
        assert new not in (None, old) and healthy(cfg).pid == new
        l1 = wait_for_messages(inbox, "/l1", 2)
        assert [m["body"]["subject"].split(":")[0] for m in l1] == [
            f"[crypto-agent] incident #{inc.id} opened", f"[crypto-agent] incident #{inc.id} resolved"]
        closing = l1[1]["body"]["body"]
        assert "What happened: Other: backtest died without logging an error" in closing
        assert "What was done:" in closing and "- start: started backtest" in closing
        assert f"backtest: running, PID {new}" in closing and "Data lost: 0 hours" in closing
        assert "Flow run:" in closing
        assert messages(inbox, "l2") == [] and messages(inbox, "l3") == []
        [report] = artifacts_of(inc.flow_run_id, f"incident-{inc.id}")
        assert report.startswith(f"# Incident Report #{inc.id}: scenario 1: Daemon crashed")
        assert "[x] Automated" in report and "Recovery time:" in report
        assert flow_run_events(inc.flow_run_id, INCIDENT_OPENED)
        [resolved] = flow_run_events(inc.flow_run_id, INCIDENT_RESOLVED)
        assert resolved.payload["incident_id"] == inc.id and resolved.payload["outcome"] == "recovered"
        assert inc.levels_told == ["l1"]

    def test_a_crash_again_soon_after_its_recovery_pages_l1_once_not_twice(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        kill_and_wait(start(keeper, cfg))
        first = recover_daemon_crash(settings=env, event=event("crypto-agent.service.dead", DAEMON))
        kill_and_wait(running_pid(cfg, "backtest"))
        second = recover_daemon_crash(settings=env, event=event("crypto-agent.service.dead", DAEMON))
        assert first["outcome"] == second["outcome"] == "recovered", (first, second)
        grouped = incident_of(cfg, second)
        assert f"the same signal as incident #{first['incident_id']}" in action(grouped, "page-grouped")["detail"]
        l1 = [m["body"]["subject"].split(":")[0] for m in wait_for_messages(inbox, "/l1", 3)]
        assert l1 == [f"[crypto-agent] incident #{first['incident_id']} opened",
                      f"[crypto-agent] incident #{first['incident_id']} resolved",
                      f"[crypto-agent] incident #{grouped.id} resolved (again, after incident #{first['incident_id']})"]
        assert grouped.levels_told == ["l1"] and grouped.first_paged_at is not None  # its one page counts for MTTA

        # with no group window every incident's opening pages again
        kill_and_wait(running_pid(cfg, "backtest"))
        third = recover_daemon_crash(settings={**env, "page_group_window_s": 0},
                                     event=event("crypto-agent.service.dead", DAEMON))
        assert not [a for a in incident_of(cfg, third).actions if a["step"] == "page-grouped"]
        subjects = [m["body"]["subject"] for m in wait_for_messages(inbox, "/l1", 5)]
        assert f"[crypto-agent] incident #{third['incident_id']} opened" in subjects[3], subjects

    def test_a_late_report_of_a_crash_already_recovered_opens_no_incident_and_pages_nobody(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        old = start(keeper, cfg)
        kill_and_wait(old)
        late = event("crypto-agent.service.heartbeat-missing", DAEMON)  # detected now, delivered late
        time.sleep(1.1)
        new = start(keeper, cfg)  # another recovery restarted it meanwhile
        healthy(cfg)
        result = recover_daemon_crash(settings=env, event=late)
        assert result["outcome"] == "absorbed" and result["incident_id"] is None
        assert result["absorbed_by"].startswith(f"a late report of a crash already recovered: PID {new} is HEALTHY")
        assert all_incidents(cfg) == [] and running_pid(cfg, "backtest") == new
        assert wait_for_messages(inbox, "/l1", timeout_s=3) == []

    def test_a_recovery_past_its_budget_is_itself_an_incident_told_to_l2_once_and_still_recovers(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        kill_and_wait(start(keeper, cfg))
        # detected 150 s ago: the runbook's 2 minutes for a daemon crash are gone before the recovery begins
        detected = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 150))
        result = recover_daemon_crash(settings=env, event=event("crypto-agent.service.dead", DAEMON,
                                                                detected_at=detected))
        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        [over] = [a for a in inc.actions if a["step"] == "over-budget"]
        assert re.fullmatch(r"the recovery has run 2\.\d min since the detection, past the runbook's ETA of 2 min; "
                            r"it goes on", over["detail"]), over["detail"]
        [page] = [m for m in messages(inbox, "l2") if "over budget" in m["subject"]]
        assert page["subject"].startswith(f"[crypto-agent] incident #{inc.id} over budget: ")
        assert "it goes on" in page["body"] and "l2" in inc.levels_told
        [emitted] = flow_run_events(inc.flow_run_id, RECOVERY_OVER_BUDGET)
        assert emitted.payload["incident_id"] == inc.id and emitted.resource.id == f"crypto-agent.incident.{inc.id}"

    def test_a_crash_loop_backs_off_and_a_healthy_stretch_resets_it(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        overrides = {**env, "restart_backoff_base_s": 2.0, "restart_backoff_cap_s": 30.0}
        cfg = settings_of(overrides)
        crash_loop(keeper, cfg)
        started = time.monotonic()
        result = recover_daemon_crash(settings=overrides, event=event("crypto-agent.service.dead", DAEMON))

        assert result["outcome"] == "recovered", result
        assert time.monotonic() - started >= 2.0
        inc = incident_of(cfg, result)
        assert steps(inc)[:5] == ["probe", "log-errors", "restart-policy", "probe", "integrity-check"]
        policy = action(inc, "restart-policy")["detail"]
        assert policy.startswith("backoff 2 s: 2nd crash within 10 min of a start"), policy
        assert action(inc, "probe")["detail"].startswith("after the backoff:")
        healthy(cfg)
        # the same loop with a 10 min reset counted as over: the next crash is restarted at once again
        kill_and_wait(running_pid(cfg, "backtest") or 0)
        again = recover_daemon_crash(settings={**overrides, "restart_backoff_reset_s": 0.5})
        assert again["outcome"] == "recovered", again
        assert action(incident_of(cfg, again), "restart-policy")["detail"].startswith("restart at once: first crash")
        healthy(cfg)

    def test_a_daemon_that_died_of_a_sound_store_is_checked_then_restarted(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        Store(cfg.database_url).close()  # a sound store: the log's "malformed" is not confirmed
        kill_and_wait(start(keeper, cfg))
        died_of_the_store(cfg)
        result = recover_daemon_crash(settings=env, event=event("crypto-agent.service.dead", DAEMON))

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert next(a["detail"] for a in inc.actions if a["step"] == "restart-policy").startswith(
            "corruption recovery at once, whatever the backoff: the service died of the store")
        assert "integrity_check says ok" in action(inc, "store-sound")["detail"]
        assert steps(inc)[-3:] == ["clean-state", "start", "confirm-healthy"]
        [store_incident] = [i for i in all_incidents(cfg) if i.scenario == "db-corruption"]
        assert store_incident.outcome == "skipped"
        healthy(cfg)

    def test_a_crashing_daemon_gets_its_log_errors_attached(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        old = start(keeper, cfg, **{FAULT_ENV: "crash-after:2"})
        wait_until(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE,
                   30, "the injected crash")
        result = recover_daemon_crash(settings=env)
        inc = incident_of(cfg, result)
        assert result["outcome"] == "recovered"
        assert "crashing now" in action(inc, "log-errors")["detail"]
        assert "crashing now" in inc.root_cause and not inc.automated  # a manual run: no event
        healthy(cfg)

    def test_a_stopped_daemon_is_handed_to_the_hang_recovery_which_captures_its_stacks(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        old = start(keeper, cfg)
        os.kill(old, signal.SIGSTOP)
        result = recover_daemon_crash(settings=env, event=event("crypto-agent.service.heartbeat-missing", DAEMON))

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert inc.scenario == "daemon-crash" and inc.status == "resolved"
        assert [s for s in steps(inc) if s in ("triage", "handover", "continue", "capture-stacks", "stop", "start",
                                               "confirm-healthy", "handed-back")] == [
            "triage", "handover", "continue", "capture-stacks", "stop", "start", "confirm-healthy", "handed-back"]
        stacks = action(inc, "capture-stacks")["detail"]
        assert "backtest_stacks_" in stacks and "File " in stacks  # faulthandler's frames
        assert "gracefully (SIGTERM)" in action(inc, "stop")["detail"]
        assert inc.root_cause.startswith("Process hang:") and "stopped" in inc.root_cause
        assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE
        assert healthy(cfg).pid != old
        assert len(all_incidents(cfg)) == 1  # the handover worked in the same incident
        assert len(wait_for_messages(inbox, "/l1", 2)) == 2

    def test_a_pidfile_naming_a_stranger_is_refused_and_the_stranger_survives(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        stranger = keeper.sleeper()
        spec = process.service_spec("backtest", cfg)
        spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
        spec.pidfile.write_text(f"{stranger.pid}\n")
        with incidents.open_incident_store(cfg) as log:  # two crashes earlier today: this is the third
            for _ in range(2):
                old, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, time.time() - 600)
                incidents.resolve(log, old.id, summary="restarted")
        result = recover_daemon_crash(settings=env, event=event("crypto-agent.service.dead", DAEMON))

        assert result["outcome"] == "recovered", result
        assert stranger.poll() is None and psutil.Process(stranger.pid).is_running()
        inc = incident_of(cfg, result)
        refused = action(inc, "refused")
        assert str(stranger.pid) in refused["detail"] and "left alone" in refused["detail"]
        assert healthy(cfg).pid != stranger.pid
        [l2] = wait_for_messages(inbox, "/l2", 1)
        assert "happened 3 times" in l2["body"]["body"] and sorted(inc.levels_told) == ["l1", "l2"]

    def test_a_crashed_trader_is_live_trading_affected_and_l3_is_paged(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        kill_and_wait(start(keeper, cfg, "trader"))
        result = recover_daemon_crash(service="trader", settings=env)
        inc = incident_of(cfg, result)
        assert result["outcome"] == "recovered" and inc.resource == "crypto-agent.service.trader"
        assert inc.impact == "Live trading down"
        [l3] = wait_for_messages(inbox, "/l3", 1)
        assert "live trading was affected" in l3["body"]["body"] and "# Incident Report" in l3["body"]["body"]
        # the runbook's cells for live trading: L2 pages the on-call lead, the war room hears what L3 hears
        [l2] = wait_for_messages(inbox, "/l2", 1)
        assert "live trading was affected: page the on-call lead" in l2["body"]["body"]
        head = l3["body"]["body"].splitlines()[:4]  # short first: what, where, state, link
        assert [line.split(":", 1)[0] for line in head] == ["What", "Where", "State", "Link"], head
        assert head[1] == "Where: crypto-agent.service.trader", head
        assert "/runs/flow-run/" in head[3] or "no PREFECT_UI_URL" in head[3], head
        [war] = wait_for_messages(inbox, "/war-room", 1)
        assert war["body"]["subject"] == l3["body"]["subject"] and "war room" in war["body"]["body"]
        assert action(incident_of(cfg, result), "notify-war-room")["ok"]
        healthy(cfg, "trader")

    def test_two_recoveries_at_once_one_recovers_and_the_other_is_absorbed(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        overrides = {**env, "restart_backoff_base_s": 4.0, "restart_backoff_cap_s": 30.0}
        cfg = settings_of(overrides)
        crash_loop(keeper, cfg)  # the first recovery backs its restart off a few seconds
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(recover_daemon_crash, settings=overrides,
                                event=event("crypto-agent.service.dead", DAEMON))
            wait_until(lambda: any(i.is_open for i in all_incidents(cfg)), 60, "the first incident")
            second = pool.submit(recover_daemon_crash, settings=overrides,
                                 event=event("crypto-agent.service.heartbeat-missing", DAEMON))
            results = [first.result(timeout=300), second.result(timeout=300)]
        assert sorted(r["outcome"] for r in results) == ["absorbed", "recovered"]
        assert results[0]["incident_id"] == results[1]["incident_id"]
        [inc] = all_incidents(cfg)
        assert inc.events_absorbed == 1 and steps(inc).count("start") == 1 and "absorbed" in steps(inc)
        ours = [p for p in psutil.process_iter(["cmdline", "environ"])
                if "crypto_agent.daemon" in (p.info["cmdline"] or [])
                and (p.info["environ"] or {}).get("CRYPTO_AGENT_HOME") == str(cfg.home)]
        assert [p.pid for p in ours] == [running_pid(cfg, "backtest")]
        with get_client(sync_client=True) as client:  # and the Prefect concurrency limit of the resource exists
            assert client.read_global_concurrency_limit_by_name(f"recovery-{DAEMON}").limit == 1

    def test_a_restart_that_fails_closes_the_incident_as_failed_and_tells_l2(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        overrides = {**env, "start_timeout_s": 0.05}  # no service writes its first heartbeat that fast
        cfg = settings_of(overrides)
        kill_and_wait(start(keeper, settings_of(env)))
        state = recover_daemon_crash(settings=overrides, return_state=True)

        assert state.is_failed()
        [inc] = all_incidents(cfg)
        assert inc.status == "failed" and inc.summary.startswith("the recovery failed: the backtest service wrote no")
        assert inc.report_md and "**Status:** failed (failed)" in inc.report_md
        [l2] = wait_for_messages(inbox, "/l2", 1)
        assert "the recovery did not succeed" in l2["body"]["body"]
        l1 = [m["body"]["subject"] for m in wait_for_messages(inbox, "/l1", 3)]
        assert any("closed: recovery FAILED" in s for s in l1)  # the incident's close
        assert any(s == "[crypto-agent] recover-daemon-crash failed" for s in l1)  # the flow's failure hook
        assert running_pid(cfg, "backtest") is None

    def test_the_failure_hook_closes_what_a_dead_flow_run_left_open(self, env: dict[str, Any]) -> None:
        cfg = settings_of(env)
        run_id = uuid.uuid4()
        with incidents.open_incident_store(cfg) as log:
            left, _ = incidents.open_or_join(log, "daemon-crash", DAEMON, {}, time.time(), flow_run_id=str(run_id))
            other, _ = incidents.open_or_join(log, "stale-data", "crypto-agent.store.main", {}, time.time())
        flow_run = FlowRun(id=run_id, flow_id=uuid.uuid4(), name="dead-run", parameters={"settings": env})
        close_incidents_of_run(recover_daemon_crash, flow_run, Crashed(message="the worker was killed"))
        with incidents.open_incident_store(cfg) as log:
            assert incidents.get(log, left.id).status == "failed"
            assert "Crashed" in incidents.get(log, left.id).summary
            assert incidents.get(log, other.id).is_open  # another run's incident is not touched


class TestProcessHang:
    def test_a_stop_that_would_hit_a_stranger_is_refused_and_the_stranger_survives(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        cfg = settings_of(env)
        stranger = keeper.sleeper()
        spec = process.service_spec("trader", cfg)
        spec.pidfile.parent.mkdir(parents=True, exist_ok=True)
        spec.pidfile.write_text(f"{stranger.pid}\n")
        result = recover_process_hang(service="trader", settings=env, event=event(
            "crypto-agent.service.cpu-high", "crypto-agent.service.trader"))

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        refused = action(inc, "stop-refused")
        assert f"refusing to signal PID {stranger.pid}" in refused["detail"] and not refused["ok"]
        assert stranger.poll() is None
        assert healthy(cfg, "trader").pid != stranger.pid

    def test_a_cpu_burning_daemon_is_restarted_without_its_fault(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(FAULT_ENV, "burn-cpu")  # even the recovery's own environment carries the fault
        cfg = settings_of(env)
        old = start(keeper, cfg)
        spec = process.service_spec("backtest", cfg)
        wait_until(lambda: "burn-cpu" in (read_heartbeat(spec.heartbeat) or Heartbeat(0, "", None)).state, 30,
                   "the burn")
        result = recover_process_hang(settings=env, event=event("crypto-agent.service.cpu-high", DAEMON))

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        assert inc.scenario == "process-hang" and inc.root_cause.startswith("Process hang: ")
        assert "CPU" in inc.root_cause or "cpu-high" in inc.root_cause
        assert steps(inc)[:4] == ["probe", "capture-stacks", "stop", "clean-state"]
        new = healthy(cfg)
        assert new.pid != old and new.cpu_pct < 90 and "burn-cpu" not in new.heartbeat_state
        assert psutil.Process(new.pid).environ().get(FAULT_ENV) == ""
        [stacks] = artifacts_of(inc.flow_run_id, f"incident-{inc.id}-stacks")
        assert "_burn_cpu" in stacks

    def test_a_daemon_hung_past_sigterm_is_killed_then_restarted(
        self, env: dict[str, Any], keeper: Keeper, inbox: Receiver
    ) -> None:
        overrides = {**env, "heartbeat_max_age_s": 2.0, "stop_grace_s": 30.0, "hung_stop_grace_s": 1.5}
        cfg = settings_of(overrides)
        old = start(keeper, cfg, **{FAULT_ENV: "hang-after:2"})
        spec = process.service_spec("backtest", cfg)
        wait_until(lambda: not health.probe(spec, cfg).healthy, 30, "the hang to show")
        result = recover_process_hang(settings=overrides, event=event("crypto-agent.service.hung", DAEMON))

        assert result["outcome"] == "recovered", result
        inc = incident_of(cfg, result)
        stacks = action(inc, "capture-stacks")["detail"]
        assert 'daemon.py", line' in stacks and " in step" in stacks  # where the injected hang sleeps
        # silent past the heartbeat limit: the short hung_stop_grace_s, not the whole stop_grace_s
        assert "by force (SIGKILL after 1.5 s of SIGTERM)" in action(inc, "stop")["detail"]
        assert inc.root_cause.startswith("Process hang: Heartbeat stale")
        assert healthy(cfg).pid != old

    def test_a_healthy_service_is_left_alone(self, env: dict[str, Any], keeper: Keeper, inbox: Receiver) -> None:
        cfg = settings_of(env)
        pid = start(keeper, cfg)
        result = recover_process_hang(settings=env)
        inc = incident_of(cfg, result)
        assert result["outcome"] == "skipped" and inc.status == "resolved" and steps(inc) == ["probe"]
        assert running_pid(cfg, "backtest") == pid

    def test_an_unknown_service_is_refused_before_any_incident(self, env: dict[str, Any]) -> None:
        with pytest.raises(Exception, match="unknown service 'ghost'"):
            recover_process_hang(service="ghost", settings=env)
        assert all_incidents(settings_of(env)) == []
