"""The automations of deployments/automations.py against the session's Prefect test server (created and
updated by name, never duplicated), the triggers of prefect.yaml, what deployments/serve.py serves,
and when the monitoring deployments fire."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import get_client
from prefect.automations import AutomationCore, EventTrigger, Posture
from prefect.events.actions import DoNothing
from prefect.server.schemas.schedules import CronSchedule

from crypto_agent.receiver import Receiver
from crypto_agent.settings import load_settings
from deployments.automations import (
    DEAD_MANS_SWITCHES,
    EVENT_PARAMETER,
    HEARTBEAT_MISSING,
    HEARTBEAT_STALE,
    PREFIX,
    apply_automations,
    escalation_block_id,
    monitor_interval,
)
from deployments.serve import read_entries, to_runner_deployment
from flows.events import (
    MONITOR_RESOURCE,
    MONITOR_TICK,
    RELAY_RESOURCE,
    SERVE_RESOURCE,
    SERVICE_CRASHED,
    SERVICE_DEAD,
    SERVICE_HEARTBEAT,
    SERVICE_HUNG,
    SERVICE_MEMORY_HIGH,
    STORE_CORRUPT,
    STORE_STALE,
)

PROJECT_DIR = Path(__file__).resolve().parents[2]
CONFIG = yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())
START = datetime(2026, 1, 1, tzinfo=UTC)


def ours() -> dict[str, list[Any]]:
    with get_client(sync_client=True) as client:
        found: dict[str, list[Any]] = {}
        for automation in client.read_automations():
            if automation.name.startswith(PREFIX):
                found.setdefault(automation.name, []).append(automation)
    return found


@pytest.fixture(scope="module", autouse=True)
def no_automation_outlives_the_module() -> Any:
    """Ours are deleted at the end: a dead man's switch left on the session's server would page L2 (the
    session's receiver) at random moments of later tests, which then count one L2 message too many."""
    yield
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if automation.name.startswith(PREFIX):
                client.delete_automation(automation.id)


@pytest.fixture(scope="module")
def recovery_deployments() -> dict[str, Any]:
    """The recovery deployments on the test server, as the serving process creates them (with their triggers)."""
    entries = {e.full_name: e for e in read_entries(PROJECT_DIR)}
    ids = {}
    for name in ("recover-daemon-crash/auto", "rollback-persistent-failures/auto", "recover-process-hang/auto"):
        ids[name] = to_runner_deployment(entries[name]).apply()
    return ids


class TestApplyAutomations:
    def test_created_once_then_updated_by_name_and_never_duplicated(
        self, recovery_deployments: dict[str, Any], receiver: Receiver
    ) -> None:
        settings = load_settings(receiver_url=receiver.url)
        first = apply_automations(settings, PROJECT_DIR)
        assert first.skipped == []
        assert set(first.created) | set(first.updated) == {
            f"{PREFIX}heartbeat-missing", f"{PREFIX}heartbeat-stale", f"{PREFIX}persistent-failures",
            *DEAD_MANS_SWITCHES,
        }
        ids = {name: [a.id for a in group] for name, group in ours().items()}
        assert all(len(group) == 1 for group in ids.values())

        again = apply_automations(load_settings(receiver_url=receiver.url, heartbeat_missing_s=20.0), PROJECT_DIR)
        assert again.created == [] and sorted(again.updated) == sorted(ids)
        now = ours()
        assert {name: [a.id for a in group] for name, group in now.items()} == ids  # the same automations
        [missing] = now[f"{PREFIX}heartbeat-missing"]
        assert missing.trigger.within == timedelta(seconds=20)  # updated in place

    def test_a_planned_stop_pauses_the_dead_mans_switches_and_the_next_apply_arms_them_again(
        self, recovery_deployments: dict[str, Any], receiver: Receiver
    ) -> None:
        from deployments.automations import pause_dead_mans_switches

        settings = load_settings(receiver_url=receiver.url)
        apply_automations(settings, PROJECT_DIR)
        assert sorted(pause_dead_mans_switches()) == sorted(DEAD_MANS_SWITCHES)
        assert all(not a.enabled for name in DEAD_MANS_SWITCHES for a in ours()[name])
        assert all(a.enabled for name, group in ours().items() if name not in DEAD_MANS_SWITCHES for a in group)
        assert pause_dead_mans_switches() == []  # already paused
        apply_automations(settings, PROJECT_DIR)
        assert all(a.enabled for name in DEAD_MANS_SWITCHES for a in ours()[name])

    def test_the_heartbeat_stale_automation_goes_when_the_missing_one_covers_the_limit(
        self, recovery_deployments: dict[str, Any], receiver: Receiver
    ) -> None:
        apply_automations(load_settings(receiver_url=receiver.url), PROJECT_DIR)
        assert f"{PREFIX}heartbeat-stale" in ours()
        done = apply_automations(load_settings(receiver_url=receiver.url, heartbeat_max_age_s=15.0), PROJECT_DIR)
        assert done.deleted == [f"{PREFIX}heartbeat-stale"] and f"{PREFIX}heartbeat-stale" not in ours()
        apply_automations(load_settings(receiver_url=receiver.url), PROJECT_DIR)

    def test_duplicates_and_stale_automations_of_ours_are_deleted_and_others_left_alone(
        self, recovery_deployments: dict[str, Any], receiver: Receiver
    ) -> None:
        settings = load_settings(receiver_url=receiver.url)
        apply_automations(settings, PROJECT_DIR)

        def make(name: str) -> Any:
            with get_client(sync_client=True) as client:
                return client.create_automation(AutomationCore(
                    name=name, trigger=EventTrigger(expect={"test.nothing"}, posture=Posture.Reactive),
                    actions=[DoNothing()],
                ))

        make(f"{PREFIX}heartbeat-missing")  # a duplicate of ours
        make(f"{PREFIX}renamed-long-ago")  # one of ours nobody declares any more
        foreign = make("somebody-else/keep-me")
        done = apply_automations(settings, PROJECT_DIR)
        assert sorted(done.deleted) == [f"{PREFIX}heartbeat-missing", f"{PREFIX}renamed-long-ago"]
        assert all(len(group) == 1 for group in ours().values())
        assert f"{PREFIX}renamed-long-ago" not in ours()
        with get_client(sync_client=True) as client:
            assert client.read_automation(foreign) is not None

    def test_what_each_automation_listens_for_and_does(
        self, recovery_deployments: dict[str, Any], receiver: Receiver
    ) -> None:
        settings = load_settings(receiver_url=receiver.url)
        apply_automations(settings, PROJECT_DIR)
        found = {name: group[0] for name, group in ours().items()}

        missing = found[f"{PREFIX}heartbeat-missing"]
        assert missing.trigger.posture == Posture.Proactive
        assert missing.trigger.after == missing.trigger.expect == {SERVICE_HEARTBEAT}
        assert missing.trigger.for_each == {"prefect.resource.id"}
        assert missing.trigger.within == timedelta(seconds=settings.heartbeat_missing_s)
        [run] = missing.actions
        assert run.deployment_id == recovery_deployments["recover-daemon-crash/auto"]
        assert run.parameters["service"] == "{{ event.payload.service }}"
        assert run.parameters["event"]["event"] == HEARTBEAT_MISSING
        assert run.parameters["event"]["occurred"] == "{{ firing.triggered | string }}"

        stale = found[f"{PREFIX}heartbeat-stale"]  # past the runbook's limit: the fallback of the relay's service.hung
        assert stale.trigger.after == stale.trigger.expect == {SERVICE_HEARTBEAT}
        assert stale.trigger.within == timedelta(seconds=settings.heartbeat_max_age_s
                                                 + settings.heartbeat_stale_fallback_s)
        assert stale.actions[0].deployment_id == recovery_deployments["recover-daemon-crash/auto"]
        assert stale.actions[0].parameters["event"]["event"] == HEARTBEAT_STALE

        rollback = found[f"{PREFIX}persistent-failures"]
        assert rollback.trigger.posture == Posture.Reactive and rollback.trigger.expect == {SERVICE_CRASHED}
        assert rollback.trigger.threshold == 3 and rollback.trigger.within == timedelta(hours=24)
        assert rollback.actions[0].deployment_id == recovery_deployments["rollback-persistent-failures/auto"]

        l2 = escalation_block_id("l2")
        # issue 10: with default settings every switch fires within 2 minutes of the beat that did not come
        assert monitor_interval(PROJECT_DIR) + timedelta(seconds=settings.monitor_switch_grace_s) \
            - monitor_interval(PROJECT_DIR) <= timedelta(minutes=2)
        assert 3 * settings.relay_tick_s <= 120 and 3 * settings.serve_tick_s <= 120
        for name, resource, within in (
            (DEAD_MANS_SWITCHES[0], MONITOR_RESOURCE,
             monitor_interval(PROJECT_DIR) + timedelta(seconds=settings.monitor_switch_grace_s)),
            (DEAD_MANS_SWITCHES[1], RELAY_RESOURCE, timedelta(seconds=3 * settings.relay_tick_s)),
            (DEAD_MANS_SWITCHES[2], SERVE_RESOURCE, timedelta(seconds=3 * settings.serve_tick_s)),
        ):
            switch = found[name]
            assert switch.trigger.posture == Posture.Proactive
            assert switch.trigger.after == switch.trigger.expect == {MONITOR_TICK}
            assert switch.trigger.match.get("prefect.resource.id") in (resource, [resource])
            assert switch.trigger.within == within
            [notify] = switch.actions
            assert notify.type == "send-notification" and notify.block_document_id == l2

    def test_the_yaml_triggers_were_created_with_their_deployment(self, recovery_deployments: dict[str, Any]) -> None:
        with get_client(sync_client=True) as client:
            owned = client.read_resource_related_automations(
                f"prefect.deployment.{recovery_deployments['recover-process-hang/auto']}"
            )
        names = {a.name for a in owned}
        assert "recover-process-hang/auto: service hung, cpu-high, memory-high or results stale" in names


def yaml_triggers(folder: str = "flows/recovery/") -> dict[str, list[dict[str, Any]]]:
    """The triggers of prefect.yaml's deployments whose flows live in `folder`, by flow function."""
    out = {}
    for dep in CONFIG["deployments"]:
        if dep.get("triggers") and dep["entrypoint"].startswith(folder):
            out[dep["entrypoint"].rsplit(":", 1)[1]] = dep["triggers"]
    return out


class TestYamlTriggers:
    def test_each_reactive_signal_runs_its_recovery_with_the_event(self) -> None:
        found = {(flow, e) for flow, triggers in yaml_triggers().items() for t in triggers for e in t["expect"]}
        assert found == {
            ("recover_daemon_crash", SERVICE_DEAD),
            ("recover_process_hang", SERVICE_HUNG),
            ("recover_process_hang", "crypto-agent.service.cpu-high"),
            ("recover_process_hang", SERVICE_MEMORY_HIGH),
            ("recover_process_hang", "crypto-agent.service.results-stale"),
            ("recover_stale_data", STORE_STALE),
            ("recover_db_corruption", STORE_CORRUPT),
        }

    def test_every_trigger_passes_the_same_event_parameter_as_the_code(self) -> None:
        for triggers in yaml_triggers().values():
            for trigger in triggers:
                assert trigger["posture"] == "Reactive" and trigger["threshold"] == 1
                assert trigger["parameters"]["event"] == EVENT_PARAMETER
                assert not trigger["name"].startswith(PREFIX)  # never deleted as a stale one of ours

    def test_job_watch_hears_every_bad_run_of_a_runbook_job_and_only_those(self) -> None:
        [trigger] = yaml_triggers("flows/job_watch.py")["job_watch"]
        assert set(trigger["expect"]) == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                                          "prefect.flow-run.Late"}
        assert trigger["match"] == {"prefect.resource.id": "prefect.flow-run.*"}
        assert trigger["match_related"] == {"prefect.resource.role": "tag",
                                            "prefect.resource.id": "prefect.tag.runbook"}
        assert trigger["parameters"] == {"flow_run_id": "{{ event.resource.id }}", "kind": "{{ event.event }}"}
        [dep] = [d for d in CONFIG["deployments"] if d["entrypoint"] == "flows/job_watch.py:job_watch"]
        assert "runbook" not in dep["tags"]  # it never watches (nor pages for) itself

    def test_service_triggers_pass_the_service_from_the_payload(self) -> None:
        for flow in ("recover_daemon_crash", "recover_process_hang"):
            for trigger in yaml_triggers()[flow]:
                assert trigger["match"]["prefect.resource.id"] == "crypto-agent.service.*"
                assert trigger["parameters"]["service"] == "{{ event.payload.service }}"


class TestServe:
    def test_every_deployment_of_prefect_yaml_is_served_with_its_schedules_and_triggers(self) -> None:
        entries = read_entries(PROJECT_DIR)
        assert len(entries) == len(CONFIG["deployments"])
        for entry in entries:
            served = to_runner_deployment(entry)
            assert served.name == entry.spec["name"]
            assert [s.slug for s in served.schedules] == [s["slug"] for s in entry.spec.get("schedules") or []]
            assert [t.name for t in served.triggers] == [t["name"] for t in entry.spec.get("triggers") or []]
            assert served.parameters == (entry.spec.get("parameters") or {})

    def test_an_unknown_deployment_is_a_clear_error(self) -> None:
        from crypto_agent.errors import ConfigError

        with pytest.raises(ConfigError, match=r"no deployment nope/nothing in prefect\.yaml"):
            read_entries(PROJECT_DIR, only=["nope/nothing"])


def fire_times(flow_name: str, days: int) -> list[datetime]:
    [dep] = [d for d in CONFIG["deployments"] if d["entrypoint"].endswith(f":{flow_name}")]
    out: list[datetime] = []
    for sched in dep["schedules"]:
        cron = CronSchedule(cron=sched["cron"], timezone=sched["timezone"])
        end = START + timedelta(days=days) - timedelta(seconds=1)  # `end` is inclusive
        dates = asyncio.run(cron.get_dates(n=10_000, start=START, end=end))
        out.extend(datetime.fromtimestamp(d.timestamp(), UTC) for d in dates)
    return sorted(out)


class TestMonitoringSchedules:
    def test_the_health_monitor_runs_every_5_minutes(self) -> None:
        times = fire_times("health_monitor", 1)
        assert len(times) == 24 * 12
        assert {b - a for a, b in pairwise(times)} == {timedelta(minutes=5)}
        assert monitor_interval(PROJECT_DIR) == timedelta(minutes=5)

    def test_a_one_minute_monitor_makes_a_three_minute_dead_mans_switch(self, tmp_path: Path) -> None:
        text = (PROJECT_DIR / "prefect.yaml").read_text().replace('cron: "*/5 * * * *"', 'cron: "* * * * *"')
        (tmp_path / "prefect.yaml").write_text(text)
        assert monitor_interval(tmp_path) == timedelta(minutes=1)

    def test_the_window_guard_runs_every_minute_from_2330_to_0130_and_never_else(self) -> None:
        times = fire_times("backtest_window_guard", 2)
        first_night = [t for t in times if t < START + timedelta(hours=23)]
        # 00:00-01:30 of the first day, then 23:30 onwards: 91 + 30 + 91 runs in two days
        assert len(first_night) == 91
        assert first_night[0] == START and first_night[-1] == START + timedelta(hours=1, minutes=30)
        assert all(t.hour in (23, 0, 1) for t in times)
        assert all(not (t.hour == 23 and t.minute < 30) and not (t.hour == 1 and t.minute > 30) for t in times)
        assert len(times) == len(set(times))  # the three crons never overlap
