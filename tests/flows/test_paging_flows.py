"""Paging as on-call tools do it (issue 11), through the real flows and the local receiver: an unacknowledged
page climbs L1 -> L2 -> L3 at the ack timeout and an acknowledged one stops; a silence holds a recovery's pages,
lists them, and tells each level once after it ends; a report closed from the UI's flow is republished."""

from __future__ import annotations

import time
from typing import Any

from flow_kit import wait_for_messages
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from recovery_kit import (
    all_incidents,
    filled_env,  # noqa: F401 (the `env` fixture: a store of 60 days of candles)
    settings_of,
    steps,
)

from crypto_agent import incidents
from crypto_agent.incidents import ESCALATED, silences
from crypto_agent.receiver import Receiver
from crypto_agent.simulator import Simulator
from flows.events import STORE_RESOURCE
from flows.paging import acknowledge, close_report, page_clock
from flows.recovery import recover_stale_data

ACK_TIMEOUT_S = 10.0  # the setting's floor: the clock is watched for real, not faked


def subjects(inbox: Receiver, level: str) -> list[str]:
    return [m["body"]["subject"] for m in inbox.messages(f"/{level}")]


def sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.time()))


def test_an_unacknowledged_page_climbs_l1_l2_l3_and_an_acknowledged_one_stops(
    env: dict[str, Any], inbox: Receiver
) -> None:
    cfg = settings_of(env)
    fast = {**env, "ack_timeout_s": ACK_TIMEOUT_S}
    with incidents.open_incident_store(cfg) as log:
        a, _ = incidents.open_or_join(log, "daemon-crash", "crypto-agent.service.paper-trader", {}, time.time())
        b, _ = incidents.open_or_join(log, "daemon-crash", "crypto-agent.service.backtest-daemon", {}, time.time())
        for inc in (a, b):
            incidents.told(log, inc.id, "l1")
            incidents.close(log, inc.id, ESCALATED, outcome="escalated", summary="restart failed")
    paged_at = time.time()

    assert page_clock(settings=fast)["climbed"] == []  # inside the timeout: nobody else is paged
    assert subjects(inbox, "l2") == []
    acknowledge(incident_id=b.id, by="alice", settings=fast)  # the form of the acknowledge deployment

    sleep_until(paged_at + ACK_TIMEOUT_S + 0.5)
    first = page_clock(settings=fast)
    assert first["climbed"] == [{"incident_id": a.id, "level": "l2", "held": False}]
    [l2] = wait_for_messages(inbox, "/l2", 1)
    assert f"incident #{a.id} unacknowledged, escalated to L2" in l2["body"]["subject"]
    assert f"crypto-agent ack {a.id}" in l2["body"]["body"] and "Where: crypto-agent.service.paper-trader" \
        in l2["body"]["body"]
    assert page_clock(settings=fast)["climbed"] == []  # the clock restarts at L2

    sleep_until(time.time() + ACK_TIMEOUT_S + 0.5)
    second = page_clock(settings=fast)
    assert second["climbed"] == [{"incident_id": a.id, "level": "l3", "held": False}]
    [l3] = wait_for_messages(inbox, "/l3", 1)
    assert "escalated to L3" in l3["body"]["subject"]
    with incidents.open_incident_store(cfg) as log:
        a_now, b_now = incidents.get(log, a.id), incidents.get(log, b.id)
    assert a_now.levels_told == ["l1", "l2", "l3"] and steps(a_now).count("ack-timeout") == 2
    assert b_now.levels_told == ["l1"] and b_now.acked_by == "alice"  # acknowledged: it never climbed
    assert len(subjects(inbox, "l2")) == 1 and len(subjects(inbox, "l3")) == 1


def test_a_stale_data_escalation_climbs_from_l2_to_l3_unless_acknowledged(
    env: dict[str, Any], simulator: Simulator, inbox: Receiver
) -> None:
    down = {**env, "request_timeout_s": 2.0, "ack_timeout_s": ACK_TIMEOUT_S}
    simulator.go_down("refuse")
    result = recover_stale_data(settings=down, event=None)
    closed_at = time.time()
    assert result["outcome"] == "escalated" and result["needs_person"]
    wait_for_messages(inbox, "/l2", 1)  # the close told L2: the recovery did not succeed
    sleep_until(closed_at + ACK_TIMEOUT_S + 0.5)
    climbed = page_clock(settings=down)["climbed"]
    assert climbed == [{"incident_id": result["incident_id"], "level": "l3", "held": False}]
    [l3] = wait_for_messages(inbox, "/l3", 1)
    assert "needs a person" in l3["body"]["subject"] and "check-exchange" in l3["body"]["body"]


def test_a_silence_holds_a_recoverys_pages_and_tells_each_level_once_after_it_ends(
    env: dict[str, Any], simulator: Simulator, inbox: Receiver
) -> None:
    cfg = settings_of(env)
    down = {**env, "request_timeout_s": 2.0}
    with incidents.open_incident_store(cfg) as log:
        s = silences.add(log, "store", 3600, "exchange maintenance", by="alice")
    simulator.go_down("refuse")
    result = recover_stale_data(settings=down, event=None)

    assert result["outcome"] == "escalated"  # the recovery ran all the same
    time.sleep(1.0)
    assert inbox.messages() == []  # and nobody was paged
    [inc] = all_incidents(cfg)
    assert inc.levels_told == [] and {"page-held-l1", "page-held-l2"} <= set(steps(inc))
    with incidents.open_incident_store(cfg) as log:
        held = silences.get(log, s.id).held
    assert sorted({p["level"] for p in held}) == ["l1", "l2"] and all(p["resource"] == STORE_RESOURCE for p in held)
    assert page_clock(settings=down)["silences_told"] == []  # still in force

    with incidents.open_incident_store(cfg) as log:
        silences.expire(log, s.id)
    told = page_clock(settings=down)
    assert told["silences_told"] == [s.id]
    [l1] = wait_for_messages(inbox, "/l1", 1)
    [l2] = wait_for_messages(inbox, "/l2", 1)
    assert f"silence #{s.id} (store) ended" in l1["body"]["subject"] and "exchange maintenance" in l1["body"]["body"]
    assert f"incident #{inc.id}" in l2["body"]["body"]
    assert page_clock(settings=down)["silences_told"] == []  # once
    time.sleep(1.0)
    assert len(inbox.messages("/l1")) == 1 and len(inbox.messages("/l2")) == 1


def test_close_report_from_the_ui_fills_owner_and_prevention_and_republishes_the_artifact(
    env: dict[str, Any], simulator: Simulator, inbox: Receiver
) -> None:
    simulator.go_down("refuse")
    result = recover_stale_data(settings={**env, "request_timeout_s": 2.0}, event=None)
    done = close_report(incident_id=result["incident_id"], owner="alice",
                        prevention=["monitoring threshold", "second exchange as a fallback"], settings=env)
    assert done["prevention"] == ["Monitoring threshold adjusted", "Other: second exchange as a fallback"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"incident-{result['incident_id']}"])))
    newest = max(found, key=lambda a: a.created)
    assert "Owner: alice" in str(newest.data) and "[x] Monitoring threshold adjusted" in str(newest.data)
    with incidents.open_incident_store(settings_of(env)) as log:
        assert incidents.reports_to_publish(log) == []  # published: page-clock has nothing to do


def test_a_daily_runbook_job_without_a_completed_run_for_a_day_pages_l2_once(
    settings_for: Any, inbox: Receiver
) -> None:
    from pathlib import Path

    from prefect import flow

    from deployments.serve import read_entries, to_runner_deployment
    from flows.paging import watch_missed_days

    entries = {e.full_name: e for e in read_entries(Path(__file__).resolve().parents[2])}
    deployment = to_runner_deployment(entries["sentiment-macro-update/daily"])
    deployment.name = f"daily-{int(time.time() * 1000)}"
    deployment_id = deployment.apply()
    cfg = settings_of(settings_for())
    job = f"sentiment-macro-update/{deployment.name}"

    @flow(name="watch-missed-days")
    def watch(now: float) -> list[str]:
        return watch_missed_days(cfg, now)

    try:
        assert job not in watch(time.time())  # created just now: it has a day to run
        later = time.time() + 27 * 3600  # a day and more without a completed run
        assert job in watch(later)
        [l2] = [m for m in wait_for_messages(inbox, "/l2", 1) if job in m["body"]["subject"]]
        assert "missed its day" in l2["body"]["subject"] and "last completed: never" in l2["body"]["body"]
        assert job not in watch(later + 60)  # one page per episode
        time.sleep(1.0)
        assert len([m for m in inbox.messages("/l2") if job in m["body"]["subject"]]) == 1
    finally:
        with get_client(sync_client=True) as client:
            client.delete_deployment(deployment_id)
