"""job-watch on the real Prefect test server: runs of a real runbook deployment (integrity-check/quick, as the
serving process creates it) put in Failed, Crashed or Late states through the API; who is paged, and how often."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from flow_kit import wait_for_messages
from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.states import Completed, Crashed, Failed, Late, Running, Scheduled

from crypto_agent.errors import InputError
from crypto_agent.receiver import Receiver
from deployments.serve import read_entries, to_runner_deployment
from flows import notify
from flows.job_watch import job_watch

PROJECT_DIR = Path(__file__).resolve().parents[2]
JOB = "integrity-check/quick"
RECOVERY = "recover-daemon-crash/auto"


@pytest.fixture(scope="module")
def deployments() -> Iterator[dict[str, UUID]]:
    """The runbook job, a recovery and job-watch itself on the test server; deleted at the end (job-watch's
    trigger with it), so no later test meets them."""
    entries = {e.full_name: e for e in read_entries(PROJECT_DIR)}
    ids = {name: to_runner_deployment(entries[name]).apply() for name in (JOB, RECOVERY, notify.JOB_WATCH_DEPLOYMENT)}
    yield ids
    with get_client(sync_client=True) as client:
        for deployment_id in ids.values():
            client.delete_deployment(deployment_id)


@pytest.fixture
def job(deployments: dict[str, UUID], settings_for: Any) -> Iterator[Any]:
    """A fresh deployment of the job for each test (its own run history), and the test's settings."""
    entries = {e.full_name: e for e in read_entries(PROJECT_DIR)}
    deployment = to_runner_deployment(entries[JOB])
    deployment.name = f"quick-{datetime.now(UTC).strftime('%H%M%S%f')}"
    deployment_id = deployment.apply()
    yield deployment_id, f"integrity-check/{deployment.name}", settings_for(job_late_after_s=60.0)
    with get_client(sync_client=True) as client:
        client.delete_deployment(deployment_id)


def make_run(deployment_id: UUID, minutes_ago: float, final: Any | None = None) -> FlowRun:
    """A run of the deployment scheduled `minutes_ago`, then put in `final` (a Prefect state), if given."""
    at = datetime.now(UTC) - timedelta(minutes=minutes_ago)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(deployment_id, state=Scheduled(scheduled_time=at))
        if final is not None:
            client.set_flow_run_state(run.id, final, force=True)
        return client.read_flow_run(run.id)


def l_messages(inbox: Receiver, level: str, job_name: str) -> list[dict[str, Any]]:
    return [m for m in inbox.messages(f"/{level}") if job_name in m["body"]["subject"]]


class TestPages:
    def test_a_first_failure_pages_l1_a_second_in_a_row_l2_then_quiet_until_a_success(
        self, job: Any, inbox: Receiver
    ) -> None:
        deployment_id, name, settings = job
        first = make_run(deployment_id, 40, Failed(message="quick_check said: boom"))
        one = job_watch(flow_run_id=f"prefect.flow-run.{first.id}", kind="prefect.flow-run.Failed", settings=settings)
        assert (one["level"], one["paged"]) == ("l1", True)
        [page] = wait_for_messages(inbox, "/l1")
        assert page["body"]["subject"] == f"[crypto-agent] runbook job {name} failed"
        assert "quick_check said: boom" in page["body"]["body"] and str(first.id) in page["body"]["body"]

        second = make_run(deployment_id, 30, Crashed(message="process killed"))
        two = job_watch(flow_run_id=str(second.id), kind="Crashed", settings=settings)
        assert (two["level"], two["paged"]) == ("l2", True)
        [l2] = wait_for_messages(inbox, "/l2")
        assert l2["body"]["subject"] == f"[crypto-agent] runbook job {name} crashed again (previous run failed)"
        assert str(first.id) in l2["body"]["body"]

        third = make_run(deployment_id, 20, Failed(message="again"))
        three = job_watch(flow_run_id=str(third.id), kind="Failed", settings=settings)
        assert (three["level"], three["paged"]) == ("l2", False) and "already paged" in three["reason"]

        make_run(deployment_id, 10, Completed())
        fourth = make_run(deployment_id, 5, Failed(message="a new problem"))
        four = job_watch(flow_run_id=str(fourth.id), kind="Failed", settings=settings)
        assert (four["level"], four["paged"]) == ("l1", True)
        wait_for_messages(inbox, "/l1", count=2)
        assert len(l_messages(inbox, "l1", name)) == 2 and len(l_messages(inbox, "l2", name)) == 1

    def test_a_failed_data_update_with_the_store_past_its_staleness_limit_pages_l3(
        self, deployments: dict[str, UUID], settings_for: Any, inbox: Receiver
    ) -> None:
        entries = {e.full_name: e for e in read_entries(PROJECT_DIR)}
        deployment = to_runner_deployment(entries["data-update/daily"])
        deployment.name = f"daily-{datetime.now(UTC).strftime('%H%M%S%f')}"
        deployment_id = deployment.apply()
        try:
            # the store of this home holds no candle at all: every series is past its limit (H1 6 h, H4 24 h)
            run = make_run(deployment_id, 40, Failed(message="the exchange answered HTTP 503"))
            got = job_watch(flow_run_id=str(run.id), kind="Failed", settings=settings_for())
            assert (got["level"], got["paged"]) == ("l3", True), got
            [l3] = wait_for_messages(inbox, "/l3")
            assert l3["body"]["subject"].endswith("failed: the data is past its staleness limit")
            assert "to do (L3): the data-update missed the staleness limit (" in l3["body"]["body"]
            assert "stale series: BTCUSDT 1h no candle" in l3["body"]["body"]
        finally:
            with get_client(sync_client=True) as client:
                client.delete_deployment(deployment_id)

    def test_a_run_late_past_the_limit_pages_l1_and_one_that_started_pages_nobody(
        self, job: Any, inbox: Receiver
    ) -> None:
        deployment_id, name, settings = job
        stuck = make_run(deployment_id, 3, Late(scheduled_time=datetime.now(UTC) - timedelta(minutes=3)))
        late = job_watch(flow_run_id=str(stuck.id), kind="Late", settings=settings)
        assert (late["level"], late["paged"]) == ("l1", True)
        [page] = wait_for_messages(inbox, "/l1")
        assert page["body"]["subject"] == f"[crypto-agent] runbook job {name} late"
        assert "not started 3 min after its slot" in page["body"]["body"]

        started = make_run(deployment_id, 2, Late(scheduled_time=datetime.now(UTC) - timedelta(minutes=2)))
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(started.id, Running(), force=True)
        quiet = job_watch(flow_run_id=str(started.id), kind="Late", settings=settings)
        assert quiet["paged"] is False and "no longer late" in quiet["reason"]
        assert len(l_messages(inbox, "l1", name)) == 1

    def test_a_recovery_run_is_not_watched(self, deployments: dict[str, UUID], settings_for: Any,
                                           inbox: Receiver) -> None:
        run = make_run(deployments[RECOVERY], 1, Failed(message="recovery failed"))
        done = job_watch(flow_run_id=str(run.id), kind="Failed", settings=settings_for())
        assert done["paged"] is False and done["reason"] == "not a watched runbook job run"
        assert wait_for_messages(inbox, "/l1", timeout_s=3) == []

    def test_not_a_run_id_is_a_clear_error(self, settings_for: Any) -> None:
        state = job_watch(flow_run_id="prefect.flow-run.nope", kind="Failed", settings=settings_for(),
                          return_state=True)
        assert state.is_failed()
        with pytest.raises(InputError, match="is not a flow run id"):
            state.result()
        other = job_watch(flow_run_id=str(UUID(int=1)), kind="Cancelled", settings=settings_for(), return_state=True)
        with pytest.raises(InputError, match="not a failed, crashed or late run event"):
            other.result()


class TestHooks:
    def test_the_hook_of_a_watched_run_stays_quiet_and_of_others_pages(self, job: Any,
                                                                         deployments: dict[str, UUID]) -> None:
        deployment_id, _, _ = job
        assert notify.job_watch_pages(make_run(deployment_id, 1)) is True
        assert notify.job_watch_pages(make_run(deployments[RECOVERY], 1)) is False  # recoveries page themselves
        with get_client(sync_client=True) as client:
            direct = client.read_flow_run(make_run(deployment_id, 1).id)
        assert notify.job_watch_pages(direct.model_copy(update={"deployment_id": None})) is False
