"""prefect.yaml: every entrypoint imports and is a Flow, and every schedule fires when the runbook says."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow
from prefect.server.schemas.schedules import CronSchedule

import flows.daily as daily
import flows.job_watch as job_watch
import flows.maintenance as maintenance
import flows.monitoring as monitoring
import flows.paging as paging
import flows.recovery as recovery
import flows.retention as retention
from flows.notify import notify_crashed, notify_failure

PROJECT_DIR = Path(__file__).resolve().parents[2]
KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
START = datetime(2026, 1, 1, tzinfo=UTC)  # a Thursday


def load_config() -> dict[str, Any]:
    return yaml.safe_load((PROJECT_DIR / "prefect.yaml").read_text())


DEPLOYMENTS: list[dict[str, Any]] = load_config()["deployments"]


def entrypoint_flow(entrypoint: str) -> Flow:
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def deployment(flow_name: str, name: str) -> dict[str, Any]:
    [found] = [d for d in DEPLOYMENTS if entrypoint_flow(d["entrypoint"]).name == flow_name and d["name"] == name]
    return found


def fire_times(dep: dict[str, Any], start: datetime = START, **window: Any) -> list[datetime]:
    """When the deployment's one schedule fires from `start` for the given window (days=..., weeks=...)."""
    [sched] = dep["schedules"]
    cron = CronSchedule(cron=sched["cron"], timezone=sched["timezone"], day_or=sched.get("day_or", True))
    dates = asyncio.run(cron.get_dates(start=start, end=start + timedelta(**window)))
    # plain datetimes: Prefect's DateTime drops its zone on subtraction
    return [datetime.fromtimestamp(d.timestamp(), UTC) for d in dates]


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=lambda d: f"{d['entrypoint']}/{d['name']}")
class TestEveryDeployment:
    def test_entrypoint_imports_and_is_a_flow_with_a_kebab_case_name(self, dep: dict[str, Any]) -> None:
        flow = entrypoint_flow(dep["entrypoint"])
        assert isinstance(flow, Flow)
        assert KEBAB.match(flow.name), flow.name
        assert KEBAB.match(dep["name"]), dep["name"]

    def test_runs_on_the_process_pool_with_the_project_as_working_directory(self, dep: dict[str, Any]) -> None:
        config = load_config()
        assert dep["work_pool"]["name"] == "crypto-agent-pool"
        [step] = config["pull"]
        assert "prefect.deployments.steps.set_working_directory" in step

    def test_every_schedule_is_a_utc_cron_with_a_slug(self, dep: dict[str, Any]) -> None:
        # issue 5: the recoveries (<flow>/auto) have no schedule: automations run them; issue 11: <flow>/ui are
        # run by a person from the UI's form
        assert dep.get("schedules") or dep["name"] in ("auto", "ui")
        for sched in dep.get("schedules") or []:
            assert sched["timezone"] == "UTC"
            assert KEBAB.match(sched["slug"])
            CronSchedule(cron=sched["cron"], timezone="UTC")  # a valid cron

    def test_parameters_fit_the_flow_signature(self, dep: dict[str, Any]) -> None:
        flow = entrypoint_flow(dep["entrypoint"])
        params = dep.get("parameters") or {}
        signature = inspect.signature(flow.fn).parameters
        assert set(params) <= set(signature)
        if dep["name"] == "ui":  # the UI's form asks for the required ones: fill them as a person would
            samples = {int: 1, str: "alice", "int": 1, "str": "alice", "list[str]": ["auto-restart"]}
            required = {n: samples[p.annotation] for n, p in signature.items()
                        if p.default is inspect.Parameter.empty and n not in params}
            params = {**params, **required}
        flow.validate_parameters(params)

    def test_the_flow_has_hooks_a_timeout_and_a_description(self, dep: dict[str, Any]) -> None:
        flow = entrypoint_flow(dep["entrypoint"])
        assert notify_failure in flow.on_failure_hooks
        assert notify_crashed in flow.on_crashed_hooks
        assert flow.timeout_seconds and flow.timeout_seconds > 0
        assert flow.description


def test_every_runbook_flow_has_a_deployment() -> None:
    deployed = {entrypoint_flow(d["entrypoint"]).name for d in DEPLOYMENTS}
    defined = {
        obj.name for module in (daily, maintenance, monitoring, recovery, retention, job_watch, paging)
        for obj in vars(module).values() if isinstance(obj, Flow)
    }
    assert defined == deployed


def test_slugs_are_unique() -> None:
    slugs = [s["slug"] for d in DEPLOYMENTS for s in d.get("schedules") or []]
    assert len(slugs) == len(set(slugs))


class TestWhenSchedulesFire:
    @pytest.mark.parametrize(
        ("flow_name", "hour", "minute"),
        [("data-update", 0, 30), ("data-validation", 1, 0), ("sentiment-macro-update", 2, 0)],
    )
    def test_daily_data_jobs_fire_once_a_day_at_the_runbook_time(self, flow_name: str, hour: int, minute: int) -> None:
        times = fire_times(deployment(flow_name, "daily"), days=30)
        assert len(times) == 30
        assert all((t.hour, t.minute) == (hour, minute) for t in times)
        assert len({t.date() for t in times}) == 30

    def test_the_update_deadline_is_five_minutes_after_the_update(self) -> None:
        update = fire_times(deployment("data-update", "daily"), days=7)
        deadline_dep = deployment("data-update-deadline", "daily")
        deadline = fire_times(deadline_dep, days=7)
        grace = deadline_dep["parameters"]["grace_minutes"]
        assert grace == daily.DATA_UPDATE_GRACE_MINUTES == 5
        assert [t - timedelta(minutes=grace) for t in deadline] == update
        # the flow's own idea of the schedule is the same
        assert deployment("data-update", "daily")["schedules"][0]["cron"] == daily.DATA_UPDATE_CRON
        assert all(daily.last_scheduled_update(t) == t for t in update)

    def test_the_backup_runs_daily_after_the_data_jobs_and_before_compact(self) -> None:
        backups = fire_times(deployment("backup", "daily"), days=14)
        last_data_job = max(fire_times(deployment(n, "daily"), days=1)[0].time()
                            for n in ("data-update", "data-validation", "sentiment-macro-update"))
        compact_at = fire_times(deployment("compact", "weekly"), weeks=1)[0].time()
        assert len(backups) == 14
        assert all(last_data_job < t.time() < compact_at for t in backups)

    def test_compact_fires_on_sundays_at_three_only(self) -> None:
        times = fire_times(deployment("compact", "weekly"), weeks=12)
        assert len(times) == 12
        assert all(t.weekday() == 6 and (t.hour, t.minute) == (3, 0) for t in times)

    def test_the_restore_test_fires_on_the_first_sunday_of_every_month_and_never_else(self) -> None:
        dep = deployment("backup-restore-test", "monthly")
        times = fire_times(dep, days=731)  # 24 months from 2026-01-01
        assert len(times) == 24
        assert all(t.weekday() == 6 and t.day <= 7 for t in times)
        assert len({(t.year, t.month) for t in times}) == 24
        # it is after that Sunday's backup and compaction
        assert all(t.time() > fire_times(deployment("compact", "weekly"), weeks=1)[0].time() for t in times)

    def test_the_same_cron_without_day_or_false_would_fire_on_other_days(self) -> None:
        # what the test above guards against: cron ORs day-of-month and day-of-week by default
        dep = deployment("backup-restore-test", "monthly")
        naive = {**dep, "schedules": [{**dep["schedules"][0], "day_or": True}]}
        times = fire_times(naive, days=62)
        assert any(t.weekday() != 6 for t in times)

    def test_the_quick_integrity_check_is_hourly_and_the_full_one_weekly_after_compact(self) -> None:
        quick = deployment("integrity-check", "quick")
        full = deployment("integrity-check", "full")
        assert quick["parameters"]["full"] is False and full["parameters"]["full"] is True
        hourly = fire_times(quick, days=1)
        assert len(hourly) == 24 and len({t.hour for t in hourly}) == 24
        weekly = fire_times(full, weeks=8)
        compact_at = fire_times(deployment("compact", "weekly"), weeks=1)[0].time()
        assert len(weekly) == 8 and all(t.weekday() == 6 and t.time() > compact_at for t in weekly)
